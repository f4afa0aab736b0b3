"""The run dir's artifacts, read once, and the template context every card and note is rendered from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_artifacts.arithmetic import chain_checks_out
from eval_artifacts.hub_dataset import SAMPLE_COLUMNS, SPLIT, SUMMARY_COLUMNS, SUMMARY_CONFIG
from eval_artifacts.metrics import check_metrics_match_samples, read_metrics
from eval_artifacts.records import model_level, other_seed_of, read_samples
from eval_artifacts.rundir import RunDir, read_json
from eval_artifacts.study.config import LOCAL_ENDPOINT, StudyConfig
from eval_artifacts.study.errors import ArtifactError
from eval_artifacts.study.levels import LEVELS, STOCK_ANSWER_LINES, build_prompt
from eval_artifacts.summary import SWEET_SPOT_ALPHA, read_summary, sweet_spot
from hub_tools.cards.format import (
    CI_METHODS,
    MODEL_COLUMN,
    RESULT_COLUMNS,
    TEST_NAMES,
    TRAINING_SEED_COLUMNS,
    VS_BASE_COLUMNS,
    branch_of,
    fmt_accuracy,
    fmt_ci,
    fmt_count,
    fmt_delta,
    fmt_fraction,
    fmt_mean_sd,
    fmt_median,
    fmt_p,
    fmt_plain,
    fmt_tokens,
    model_label,
)

PUBLIC_HUB = "https://huggingface.co"
# Cards link the plot relative to their repo, where publishing uploads it under this name.
PLOT_FILE = "pareto.png"
EXAMPLE_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
SAMPLE_COLUMN_DOCS = {column.name: column.doc for column in SAMPLE_COLUMNS}
SUMMARY_COLUMN_DOCS = {column.name: column.doc for column in SUMMARY_COLUMNS}


@dataclass(frozen=True)
class StudyArtifacts:
    """Everything a card says, read once from the run dir, and whether metrics agree with their samples."""

    metrics: dict[str, dict]
    summary: dict
    stats: dict
    training: dict[int, dict]
    examples: dict[int, dict | None]
    # One message per model whose metrics.json disagrees with its samples.jsonl. Collected, not raised:
    # a card rendered from such metrics must still render, so that validation can name the disagreement.
    sample_mismatches: tuple[str, ...]


def load_artifacts(config: StudyConfig, run_dir: RunDir) -> StudyArtifacts:
    """Read metrics, summary, data stats, training.json and one example output per level, then check
    every model's metrics against its samples.

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
    examples = {level: _example(run_dir, LEVELS[level].key) for level in config.levels}
    return StudyArtifacts(
        metrics=metrics,
        summary=summary,
        stats=stats,
        training=training,
        examples=examples,
        sample_mismatches=tuple(
            mismatch for model in config.model_keys if (mismatch := _sample_mismatch(run_dir, model))
        ),
    )


def _example(run_dir: RunDir, model: str) -> dict | None:
    """The card's example output: the first correct sample by (seed, id) whose chain's arithmetic checks out
    (``chain_checks_out``: every equation holds and the chain ends at the answer); None when none does.

    A right answer is not enough: two arithmetic errors can cancel (``s=14+5=18→a=18-8=11``).
    """
    rows = sorted(read_samples(run_dir.samples(model), model=model), key=lambda r: (r["seed"], r["id"]))
    checked = (row for row in rows if row["correct"] and chain_checks_out(row["reasoning"], row["predicted"]))
    return next(checked, None)


def _sample_mismatch(run_dir: RunDir, model: str) -> str | None:
    try:
        check_metrics_match_samples(run_dir, model)
    except ArtifactError as error:
        return str(error)
    return None


def hub_url(config: StudyConfig) -> str:
    """The Hub the cards link: ``hub.endpoint``, or the public Hub for the embedded local one (so that the
    cards do not change with the local server's port)."""
    return PUBLIC_HUB if config.hub.endpoint == LOCAL_ENDPOINT else config.hub.endpoint


def collections_url(config: StudyConfig, owner_or_slug: str) -> str:
    """A namespace's collections page, or one collection by its slug."""
    return f"{hub_url(config)}/collections/{owner_or_slug}"


def _is_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[\w][\w.-]*/[\w.-]*[\w]", value)) and not Path(value).exists()


