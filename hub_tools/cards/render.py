"""Card assembly: front matter only from ``huggingface_hub``'s card data classes, the rendered body after it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from huggingface_hub import (
    DatasetCard,
    DatasetCardData,
    EvalResult,
    EvalResultEntry,
    ModelCard,
    ModelCardData,
    eval_result_entries_to_yaml,
)

from eval_artifacts.hub_dataset import SPLIT, SUMMARY_CONFIG
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.levels import LEVELS
from hub_tools.cards.context import (
    StudyArtifacts,
    accuracy_percent,
    adapter_cards,
    adapter_context,
    base_context,
    card_model,
    card_repo_id,
    dataset_context,
    eval_dataset,
    eval_results_path,
    load_artifacts,
    study_links,
)
from hub_tools.cards.format import fmt_accuracy, plain_text
from hub_tools.cards.sandbox import (
    ADAPTER_TEMPLATE,
    BASE_TEMPLATE,
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


def adapter_card_data(config: StudyConfig, art: StudyArtifacts, level: int, *, rl: bool = False) -> ModelCardData:
    model = card_model(level, rl)
    accuracy = art.metrics[model]["accuracy"]
    dataset = eval_dataset(config, art, model)
    topic = [] if config.synthetic_data else ["gsm8k"]
    return ModelCardData(
        base_model=config.base_hub_id,
        base_model_relation="adapter",
        library_name="peft",
        pipeline_tag="text-generation",
        # The training data only: synthetic problems are on no Hub, so there is none to name.
        datasets=None if config.synthetic_data else [config.data.dataset_id],
        license=config.hub.license,
        language=["en"],
        tags=[
            "lora", "peft", "chain-of-thought", "cot-compression", "math", *topic, f"level-{level}",
            *(["grpo", "reinforcement-learning"] if rl else []),
        ],  # fmt: skip
        model_name=card_repo_id(config, level, rl),
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset["id"],
                dataset_name=dataset["name"],
                dataset_config=dataset["config"],
                dataset_split=SPLIT,
                dataset_revision=dataset["revision"],
                metric_type="accuracy",
                metric_value=accuracy,
                metric_name="Accuracy",
            )
        ],
    )


def eval_result_entries(
    config: StudyConfig, art: StudyArtifacts, level: int, *, rl: bool = False
) -> list[EvalResultEntry]:
    """The adapter's ``.eval_results/`` entry: its accuracy on the benchmark (or the study's own eval dataset
    for synthetic problems), with the eval dataset as its source and the setup in the notes."""
    model = card_model(level, rl)
    m = art.metrics[model]
    dataset = eval_dataset(config, art, model)
    t = art.training[level]
    method = (
        f"LoRA adapter continued with GRPO for {art.rl_training[level]['steps']} steps (RL seed "
        f"{art.rl_training[level]['seed']})"
        if rl
        else "LoRA adapter"
    )
    links = study_links(config, art.published)
    evaluated = art.evaluated_with[model]
    seeds = ", ".join(str(seed) for seed in m["seeds"])
    notes = (
        f"Level {level} ({LEVELS[level].name}) {method}; value = accuracy in percent, correct final answers / answers "
        f"({m['n_correct']} / {m['n_total']}), graded strictly against the reference answer (only a finished "
        f"final answer counts; lenient accuracy {fmt_accuracy(m['accuracy_lenient'])}); greedy decoding, at most "
        f"{config.eval.max_new_tokens} new tokens, {evaluated['dtype']}"
        f"{', adapter merged' if evaluated['merged'] else ''}; eval seed(s) {seeds}; training seed {t['seed']}"
    )
    return [
        EvalResultEntry(
            dataset_id=dataset["id"],
            task_id=dataset["task_id"],
            dataset_revision=dataset["revision"],
            value=accuracy_percent(m["accuracy"]),
            date=evaluated["date"],
            source_url=links["eval_dataset"],
            source_name="Every generated answer",
            notes=notes,
        )
    ]


def eval_results_file(config: StudyConfig, art: StudyArtifacts, level: int, *, rl: bool = False) -> tuple[str, str]:
    """``(path in repo, YAML text)`` of the adapter's eval-results file, from huggingface_hub's serializer."""
    path = eval_results_path(eval_dataset(config, art, card_model(level, rl)))
    entries = eval_result_entries_to_yaml(eval_result_entries(config, art, level, rl=rl))
    return path, yaml.safe_dump(entries, sort_keys=False, allow_unicode=True)


def dataset_card_data(config: StudyConfig, art: StudyArtifacts) -> DatasetCardData:
    rows = sum(art.metrics[m]["n_total"] for m in config.model_keys)
    size = "n<1K" if rows < 1000 else "1K<n<10K" if rows < 10_000 else "10K<n<100K"
    return DatasetCardData(
        license=config.hub.license,
        language=["en"],
        pretty_name=f"{config.title}: evaluation outputs",
        task_categories=["text-generation"],
        size_categories=[size],
        source_datasets=None if config.synthetic_data else [config.data.dataset_id],
        tags=["chain-of-thought", "cot-compression", *([] if config.synthetic_data else ["gsm8k"]), "evaluation"],
        configs=[
            {"config_name": name, "data_files": [{"split": SPLIT, "path": f"{name}/{SPLIT}-*"}]}
            for name in [*config.model_keys, SUMMARY_CONFIG]
        ],
    )


def base_card_data(config: StudyConfig) -> ModelCardData:
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=config.hub.license,
        language=["en"],
        tags=["qwen3", "tiny", "cot-compression", "math", "synthetic-data"],
        model_name=config.base_repo_id,
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
    artifacts: StudyArtifacts | None = None,
) -> dict[str, RenderedCard]:
    """Render the tiny base's card (tiny study), every adapter card (each level's SFT adapter, then its RL
    adapter when it has one) and the eval dataset card, keyed by repo name (``{prefix}-l4``, ``{prefix}-l4-rl``).

    Args:
        artifacts: ``run_dir``'s artifacts when the caller already loaded them (with what the publish under way
            knows: ``load_artifacts(published=...)``); read from ``run_dir`` if not.

    Raises:
        ArtifactError: an artifact is missing or malformed. TemplateError: a template is missing, misspells
            a variable or leaves the sandbox.
    """
    art = artifacts if artifacts is not None else load_artifacts(config, run_dir)
    env = make_environment(templates_dir)
    cards: dict[str, RenderedCard] = {}
    if config.tiny_base:
        body = render_template(env, BASE_TEMPLATE, base_context(config, art))
        card = assemble(base_card_data(config), body, repo_id=config.base_repo_id)
        cards[card.repo_name] = card
    for level, rl in adapter_cards(config):
        body = render_template(env, ADAPTER_TEMPLATE, adapter_context(config, art, level, rl=rl))
        card_data = adapter_card_data(config, art, level, rl=rl)
        card = assemble(card_data, body, repo_id=card_repo_id(config, level, rl))
        cards[card.repo_name] = card
    body = render_template(env, DATASET_TEMPLATE, dataset_context(config, art))
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
    """One note per collection item (the tiny base, L1…Ln, then the eval dataset), keyed by repo id, each one line.

    Args:
        artifacts: ``run_dir``'s artifacts when the caller already loaded them; read from ``run_dir`` if not.
    """
    art = artifacts if artifacts is not None else load_artifacts(config, run_dir)
    env = make_environment(templates_dir)
    notes: dict[str, str] = {}
    if config.tiny_base:
        context = base_context(config, art) | {"item": "base", "level": None, "headline": None}
        notes[config.base_repo_id] = plain_text(render_template(env, NOTE_TEMPLATE, context))
    for level, rl in adapter_cards(config):
        context = adapter_context(config, art, level, rl=rl) | {"item": "adapter"}
        notes[card_repo_id(config, level, rl)] = plain_text(render_template(env, NOTE_TEMPLATE, context))
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
