"""Card assembly: front matter only from ``huggingface_hub``'s card data classes, the rendered body after it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from eval_artifacts.hub_dataset import SPLIT, SUMMARY_CONFIG
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.levels import LEVELS
from hub_tools.cards.context import StudyArtifacts, adapter_context, dataset_context, load_artifacts
from hub_tools.cards.format import plain_text
from hub_tools.cards.sandbox import (
    ADAPTER_TEMPLATE,
    DATASET_TEMPLATE,
    NOTE_TEMPLATE,
    make_environment,
    render_template,
)


@dataclass(frozen=True)
class RenderedCard:
    repo_id: str
    repo_type: Literal["model", "dataset"]
    text: str
    card: ModelCard | DatasetCard

    @property
    def repo_name(self) -> str:
        return self.repo_id.split("/", 1)[1]


def adapter_card_data(config: StudyConfig, art: StudyArtifacts, level: int) -> ModelCardData:
    accuracy = art.metrics[LEVELS[level].key]["accuracy"]
    return ModelCardData(
        base_model=config.base_model.id,
        base_model_relation="adapter",
        library_name="peft",
        pipeline_tag="text-generation",
        datasets=[config.data.dataset_id, config.eval_repo_id],
        license=config.hub.license,
        language=["en"],
        tags=["lora", "peft", "chain-of-thought", "cot-compression", "math", "gsm8k", f"level-{level}"],
        model_name=config.adapter_repo_id(level),
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type=config.data.dataset_id,
                dataset_name="GSM8K",
                dataset_config=config.data.config_name,
                dataset_split=SPLIT,
                dataset_revision=config.data.revision,
                metric_type="accuracy",
                metric_value=accuracy,
                metric_name="Accuracy",
            )
        ],
    )


def dataset_card_data(config: StudyConfig, art: StudyArtifacts) -> DatasetCardData:
    rows = sum(art.metrics[m]["n_total"] for m in config.model_keys)
    size = "n<1K" if rows < 1000 else "1K<n<10K" if rows < 10_000 else "10K<n<100K"
    return DatasetCardData(
        license=config.hub.license,
        language=["en"],
        pretty_name=f"{config.title}: evaluation outputs",
        task_categories=["text-generation"],
        size_categories=[size],
        source_datasets=[config.data.dataset_id],
        tags=["chain-of-thought", "cot-compression", "gsm8k", "evaluation"],
        configs=[
            {"config_name": name, "data_files": [{"split": SPLIT, "path": f"{name}/{SPLIT}-*"}]}
            for name in [*config.model_keys, SUMMARY_CONFIG]
        ],
    )


def assemble(card_data: ModelCardData | DatasetCardData, body: str, *, repo_id: str) -> RenderedCard:
    """Front matter from the card data class, the rendered body after it; parsed back to be sure."""
    text = f"---\n{card_data.to_yaml()}\n---\n{body.lstrip()}"
    is_model = isinstance(card_data, ModelCardData)
    card = ModelCard(text) if is_model else DatasetCard(text)
    return RenderedCard(repo_id=repo_id, repo_type="model" if is_model else "dataset", text=text, card=card)


def render_study_cards(
    config: StudyConfig,
    run_dir: RunDir,
    *,
    templates_dir: Path | None = None,
    collection_url: str | None = None,
    artifacts: StudyArtifacts | None = None,
) -> dict[str, RenderedCard]:
    """Render every adapter card and the eval dataset card, keyed by repo name (``{prefix}-l4``).

    Args:
        collection_url: the collection's URL when publishing already created it (``publish/state.json``);
            otherwise cards link the namespace's collections page.
        artifacts: ``run_dir``'s artifacts when the caller already loaded them; read from ``run_dir`` if not.

    Raises:
        ArtifactError: an artifact is missing or malformed. TemplateError: a template is missing, misspells
            a variable or leaves the sandbox.
    """
    art = artifacts if artifacts is not None else load_artifacts(config, run_dir)
    env = make_environment(templates_dir)
    cards: dict[str, RenderedCard] = {}
    for level in config.levels:
        body = render_template(
            env, ADAPTER_TEMPLATE, adapter_context(config, art, level, collection_url=collection_url)
        )
        card = assemble(adapter_card_data(config, art, level), body, repo_id=config.adapter_repo_id(level))
        cards[card.repo_name] = card
    body = render_template(env, DATASET_TEMPLATE, dataset_context(config, art, collection_url=collection_url))
    card = assemble(dataset_card_data(config, art), body, repo_id=config.eval_repo_id)
    cards[card.repo_name] = card
    return cards


def render_collection_notes(
    config: StudyConfig,
    run_dir: RunDir,
    *,
    templates_dir: Path | None = None,
    artifacts: StudyArtifacts | None = None,
) -> dict[str, str]:
    """One note per collection item (L1…Ln, then the eval dataset), keyed by repo id, each one line.

    Args:
        artifacts: ``run_dir``'s artifacts when the caller already loaded them; read from ``run_dir`` if not.
    """
    art = artifacts if artifacts is not None else load_artifacts(config, run_dir)
    env = make_environment(templates_dir)
    notes: dict[str, str] = {}
    for level in config.levels:
        context = adapter_context(config, art, level) | {"item": "adapter"}
        notes[config.adapter_repo_id(level)] = plain_text(render_template(env, NOTE_TEMPLATE, context))
    context = dataset_context(config, art) | {"item": "dataset", "level": None, "headline": None}
    notes[config.eval_repo_id] = plain_text(render_template(env, NOTE_TEMPLATE, context))
    return notes


def write_cards(run_dir: RunDir, cards: dict[str, RenderedCard]) -> list[Path]:
    """Write each card to ``cards/<repo_name>/README.md`` (exactly what will be pushed)."""
    paths = []
    for name, card in cards.items():
        path = run_dir.card(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(card.text, encoding="utf-8")
        paths.append(path)
    return paths
