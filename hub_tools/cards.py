"""Cards: every adapter card, the eval dataset card and the collection notes, rendered from the run dir's
eval artifacts through sandboxed Jinja templates, and validated before anything may be published.

Read top to bottom: number formatting (the one place that turns an artifact value into card text), reading
the artifacts, building the template context, the sandboxed environment and its inert-text filters, card
assembly (front matter only from ``huggingface_hub``'s card data classes), writing, then validation, which
re-reads the artifacts and checks the rendered text against them.

Links: the Hub base URL is ``hub.endpoint``, or ``https://huggingface.co`` for the embedded local Hub (so the
cards do not change with the local server's port). The collection's URL is known only after publishing
created it, so ``collection_url`` is optional: publishing passes it from ``publish/state.json`` when known;
until then the card links the namespace's collections page (``{hub}/collections/{namespace}``) and names the
collection by its title.
"""

from __future__ import annotations

import ast
import html
import re
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData
from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markdown_it import MarkdownIt

from eval_artifacts.metrics import check_metrics_match_samples, read_metrics
from eval_artifacts.records import SAMPLE_FIELDS, read_samples
from eval_artifacts.rundir import RunDir, read_json
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ArtifactError, CardValidationError, TemplateError
from eval_artifacts.study.levels import LEVELS, build_prompt
from eval_artifacts.summary import read_summary, sweet_spot

ADAPTER_TEMPLATE = "adapter_card.md.j2"
DATASET_TEMPLATE = "eval_dataset_card.md.j2"
NOTE_TEMPLATE = "collection_note.txt.j2"
TEMPLATES = (ADAPTER_TEMPLATE, DATASET_TEMPLATE, NOTE_TEMPLATE)
PUBLIC_HUB = "https://huggingface.co"
NOTE_MAX_CHARS = 500
SWEET_SPOT_ALPHA = 0.05
PLOT_FILE = "pareto.png"
EXAMPLE_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
EVAL_SPLIT = "test"


# ---------------------------------------------------------------- number formatting (the only place)


def fmt_accuracy(value: float) -> str:
    """Accuracy, deltas' magnitudes and CI ends: 3 decimals."""
    return f"{value:.3f}"


def fmt_ci(ci: list[float] | tuple[float, float]) -> str:
    return f"[{fmt_accuracy(ci[0])}, {fmt_accuracy(ci[1])}]"


def fmt_tokens(value: float) -> str:
    """Token means (and other means): 2 decimals."""
    return f"{value:.2f}"


def fmt_median(value: float) -> str:
    """Medians of integer counts are integral (odd n) or halves: ``35``, not ``35.00``."""
    return str(int(value)) if float(value).is_integer() else fmt_tokens(value)


def fmt_count(value: int) -> str:
    return str(int(value))


def fmt_fraction(correct: int, total: int) -> str:
    return f"{int(correct)} / {int(total)}"


def fmt_delta(value: float) -> str:
    return f"{value:+.3f}"


def fmt_p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def fmt_sd(value: float | None) -> str:
    return "n/a (one seed)" if value is None else f"{value:.3f}"


def fmt_plain(value: float) -> str:
    """Hyperparameters as the config wrote them: ``0.0002``, ``0.05``, ``2``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# One definition per results column: header -> metrics.json value as card text. The renderer fills the
# table from these and the validator parses the table back and compares through the same functions.
RESULT_COLUMNS: dict[str, Any] = {
    "Accuracy": lambda m: fmt_accuracy(m["accuracy"]),
    "95% CI (Wilson)": lambda m: fmt_ci(m["ci95"]),
    "Correct / total": lambda m: fmt_fraction(m["n_correct"], m["n_total"]),
    "Think tokens (mean)": lambda m: fmt_tokens(m["think_tokens"]["mean"]),
    "Think tokens (median)": lambda m: fmt_median(m["think_tokens"]["median"]),
    "Completion tokens (mean)": lambda m: fmt_tokens(m["completion_tokens"]["mean"]),
}
SEED_COLUMNS: dict[str, Any] = {
    "Accuracy sd across seeds": lambda m: fmt_sd(m["across_seeds"]["accuracy"]["sd"])
}
VS_BASE_COLUMNS: dict[str, Any] = {
    "Δ accuracy vs base": lambda m: fmt_delta(m["vs_base"]["delta"]),
    "95% CI of Δ": lambda m: fmt_ci(m["vs_base"]["ci95"]),
    "McNemar p": lambda m: fmt_p(m["vs_base"]["mcnemar_p"]),
    "Base right, level wrong": lambda m: fmt_count(m["vs_base"]["b"]),
    "Base wrong, level right": lambda m: fmt_count(m["vs_base"]["c"]),
}
MODEL_COLUMN = "Model"


def model_label(model: str) -> str:
    """``Base (stock model)`` or ``L4 Ultra-compact``; the validator maps labels back with ``label_model``."""
    if model == "base":
        return "Base (stock model)"
    level = LEVELS[int(model.removeprefix("level_"))]
    return f"L{level.number} {level.name}"


def label_model(label: str) -> str | None:
    match = re.match(r"^L(\d+)\b", label)
    if match:
        return f"level_{match.group(1)}"
    return "base" if label.startswith("Base") else None


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class StudyArtifacts:
    """Everything a card says, read once from the run dir."""

    metrics: dict[str, dict]
    summary: dict
    stats: dict
    training: dict[int, dict]
    examples: dict[int, dict]


def load_artifacts(config: StudyConfig, run_dir: RunDir) -> StudyArtifacts:
    """Read metrics, summary, data stats, training.json and one example output per level.

    Raises:
        ArtifactError: an artifact is missing or malformed; the message names the command that makes it.
    """
    metrics = {model: read_metrics(run_dir, model) for model in config.model_keys}
    summary = read_summary(run_dir)
    missing = [m for m in config.model_keys if m not in {row["model"] for row in summary["models"]}]
    if missing:
        raise ArtifactError(
            f"summary {run_dir.summary} has no row for {missing[0]}: rerun `cot-compress evaluate`"
        )
    stats = read_json(
        run_dir.data_stats, what="data stats", hint="run `cot-compress prepare-data` to write it"
    )
    training = {
        level: read_json(
            run_dir.training_json(level),
            what=f"training.json of level {level}",
            hint=f"run `cot-compress train --levels {level}` to train the adapter",
        )
        for level in config.levels
    }
    for level in config.levels:
        if str(level) not in stats.get("levels", {}):
            raise ArtifactError(
                f"data stats {run_dir.data_stats} have no level {level}: run `cot-compress prepare-data`"
            )
    if not run_dir.pareto_png.is_file():
        raise ArtifactError(f"the Pareto plot {run_dir.pareto_png} is missing: rerun `cot-compress evaluate`")
    examples = {level: _example(run_dir, f"level_{level}") for level in config.levels}
    return StudyArtifacts(metrics=metrics, summary=summary, stats=stats, training=training, examples=examples)


def _example(run_dir: RunDir, model: str) -> dict:
    """The card's example output: the first correct sample by (seed, id), else the first sample."""
    rows = sorted(read_samples(run_dir.samples(model), model=model), key=lambda r: (r["seed"], r["id"]))
    return next((row for row in rows if row["correct"]), rows[0])