def study_links(config: StudyConfig, *, collection_url: str | None = None) -> dict[str, Any]:
    """Every URL a card may contain, by role.

    The collection's URL is known only once publishing created it; until then the card links the
    namespace's collections page and names the collection by its title.
    """
    hub = hub_url(config)
    base = config.base_model.id
    return {
        "hub": hub,
        "collection": collection_url or collections_url(config, config.hub.namespace),
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
    return RESULT_COLUMNS


def table_models(config: StudyConfig) -> list[str]:
    """An adapter card's results table: base, the published adapters and the prompt-only baselines (the other
    training seeds' adapters have their own table)."""
    return [model for model in config.model_keys if other_seed_of(model) is None]


def seed_spread(art: StudyArtifacts, level: int) -> dict[str, Any]:
    """The level's ``training_seeds`` entry of summary.json."""
    return next(entry for entry in art.summary["training_seeds"] if entry["level"] == level)


def _training_seeds(config: StudyConfig, art: StudyArtifacts, level: int) -> dict[str, Any]:
    spread = seed_spread(art, level)
    models = spread["models"]
    return {
        "count": len(models),
        "seeds": ", ".join(fmt_count(seed) for seed in spread["training_seeds"]),
        "first": fmt_count(config.first_training_seed),
        "accuracy": fmt_mean_sd(spread["accuracy"], fmt_accuracy),
        "think_mean": fmt_mean_sd(spread["think_tokens_mean"], fmt_tokens),
        "table": _table(art, TRAINING_SEED_COLUMNS, models, LEVELS[level].key),
        "branches": [
            {
                "name": branch_of(model),
                "seed": fmt_count(art.metrics[model]["training_seed"]),
                "accuracy": fmt_accuracy(art.metrics[model]["accuracy"]),
                "ci95": fmt_ci(art.metrics[model]["ci95"]),
                "think_mean": fmt_tokens(art.metrics[model]["think_tokens"]["mean"]),
            }
            for model in models[1:]
        ],
    }


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


def _decoding(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    """How the answers were drawn, and the interval method the metrics used."""
    sampling = config.eval.sampling
    base = art.metrics["base"]
    return {
        "sampled": sampling is not None,
        "temperature": None if sampling is None else fmt_plain(sampling.temperature),
        "top_p": None if sampling is None else fmt_plain(sampling.top_p),
        "top_k": None if sampling is None else fmt_count(sampling.top_k),
        "draws": fmt_count(base["samples_per_problem"]),
        "eval_seeds": ", ".join(fmt_count(seed) for seed in base["seeds"]),
        "ci_method": CI_METHODS[base["ci_method"]],
    }


def _caveats(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    spot = sweet_spot(art.summary, margin=config.eval.sweet_spot_margin, alpha=SWEET_SPOT_ALPHA)
    n_problems = art.metrics["base"]["n_problems"]
    return {
        "decoding": _decoding(config, art),
        "prompt_baselines": config.eval.prompt_baselines,
        "sweet_spot": None if spot is None else _level_info(model_level(spot)),
        "sweet_spot_tokens": None if spot is None else fmt_tokens(art.metrics[spot]["think_tokens"]["mean"]),
        "margin": fmt_accuracy(config.eval.sweet_spot_margin),
        "alpha": f"{SWEET_SPOT_ALPHA:.2f}",
        "synthetic_data": config.data.source == "synthetic",
        "n_problems": fmt_count(n_problems),
        "truncated": [
            {
                "label": model_label(model),
                "count": fmt_fraction(m["truncated"], m["n_total"]),
                "unanswered": fmt_fraction(m["n_truncated"], m["n_total"]),
            }
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
            "accuracy_lenient": fmt_accuracy(base["accuracy_lenient"]),
            "ci95": fmt_ci(base["ci95"]),
            "think_mean": fmt_tokens(base["think_tokens"]["mean"]),
            "n_total": fmt_count(base["n_total"]),
        },
        "caveats": _caveats(config, art),
        "grading": {"stock_answer_lines": fmt_count(STOCK_ANSWER_LINES)},
    }


def _comparison(comparison: dict | None) -> dict[str, str] | None:
    if comparison is None:
        return None
    return {
        "delta": fmt_delta(comparison["delta"]),
        "ci95": fmt_ci(comparison["ci95"]),
        "p": fmt_p(comparison["p_value"]),
        "test": TEST_NAMES[comparison["test"]],
    }


def _headline(config: StudyConfig, art: StudyArtifacts, level: int) -> dict[str, Any]:
    model = LEVELS[level].key
    m = art.metrics[model]
    return {
        "accuracy": fmt_accuracy(m["accuracy"]),
        "ci95": fmt_ci(m["ci95"]),
        "fraction": fmt_fraction(m["n_correct"], m["n_total"]),
        "accuracy_lenient": fmt_accuracy(m["accuracy_lenient"]),
        "think_mean": fmt_tokens(m["think_tokens"]["mean"]),
        "think_median": fmt_median(m["think_tokens"]["median"]),
        "completion_mean": fmt_tokens(m["completion_tokens"]["mean"]),
        "delta": fmt_delta(m["vs_base"]["delta"]),
        "delta_ci95": fmt_ci(m["vs_base"]["ci95"]),
        "p": fmt_p(m["vs_base"]["p_value"]),
        "test": TEST_NAMES[m["vs_base"]["test"]],
        "vs_prompt": _comparison(m["vs_prompt"]),
        "on_frontier": next(r["on_frontier"] for r in art.summary["models"] if r["model"] == model),
    }


def compared_models(config: StudyConfig) -> list[str]:
    """The comparison-with-base table: published adapters, then prompt-only baselines."""
    return [model for model in table_models(config) if model != "base"]


def adapter_context(config: StudyConfig, art: StudyArtifacts, level: int, **links: Any) -> dict[str, Any]:
    model = LEVELS[level].key
    example = art.examples[level]
    base_id = config.base_model.id
    return {
        **study_context(config, art, **links),
        "level": _level_info(level) | {"repo_id": config.adapter_repo_id(level)},
        "headline": _headline(config, art, level),
        "results": _table(art, results_columns(art), table_models(config), model),
        "vs_base": _table(art, VS_BASE_COLUMNS, compared_models(config), model),
        "training_seeds": _training_seeds(config, art, level),
        "training": [{"setting": s, "value": v} for s, v in training_rows(art, level)],
        "example": None
        if example is None
        else {"question": example["question"], "completion": example["completion"], "id": example["id"]},
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
                "name": SUMMARY_CONFIG,
                "label": "one row per model: headline metrics",
                "rows": fmt_count(len(config.model_keys)),
            }
        ],
        "columns": [{"name": name, "doc": doc} for name, doc in SAMPLE_COLUMN_DOCS.items()],
        "summary_columns": [{"name": name, "doc": doc} for name, doc in SUMMARY_COLUMN_DOCS.items()],
        "split": SPLIT,
    }