# ---------------------------------------------------------------- context


def hub_url(config: StudyConfig) -> str:
    return PUBLIC_HUB if config.hub.endpoint == "local" else config.hub.endpoint


def _is_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[\w][\w.-]*/[\w.-]*[\w]", value)) and not Path(value).exists()


def study_links(config: StudyConfig, *, collection_url: str | None = None) -> dict[str, Any]:
    """Every URL a card may contain, by role."""
    hub = hub_url(config)
    base = config.base_model.id
    return {
        "hub": hub,
        "collection": collection_url or f"{hub}/collections/{config.hub.namespace}",
        "eval_dataset": f"{hub}/datasets/{config.eval_repo_id}",
        "adapters": {str(n): f"{hub}/{config.adapter_repo_id(n)}" for n in config.levels},
        "base_model": f"{hub}/{base}" if _is_hub_id(base) else None,
        "source_dataset": f"{hub}/datasets/{config.data.dataset_id}",
        "plot": PLOT_FILE,
    }


def _table(
    art: StudyArtifacts, columns: dict[str, Any], models: list[str], highlight: str | None
) -> dict[str, Any]:
    """A model table for the templates: header labels, and per model its label and formatted cells."""
    return {
        "columns": [MODEL_COLUMN, *columns],
        "rows": [
            {
                "model": model,
                "highlight": model == highlight,
                "cells": [model_label(model) + (" (this adapter)" if model == highlight else "")]
                + [fmt(art.metrics[model]) for fmt in columns.values()],
            }
            for model in models
        ],
    }


def results_columns(art: StudyArtifacts) -> dict[str, Any]:
    seeds = max(len(m["seeds"]) for m in art.metrics.values())
    return {**RESULT_COLUMNS, **(SEED_COLUMNS if seeds >= 2 else {})}


def training_rows(art: StudyArtifacts, level: int) -> list[tuple[str, str]]:
    """The training-details table of one adapter: (setting, value), all from training.json and stats.json."""
    t = art.training[level]
    stats = art.stats["levels"][str(level)]
    hp, adapter, hw = t["hyperparameters"], t["adapter"], t["hardware"]
    targets = adapter["target_modules"]
    dropped = ", ".join(f"{reason}: {count}" for reason, count in sorted(stats["dropped"].items())) or "none"
    hardware = "CPU" if hw["device"] == "cpu" else f"{hw['gpu_count']} × {hw['gpu_name'] or 'CUDA GPU'}"
    rows = [
        ("Base model", f"{t['base_model']['id']} (revision {t['base_model']['revision']})"),
        (
            "Quantization",
            "4-bit NF4, double quantization (bitsandbytes)" if t["quantization"] == "nf4" else "none",
        ),
        (
            "Adapter",
            f"{adapter['method']}, r = {adapter['r']}, alpha = {adapter['alpha']}, dropout = {fmt_plain(adapter['dropout'])}",
        ),
        ("Target modules", targets if isinstance(targets, str) else ", ".join(targets)),
        ("Precision", t["precision"]),
        ("Hardware", hardware),
        ("Teacher", stats.get("teacher", art.stats.get("teacher", "rule"))),
        ("Training rows", f"{stats['kept']} kept of {stats['total']} (dropped: {dropped})"),
        (
            "Reasoning length",
            f"{fmt_tokens(stats['reasoning_chars']['mean'])} chars mean, {fmt_median(stats['reasoning_chars']['median'])} median",
        ),
        (
            "Loss",
            "completion only (prompt tokens masked)"
            if t["loss"] == "completion_only"
            else "full sequence (prompt and completion)",
        ),
        ("Epochs", fmt_plain(hp["epochs"])),
        ("Steps", fmt_count(t["steps"])),
        (
            "Learning rate",
            f"{fmt_plain(hp['learning_rate'])} ({hp['lr_scheduler']}, warmup ratio {fmt_plain(hp['warmup_ratio'])})",
        ),
        ("Effective batch size", fmt_count(hp["effective_batch_size"])),
        ("Max sequence length", fmt_count(hp["max_seq_length"])),
        ("Optimizer", hp["optimizer"]),
        ("Seed", fmt_count(t["seed"])),
        ("Tokens seen", fmt_count(t["tokens_seen"])),
        ("Wall time", f"{fmt_tokens(t['wall_time_s'])} s ({fmt_tokens(t['tokens_per_s'])} tokens/s)"),
        ("Libraries", ", ".join(f"{name} {version}" for name, version in t["library_versions"].items())),
    ]
    return rows


def _level_info(level: int) -> dict[str, Any]:
    spec = LEVELS[level]
    return {
        "number": spec.number,
        "name": spec.name,
        "style": spec.style,
        "typical_length": spec.typical_length,
        "example": spec.example,
        "label": model_label(spec.key),
    }


def _caveats(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    seeds = sorted({s for m in art.metrics.values() for s in m["seeds"]})
    spot = sweet_spot(art.summary, margin=config.eval.sweet_spot_margin, alpha=SWEET_SPOT_ALPHA)
    n_problems = art.metrics["base"]["n_total"] // max(1, len(art.metrics["base"]["seeds"]))
    return {
        "seeds": ", ".join(str(s) for s in seeds),
        "n_seeds": len(seeds),
        "across_seed_sd": len(seeds) >= 2,
        "sweet_spot": None if spot is None else _level_info(int(spot.removeprefix("level_"))),
        "sweet_spot_tokens": None if spot is None else fmt_tokens(art.metrics[spot]["think_tokens"]["mean"]),
        "margin": fmt_accuracy(config.eval.sweet_spot_margin),
        "alpha": f"{SWEET_SPOT_ALPHA:.2f}",
        "synthetic_data": config.data.source == "synthetic",
        "n_problems": fmt_count(n_problems),
        "truncated": [
            {"label": model_label(model), "count": fmt_fraction(m["truncated"], m["n_total"])}
            for model, m in art.metrics.items()
            if m["truncated"]
        ],
        "max_new_tokens": fmt_count(config.eval.max_new_tokens),
    }


def study_context(
    config: StudyConfig, art: StudyArtifacts, *, collection_url: str | None = None
) -> dict[str, Any]:
    """What every template sees: the study, its links, the results, the caveats. Values are card text."""
    base = art.metrics["base"]
    return {
        "study": {
            "name": config.name,
            "title": config.title,
            "collection_title": config.hub.collection_title,
            "license": config.hub.license,
            "citation": config.hub.citation.strip(),
            "base_model": config.base_model.id,
            "base_revision": config.base_model.revision,
            "eval_repo_id": config.eval_repo_id,
            "source_dataset": config.data.dataset_id,
            "source_config": config.data.config_name,
            "source_revision": config.data.revision,
            "levels": [_level_info(n) | {"repo_id": config.adapter_repo_id(n)} for n in config.levels],
        },
        "links": study_links(config, collection_url=collection_url),
        "base": {
            "accuracy": fmt_accuracy(base["accuracy"]),
            "ci95": fmt_ci(base["ci95"]),
            "think_mean": fmt_tokens(base["think_tokens"]["mean"]),
            "n_total": fmt_count(base["n_total"]),
        },
        "caveats": _caveats(config, art),
    }


def _headline(config: StudyConfig, art: StudyArtifacts, level: int) -> dict[str, str]:
    m = art.metrics[f"level_{level}"]
    return {
        "accuracy": fmt_accuracy(m["accuracy"]),
        "ci95": fmt_ci(m["ci95"]),
        "fraction": fmt_fraction(m["n_correct"], m["n_total"]),
        "think_mean": fmt_tokens(m["think_tokens"]["mean"]),
        "think_median": fmt_median(m["think_tokens"]["median"]),
        "completion_mean": fmt_tokens(m["completion_tokens"]["mean"]),
        "delta": fmt_delta(m["vs_base"]["delta"]),
        "delta_ci95": fmt_ci(m["vs_base"]["ci95"]),
        "mcnemar_p": fmt_p(m["vs_base"]["mcnemar_p"]),
        "on_frontier": next(
            r["on_frontier"] for r in art.summary["models"] if r["model"] == f"level_{level}"
        ),
    }


def adapter_context(config: StudyConfig, art: StudyArtifacts, level: int, **links: Any) -> dict[str, Any]:
    model = f"level_{level}"
    levels = [f"level_{n}" for n in config.levels]
    example = art.examples[level]
    base_id = config.base_model.id
    return {
        **study_context(config, art, **links),
        "level": _level_info(level) | {"repo_id": config.adapter_repo_id(level)},
        "headline": _headline(config, art, level),
        "results": _table(art, results_columns(art), config.model_keys, model),
        "vs_base": _table(art, VS_BASE_COLUMNS, levels, model),
        "training": [{"setting": s, "value": v} for s, v in training_rows(art, level)],
        "example": {
            "question": example["question"],
            "completion": example["completion"],
            "id": example["id"],
        },
        "usage": {
            "base_id": base_id,
            "base_is_tiny": base_id == "tiny",
            "base_revision": config.base_model.revision,
            "adapter_id": config.adapter_repo_id(level),
            "question": EXAMPLE_QUESTION,
            "prompt": build_prompt(level, EXAMPLE_QUESTION),
            "max_new_tokens": config.eval.max_new_tokens,
            "nf4": config.base_model.quantization == "nf4",
        },
    }


SAMPLE_COLUMN_DOCS = {
    "id": "problem id (GSM8K test row, or the synthetic problem's id)",
    "question": "the problem text",
    "gold": "the reference answer, normalised",
    "prompt": "the user message sent to the model (the bare question for base, the level prompt for adapters)",
    "completion": "everything the model generated",
    "reasoning": "text strictly inside the think block (empty for base, which has none)",
    "predicted": "the extracted final answer (empty when no extractor matched)",
    "extractor": "the extractor that found the answer",
    "correct": "whether predicted equals gold",
    "think_tokens": "tokens inside the think block (base: completion tokens before the final-answer line)",
    "completion_tokens": "generated tokens up to and including end of sequence",
    "finish_reason": "stop (end of sequence) or length (hit the token limit)",
    "model": "base or level_<n>",
    "level": "compression level (empty for base)",
    "seed": "evaluation seed",
    "schema_version": "record schema version",
}
assert tuple(SAMPLE_COLUMN_DOCS) == SAMPLE_FIELDS
SUMMARY_COLUMN_DOCS = {
    "model": "base or level_<n>",
    "level": "compression level (empty for base)",
    "n_total": "graded answers (problems × seeds)",
    "n_correct": "correct answers",
    "accuracy": "n_correct / n_total",
    "ci95_low": "lower end of the Wilson 95% interval of accuracy",
    "ci95_high": "upper end of the Wilson 95% interval of accuracy",
    "think_tokens_mean": "mean think tokens",
    "think_tokens_median": "median think tokens",
    "think_tokens_p90": "90th percentile of think tokens",
    "completion_tokens_mean": "mean completion tokens",
    "completion_tokens_median": "median completion tokens",
    "tokens_per_correct": "all completion tokens / n_correct",
    "truncated": "answers that hit the token limit",
    "delta_vs_base": "accuracy minus base accuracy on the same problems (empty for base)",
    "mcnemar_p": "exact McNemar p against base (empty for base)",
    "on_frontier": "on the Pareto frontier of accuracy against mean think tokens",
}


def dataset_context(config: StudyConfig, art: StudyArtifacts, **links: Any) -> dict[str, Any]:
    return {
        **study_context(config, art, **links),
        "results": _table(art, results_columns(art), config.model_keys, None),
        "configs": [
            {"name": model, "label": model_label(model), "rows": fmt_count(art.metrics[model]["n_total"])}
            for model in config.model_keys
        ]
        + [
            {
                "name": "summary",
                "label": "one row per model: headline metrics",
                "rows": fmt_count(len(config.model_keys)),
            }
        ],
        "columns": [{"name": name, "doc": doc} for name, doc in SAMPLE_COLUMN_DOCS.items()],
        "summary_columns": [{"name": name, "doc": doc} for name, doc in SUMMARY_COLUMN_DOCS.items()],
        "split": EVAL_SPLIT,
    }


# ---------------------------------------------------------------- sandboxed templates and inert text

_MD_ESCAPE = re.compile(r"([\\`*_{}\[\]|~%#])")
_LINE_START = re.compile(r"^([-+=#>])")
_LIST_NUMBER = re.compile(r"^(\d{1,9})([.)])(?=\s|$)")


def md_inline(value: Any) -> str:
    """Free text as inert inline markdown: one line, HTML escaped, markup characters backslash-escaped.

    ``<script>`` becomes ``&lt;script&gt;``, ``{{`` becomes ``\\{\\{``, ``---`` cannot start a line
    (thematic break / front matter), and ``*``, ``_``, ``[``, ``|`` and backticks lose their meaning.
    """
    text = html.escape(" ".join(str(value).split()), quote=False)
    text = _MD_ESCAPE.sub(r"\\\1", text)
    text = re.sub(r"-{2,}", lambda m: "\\-" * len(m.group()), text)
    return _LIST_NUMBER.sub(r"\1\\\2", _LINE_START.sub(r"\\\1", text))


def code_span(value: Any) -> str:
    """Text as one inline code span (no escapes apply inside, so none are added)."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def code_block(value: Any, language: str = "") -> str:
    """Text in a fenced code block whose fence is longer than any backtick run inside it."""
    text = str(value).rstrip("\n")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def plain_text(value: Any) -> str:
    """One line of plain text (collection notes): whitespace collapsed, control characters dropped."""
    return " ".join("".join(ch for ch in str(value) if ch.isprintable() or ch.isspace()).split())


def default_templates_dir() -> Path:
    return Path(str(resources.files("cards_templates")))


def make_environment(templates_dir: Path | None = None) -> jinja2.Environment:
    """An immutable sandbox with StrictUndefined; every template must exist in ``templates_dir``.

    Raises:
        TemplateError: the directory lacks one of ``TEMPLATES`` (named).
    """
    directory = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    for name in TEMPLATES:
        if not (directory / name).is_file():
            raise TemplateError(
                f"template {name} is missing from {directory}: copy it from cards_templates/ in cot-compress and edit it"
            )
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # markdown, not HTML: free text goes through the explicit `md` filter instead
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=md_inline, code=code_span, code_block=code_block, plain=plain_text, py=repr)
    return env


def _template_line(error: BaseException, filename: str | None) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if filename and f.filename == filename]
    return f" line {frames[-1].lineno}" if frames else ""


def render_template(env: jinja2.Environment, name: str, context: dict[str, Any]) -> str:
    """Render one template; every failure is a one-line ``TemplateError`` naming the template (and line).

    Raises:
        TemplateError: syntax error, undefined (misspelled) variable, or an attempt to leave the sandbox.
    """
    try:
        template = env.get_template(name)
    except TemplateNotFound:
        raise TemplateError(
            f"template {name} not found: pass --templates with a folder that holds it"
        ) from None
    except TemplateSyntaxError as error:
        raise TemplateError(f"template {name} line {error.lineno}: syntax error: {error.message}") from None
    try:
        return template.render(context)
    except (SecurityError, OverflowError) as error:  # OverflowError: the sandbox's range() limit
        where = name + _template_line(error, template.filename)
        raise TemplateError(
            f"template {where} was refused by the sandbox ({error}): templates may only read the card variables"
        ) from None
    except TemplateNotFound as error:  # {% include %} / {% extends %} of a path outside the templates folder
        where = name + _template_line(error, template.filename)
        raise TemplateError(
            f"template {where} includes {error.name!r}, which is not a template of its folder: "
            "templates may only include templates beside them"
        ) from None
    except UndefinedError as error:
        where = name + _template_line(error, template.filename)
        raise TemplateError(
            f"template {where}: undefined variable: {error.message}; "
            f"the top-level variables are {', '.join(sorted(context))}"
        ) from None
    except TemplateSyntaxError as error:  # in a template it includes (parsed only when reached)
        raise TemplateError(
            f"template {error.name or name} (included by {name}) line {error.lineno}: syntax error: {error.message}"
        ) from None
    except RecursionError:
        raise TemplateError(
            f"template {name} includes itself, directly or through another template: remove the loop"
        ) from None


# ---------------------------------------------------------------- assembly


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
    accuracy = art.metrics[f"level_{level}"]["accuracy"]
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
                dataset_split=EVAL_SPLIT,
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
            {"config_name": name, "data_files": [{"split": EVAL_SPLIT, "path": f"{name}/{EVAL_SPLIT}-*"}]}
            for name in [*config.model_keys, "summary"]
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
) -> dict[str, RenderedCard]:
    """Render every adapter card and the eval dataset card, keyed by repo name (``{prefix}-l4``).

    Args:
        collection_url: the collection's URL when publishing already created it (``publish/state.json``);
            otherwise cards link the namespace's collections page.

    Raises:
        ArtifactError: an artifact is missing or malformed. TemplateError: a template is missing, misspells
            a variable or leaves the sandbox.
    """
    art = load_artifacts(config, run_dir)
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
    config: StudyConfig, run_dir: RunDir, *, templates_dir: Path | None = None
) -> dict[str, str]:
    """One note per collection item (L1…Ln, then the eval dataset), keyed by repo id, each one line."""
    art = load_artifacts(config, run_dir)
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


# ---------------------------------------------------------------- validation

_PLACEHOLDERS = re.compile(r"\[More Information Needed\]|\b(?:None|nan|NaN|null|TODO|inf)\b|\{\{|\{%|\{#")
_DECIMAL = re.compile(r"[-+]?\d+\.\d+")
_FRACTION = re.compile(r"\b(\d+) / (\d+)\b")
_URL = re.compile(r"https?://[^\s<>()\]\"'`]+")
_REPO_ID = re.compile(r"^[A-Za-z][\w.-]*/[\w.-]*[A-Za-z][\w.-]*$")
_MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])
REQUIRED_MODEL_KEYS = (
    "base_model",
    "base_model_relation",
    "library_name",
    "pipeline_tag",
    "license",
    "datasets",
    "model-index",
)
REQUIRED_DATASET_KEYS = ("license", "configs", "pretty_name")


def _cell(text: str) -> str:
    """A table cell as text: emphasis and backslash escapes removed, entities decoded."""
    text = text.strip()
    while text.startswith("**") and text.endswith("**") and len(text) > 4:
        text = text[2:-2].strip()
    return html.unescape(re.sub(r"\\(.)", r"\1", text))


@dataclass
class _Parsed:
    tables: list[tuple[list[str], list[list[str]]]]
    prose: list[str]
    fences: list[tuple[str, str]]
    links: list[str]
    code_spans: list[str]
    html: list[str]


def _parse_body(body: str) -> _Parsed:
    parsed = _Parsed([], [], [], [], [], [])
    table: tuple[list[str], list[list[str]]] | None = None
    row: list[str] = []
    in_cell = False
    for token in _MD.parse(body):
        if token.type == "table_open":
            table = ([], [])
        elif token.type == "table_close" and table is not None:
            parsed.tables.append(table)
            table = None
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and table is not None:
            (table[1].append(row) if table[0] else table[0].extend(row))
        elif token.type in ("th_open", "td_open"):
            in_cell = True
        elif token.type in ("th_close", "td_close"):
            in_cell = False
        elif token.type == "fence":
            parsed.fences.append((token.info.strip(), token.content))
        elif token.type == "code_block":
            parsed.fences.append(("", token.content))
        elif token.type == "html_block":
            parsed.html.append(token.content.strip())
        elif token.type == "inline":
            if in_cell:
                row.append(token.content)
            else:
                parsed.prose.append(token.content)
            for child in token.children or []:
                if child.type == "link_open":
                    parsed.links.append(str(child.attrs.get("href", "")))
                elif child.type == "image":
                    parsed.links.append(str(child.attrs.get("src", "")))
                elif child.type == "code_inline":
                    parsed.code_spans.append(child.content)
                elif child.type == "html_inline":
                    parsed.html.append(child.content)
                elif child.type == "text":
                    parsed.links.extend(_URL.findall(child.content))
    return parsed


def _allowed(config: StudyConfig) -> tuple[set[str], list[str]]:
    """Repo ids and URL prefixes that count as inside the study."""
    links = study_links(config)
    repo_ids = {config.eval_repo_id, config.data.dataset_id, config.base_model.id}
    repo_ids |= {config.adapter_repo_id(n) for n in config.levels}
    exact = [links["eval_dataset"], links["source_dataset"], *links["adapters"].values()]
    if links["base_model"]:
        exact.append(links["base_model"])
    return repo_ids, exact


def _link_problem(url: str, config: StudyConfig, exact: list[str]) -> str | None:
    if url == PLOT_FILE:
        return None
    collections = f"{hub_url(config)}/collections/{config.hub.namespace}"
    if url == collections or url.startswith(collections + "/"):
        return None
    if any(url == prefix or url.startswith(prefix + "/") for prefix in exact):
        return None
    return f"link {url} points outside the study (allowed: its repos, the base model, {config.data.dataset_id}, the collection)"


def _check_table(
    header: list[str], rows: list[list[str]], expected: dict[str, dict[str, str]], what: str
) -> list[str]:
    problems = []
    for row in rows:
        label = _cell(row[0])
        model = label_model(label)
        if model not in expected:
            problems.append(f"{what} row {label!r} is not a model of this study")
            continue
        for column, cell in zip(header[1:], row[1:], strict=False):
            want = expected[model].get(column)
            shown = _cell(cell)
            if want is None:
                problems.append(
                    f"{what} column {column!r} is not one render-cards can check against the artifacts"
                )
            elif shown != want:
                problems.append(
                    f"{what} row {label!r} column {column!r} shows {shown}, the artifacts give {want}"
                )
    return problems


def _expected(
    metrics: dict[str, dict], columns: dict[str, Any], models: list[str]
) -> dict[str, dict[str, str]]:
    return {model: {name: fmt(metrics[model]) for name, fmt in columns.items()} for model in models}


def _string_leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _string_leaves(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _string_leaves(v)]
    return [value] if isinstance(value, str) else []


def _check_numbers(
    parsed: _Parsed, context: dict[str, Any], metrics: dict[str, dict], checked_tables: set[int]
) -> list[str]:
    """Decimals and ``k / n`` counts in prose (and unrecognised tables) must be artifact values."""
    # The example output is model text inside a code block: its numbers prove nothing about the card's.
    strings = _string_leaves({key: value for key, value in context.items() if key != "example"})
    allowed = {d for s in strings for d in _DECIMAL.findall(s)}
    fractions = {(int(k), int(n)) for s in strings for k, n in _FRACTION.findall(s)}
    texts = list(parsed.prose)
    texts += [
        c
        for i, (h, rows) in enumerate(parsed.tables)
        if i not in checked_tables
        for r in [h, *rows]
        for c in r
    ]
    problems = []
    for text in texts:
        plain = _cell(text)
        for number in _DECIMAL.findall(plain):
            if number not in allowed:
                problems.append(f"number {number} in {plain[:60]!r} is not any artifact value")
        for k, n in _FRACTION.findall(plain):
            if (int(k), int(n)) not in fractions:
                problems.append(f"count {k} / {n} in {plain[:60]!r} is not any artifact count")
    return problems


def _check_text(body: str, parsed: _Parsed) -> list[str]:
    problems = []
    for text in parsed.prose + [c for h, rows in parsed.tables for r in [h, *rows] for c in r]:
        found = _PLACEHOLDERS.search(text)
        if found:
            problems.append(f"placeholder text {found.group()!r} in {text[:60]!r}")
    for header, rows in parsed.tables:
        for row in rows:
            if len(row) != len(header) or any(not _cell(cell) for cell in row):
                problems.append(
                    f"empty table cell in row {_cell(row[0]) if row else ''!r} of table {header[:2]}"
                )
    if parsed.html:
        problems.append(
            f"raw HTML {parsed.html[0][:40]!r} in the card: free text must go through the md filter"
        )
    if not body.strip():
        problems.append("the card body is empty")
    return problems


def _check_links(parsed: _Parsed, config: StudyConfig) -> list[str]:
    repo_ids, exact = _allowed(config)
    problems = [p for url in parsed.links if (p := _link_problem(url, config, exact))]
    for span in parsed.code_spans:
        if _REPO_ID.match(span) and span not in repo_ids:
            problems.append(f"repo id {span} is not a repo of this study")
    return problems


def _check_snippets(parsed: _Parsed, config: StudyConfig, repo_id: str) -> list[str]:
    """Every python block parses and names only study repos; the first one loads this card's repo."""
    snippets = [code for info, code in parsed.fences if info == "python"]
    if not snippets:
        return ["the card has no python usage snippet"]
    repo_ids, exact = _allowed(config)
    problems: list[str] = []
    for number, snippet in enumerate(snippets, start=1):
        try:
            tree = ast.parse(snippet)
        except SyntaxError as error:
            problems.append(f"python snippet {number} is not valid Python (line {error.lineno}: {error.msg})")
            continue
        strings = [
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        for value in strings:
            if _URL.fullmatch(value) and _link_problem(value, config, exact):
                problems.append(f"python snippet {number} links {value}, outside the study")
            elif _REPO_ID.match(value) and value not in repo_ids:
                problems.append(f"python snippet {number} names repo {value}, not a repo of this study")
        if number == 1 and repo_id not in strings:
            problems.append(f"the usage snippet does not load {repo_id}")
    return problems


def _check_model_metadata(
    card: ModelCard, config: StudyConfig, level: int, metrics: dict[str, dict]
) -> list[str]:
    data = card.data.to_dict()
    problems = [f"front matter lacks {key!r}" for key in REQUIRED_MODEL_KEYS if not data.get(key)]
    wanted = {
        "base_model": config.base_model.id,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": config.hub.license,
    }
    problems += [
        f"front matter {k} is {data.get(k)!r}, expected {v!r}"
        for k, v in wanted.items()
        if data.get(k) and data.get(k) != v
    ]
    repo_ids, _ = _allowed(config)
    problems += [
        f"front matter dataset {d} is not a dataset of this study"
        for d in data.get("datasets") or []
        if d not in repo_ids
    ]
    results = card.data.eval_results or []
    accuracy = metrics[f"level_{level}"]["accuracy"]
    if not results:
        problems.append("front matter model-index has no eval results")
    for result in results:
        where = f"model-index {result.metric_type} on {result.dataset_type}"
        if result.metric_type == "accuracy" and result.metric_value != accuracy:
            problems.append(
                f"{where} is {result.metric_value!r}, metrics.json gives {accuracy!r} ({fmt_accuracy(accuracy)})"
            )
        if result.dataset_type != config.data.dataset_id or result.dataset_revision != config.data.revision:
            problems.append(
                f"{where} names dataset {result.dataset_type}@{result.dataset_revision}, expected "
                f"{config.data.dataset_id}@{config.data.revision}"
            )
    return problems


def _check_dataset_metadata(card: DatasetCard, config: StudyConfig) -> list[str]:
    data = card.data.to_dict()
    problems = [f"front matter lacks {key!r}" for key in REQUIRED_DATASET_KEYS if not data.get(key)]
    if data.get("license") and data["license"] != config.hub.license:
        problems.append(f"front matter license is {data['license']!r}, expected {config.hub.license!r}")
    names = [c.get("config_name") for c in data.get("configs") or []]
    expected = [*config.model_keys, "summary"]
    if data.get("configs") and names != expected:
        problems.append(f"front matter configs are {names}, expected {expected}")
    return problems


def validate_card(rendered: RenderedCard, *, config: StudyConfig, run_dir: RunDir) -> list[str]:
    """Every problem of one rendered card, checked against the artifacts read fresh from ``run_dir``.

    Checks: front matter parses with the required keys and values; no placeholder text, raw HTML or
    empty cells; every results/comparison/training table cell and model-index value equals the artifact
    value through the shared formatting; decimals and counts in prose are artifact values; metrics.json
    agrees with samples.jsonl; every link and repo id is inside the study; the usage snippet parses.
    """
    problems: list[str] = []
    card_class = ModelCard if rendered.repo_type == "model" else DatasetCard
    try:
        card = card_class(rendered.text)
    except Exception as error:  # noqa: BLE001 - any parse failure of the front matter is a card problem
        return [f"front matter does not parse: {' '.join(str(error).split())[:120]}"]
    try:
        art = load_artifacts(config, run_dir)
    except ArtifactError as error:
        return [str(error)]
    parsed = _parse_body(card.text)
    problems += _check_text(card.text, parsed)
    problems += _check_links(parsed, config)
    problems += _check_snippets(parsed, config, rendered.repo_id)
    columns = results_columns(art)
    expected_results = _expected(art.metrics, columns, config.model_keys)
    levels = [f"level_{n}" for n in config.levels]
    checked: set[int] = set()
    found_results = False
    if rendered.repo_type == "model":
        level = next((n for n in config.levels if config.adapter_repo_id(n) == rendered.repo_id), None)
        if level is None:
            return problems + [f"{rendered.repo_id} is not an adapter repo of this study"]
        problems += _check_model_metadata(card, config, level, art.metrics)
        context = adapter_context(config, art, level)
        training = dict(training_rows(art, level))
    else:
        problems += _check_dataset_metadata(card, config)
        context = dataset_context(config, art)
        training = {}
    for index, (header, rows) in enumerate(parsed.tables):
        names = [_cell(h) for h in header]
        if names[:1] == [MODEL_COLUMN] and "Accuracy" in names:
            found_results = True
            missing = [
                model_label(m) for m in config.model_keys if m not in {label_model(_cell(r[0])) for r in rows}
            ]
            problems += [f"results table lacks the row of {label}" for label in missing]
            problems += _check_table(names, rows, expected_results, "results table")
        elif names[:1] == [MODEL_COLUMN] and any(n in VS_BASE_COLUMNS for n in names):
            problems += _check_table(
                names, rows, _expected(art.metrics, VS_BASE_COLUMNS, levels), "comparison table"
            )
        elif names == ["Setting", "Value"] and training:
            for row in rows:
                setting, value = _cell(row[0]), _cell(row[1]) if len(row) > 1 else ""
                want = " ".join(training[setting].split()) if setting in training else None
                if want is None:
                    problems.append(f"training table setting {setting!r} is not one render-cards can check")
                elif value != want:
                    problems.append(f"training table {setting!r} shows {value}, training.json gives {want}")
        else:
            continue
        checked.add(index)
    if not found_results:
        problems.append("the card has no results table (a table with columns 'Model' and 'Accuracy')")
    problems += _check_numbers(parsed, context, art.metrics, checked)
    # Last, so that a card/metrics mismatch (which names the number) is reported first.
    for model in config.model_keys:
        try:
            check_metrics_match_samples(run_dir, model)
        except ArtifactError as error:
            problems.append(str(error))
    return problems


def validate_note(repo_id: str, text: str, *, config: StudyConfig, run_dir: RunDir) -> list[str]:
    """Problems of one collection note: length, placeholders, its level, and its numbers."""
    problems = []
    if not text.strip():
        return ["the note is empty"]
    if len(text) > NOTE_MAX_CHARS:
        problems.append(f"the note has {len(text)} characters, the Hub allows {NOTE_MAX_CHARS}")
    if (found := _PLACEHOLDERS.search(text)) is not None:
        problems.append(f"placeholder text {found.group()!r} in the note")
    art = load_artifacts(config, run_dir)
    level = next((n for n in config.levels if config.adapter_repo_id(n) == repo_id), None)
    if level is not None:
        context = adapter_context(config, art, level)
        m = art.metrics[f"level_{level}"]
        if f"L{level}" not in text and f"Level {level}" not in text:
            problems.append(f"the note does not state its level (L{level})")
        for shown, want in (
            (fmt_accuracy(m["accuracy"]), "accuracy"),
            (fmt_tokens(m["think_tokens"]["mean"]), "mean think tokens"),
        ):
            if shown not in text:
                problems.append(f"the note does not state its {want} {shown}")
    elif repo_id == config.eval_repo_id:
        context = dataset_context(config, art)
    else:
        return [f"{repo_id} is not a repo of this study"]
    parsed = _Parsed([], [text], [], [], [], [])
    return problems + _check_numbers(parsed, context, art.metrics, set())


def _problems(cards, *, config, run_dir, notes) -> list[tuple[str, str]]:
    found = [
        (name, p) for name, card in cards.items() for p in validate_card(card, config=config, run_dir=run_dir)
    ]
    for repo_id, text in (notes or {}).items():
        found += [
            (f"note {repo_id}", p) for p in validate_note(repo_id, text, config=config, run_dir=run_dir)
        ]
    return found


def all_problems(
    cards: dict[str, RenderedCard],
    *,
    config: StudyConfig,
    run_dir: RunDir,
    notes: dict[str, str] | None = None,
) -> list[str]:
    """Every problem of every card and note, each prefixed with the card's repo name (for listing)."""
    return [
        f"{where}: {problem}"
        for where, problem in _problems(cards, config=config, run_dir=run_dir, notes=notes)
    ]


def validate_all(
    cards: dict[str, RenderedCard],
    *,
    config: StudyConfig,
    run_dir: RunDir,
    notes: dict[str, str] | None = None,
) -> None:
    """Validate every card (and note); any problem stops publishing.

    Raises:
        CardValidationError: one line naming the card and its first problem, with the total count.
    """
    found = _problems(cards, config=config, run_dir=run_dir, notes=notes)
    if found:
        where, first = found[0]
        raise CardValidationError(
            f"card {where}: {first} ({len(found)} problem(s) in all; `cot-compress render-cards` lists them: "
            "fix the template or the artifacts, then render again)"
        )


def collection_url_from_state(config: StudyConfig, run_dir: RunDir) -> str | None:
    """The collection's URL from ``publish/state.json`` once publishing created it, else None.

    Reads the collection slug stored there as ``collection_slug`` or ``collection.slug``.
    """
    if not run_dir.publish_state.is_file():
        return None
    state = read_json(run_dir.publish_state, what="publish state", hint="delete it and publish again")
    nested = state.get("collection") if isinstance(state, dict) else None
    slug = (state.get("collection_slug") if isinstance(state, dict) else None) or (
        nested.get("slug") if isinstance(nested, dict) else None
    )
    return f"{hub_url(config)}/collections/{slug}" if slug else None
