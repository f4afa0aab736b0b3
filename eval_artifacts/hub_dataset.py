"""The Hub eval dataset: one config per model (split ``test``, one row per sample) plus ``summary``.

And its inverse, for ``regenerate-cards --from-hub``: the dataset's configs written back into a run
directory as samples.jsonl files, with metrics recomputed from them (never trusted from the Hub).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from eval_artifacts.metrics import (
    check_metrics_match_samples,
    compute_model_metrics,
    model_level,
    prompt_baseline_of,
    sft_sibling_of,
    sort_models,
    write_metrics,
)
from eval_artifacts.records import (
    MODEL_NAMES,
    MODEL_RE,
    SAMPLE_COLUMNS,
    Column,
    columns_of,
    described,
    read_samples,
    row_key,
    validate_record,
)
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.errors import ArtifactError
from eval_artifacts.summary import build_summary

SPLIT = "test"
SUMMARY_CONFIG = "summary"


@dataclass(frozen=True)
class SummaryRow:
    """One row of the ``summary`` config: a model's headline numbers, flattened for a table."""

    model: str = described("base, level_<n>, level_<n>_seed<s> or prompt_l<n>")
    kind: str = described("base, adapter, or prompt (prompt-only baseline: base model, level prompt, no adapter)")
    level: int | None = described("compression level (empty for base)")
    training_seed: int | None = described("the adapter's training seed (empty for base and prompt-only)")
    n_problems: int = described("problems evaluated")
    samples_per_problem: int = described("draws per problem (evaluation seeds × samples; 1 when greedy)")
    n_total: int = described("graded answers (problems × draws)")
    n_correct: int = described("correct answers, graded strictly (the samples' correct)")
    accuracy: float = described("strict accuracy: mean over problems of each problem's mean correctness")
    ci95_low: float = described("lower end of the 95% interval of accuracy (see ci_method)")
    ci95_high: float = described("upper end of the 95% interval of accuracy (see ci_method)")
    ci_method: str = described("wilson (one draw per problem) or wilson_clustered (by problem, at n_eff)")
    n_correct_lenient: int = described("correct answers by the lenient rule (the samples' correct_lenient)")
    accuracy_lenient: float = described("n_correct_lenient / n_total")
    n_no_answer: int = described("answers graded no_answer: finished without a final answer")
    n_truncated: int = described("answers graded truncated: cut by the token limit before a final answer")
    think_tokens_mean: float = described("mean think tokens")
    think_tokens_median: float = described("median think tokens")
    think_tokens_p90: float = described("90th percentile of think tokens")
    completion_tokens_mean: float = described("mean completion tokens")
    completion_tokens_median: float = described("median completion tokens")
    tokens_per_correct: float | None = described("all completion tokens / n_correct")
    truncated: int = described("answers that hit the token limit, with or without a final answer")
    delta_vs_base: float | None = described(
        "accuracy minus base accuracy on the same problems (empty for base)"
    )
    test_vs_base: str | None = described("paired test against base: mcnemar_exact or paired_t (empty for base)")
    p_value_vs_base: float | None = described("p of the paired test against base (empty for base)")
    delta_vs_prompt: float | None = described(
        "adapters: accuracy minus their level's prompt-only baseline on the same problems"
    )
    p_value_vs_prompt: float | None = described("adapters: p of the paired test against the prompt-only baseline")
    on_frontier: bool = described("on the Pareto frontier of accuracy against mean think tokens")


SUMMARY_COLUMNS = columns_of(SummaryRow)
_HUB_DTYPES = {str: "string", int: "int64", float: "float64", bool: "bool"}


def hub_features(columns: tuple[Column, ...]) -> datasets.Features:
    """Explicit Hub types, so that a column that is all None (``reasoning`` of the stock model, ``level`` of
    base) or an empty split still has a type on the Hub and reads back as None, not as a guessed null column."""
    return datasets.Features({column.name: datasets.Value(_HUB_DTYPES[column.kind]) for column in columns})


SAMPLE_FEATURES = hub_features(SAMPLE_COLUMNS)
SUMMARY_FEATURES = hub_features(SUMMARY_COLUMNS)


def summary_rows(summary: dict) -> list[dict[str, Any]]:
    """Flatten summary.json's models into the ``summary`` config's rows (one per model)."""
    rows = []
    for entry in summary["models"]:
        vs_base = entry["vs_base"] or {}
        vs_prompt = entry["vs_prompt"] or {}
        row = SummaryRow(
            model=entry["model"],
            kind=entry["kind"],
            level=entry["level"],
            training_seed=entry["training_seed"],
            n_problems=entry["n_problems"],
            samples_per_problem=entry["samples_per_problem"],
            n_total=entry["n_total"],
            n_correct=entry["n_correct"],
            accuracy=entry["accuracy"],
            ci95_low=entry["ci95"][0],
            ci95_high=entry["ci95"][1],
            ci_method=entry["ci_method"],
            n_correct_lenient=entry["n_correct_lenient"],
            accuracy_lenient=entry["accuracy_lenient"],
            n_no_answer=entry["n_no_answer"],
            n_truncated=entry["n_truncated"],
            think_tokens_mean=entry["think_tokens"]["mean"],
            think_tokens_median=entry["think_tokens"]["median"],
            think_tokens_p90=entry["think_tokens"]["p90"],
            completion_tokens_mean=entry["completion_tokens"]["mean"],
            completion_tokens_median=entry["completion_tokens"]["median"],
            tokens_per_correct=entry["tokens_per_correct"],
            truncated=entry["truncated"],
            delta_vs_base=vs_base.get("delta"),
            test_vs_base=vs_base.get("test"),
            p_value_vs_base=vs_base.get("p_value"),
            delta_vs_prompt=vs_prompt.get("delta"),
            p_value_vs_prompt=vs_prompt.get("p_value"),
            on_frontier=entry["on_frontier"],
        )
        rows.append(dataclasses.asdict(row))
    return rows


def _columns(rows: list[dict], features: datasets.Features) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in features}


def _row_order(row: dict) -> tuple:
    return row["id"], row["seed"], row.get("sample", 0)


def build_eval_dataset(run_dir: RunDir, *, models: list[str]) -> dict[str, datasets.DatasetDict]:
    """The eval dataset's configs: ``{model: DatasetDict(test=samples), "summary": DatasetDict(test=...)}``,
    each model's rows sorted by id (then seed and sample).

    Metrics are checked against their samples first, so a dataset is never built from stale numbers.
    """
    configs: dict[str, datasets.DatasetDict] = {}
    for model in models:
        check_metrics_match_samples(run_dir, model)
        # Sorted, not in generation order: every model's config lists the problems alike, ready to join on id.
        rows = sorted(read_samples(run_dir.samples(model), model=model), key=_row_order)
        split = datasets.Dataset.from_dict(_columns(rows, SAMPLE_FEATURES), features=SAMPLE_FEATURES)
        configs[model] = datasets.DatasetDict({SPLIT: split})
    summary = build_summary(run_dir, study=run_dir.root.name, models=models)
    table = datasets.Dataset.from_dict(
        _columns(summary_rows(summary), SUMMARY_FEATURES), features=SUMMARY_FEATURES
    )
    configs[SUMMARY_CONFIG] = datasets.DatasetDict({SPLIT: table})
    return configs


def samples_from_eval_dataset(configs: dict[str, datasets.DatasetDict]) -> dict[str, list[dict[str, Any]]]:
    """Sample rows of every model config, validated against the record schema (``summary`` skipped).

    Raises:
        ArtifactError: a config lacks the ``test`` split, a row breaks the schema, or a row's model is
            not its config's name.
    """
    samples: dict[str, list[dict[str, Any]]] = {}
    for name, dataset_dict in configs.items():
        if name == SUMMARY_CONFIG:
            continue
        if not MODEL_RE.match(name):
            raise ArtifactError(f"eval dataset config {name!r} is not a model name ({MODEL_NAMES})")
        if SPLIT not in dataset_dict:
            raise ArtifactError(
                f"eval dataset config {name!r} has no {SPLIT!r} split: push the eval dataset again"
            )
        rows = []
        seen: set[tuple[str, int, int]] = set()
        for number, raw in enumerate(dataset_dict[SPLIT].to_list(), start=1):
            row = validate_record(raw, path=f"eval dataset config {name!r}", line=number)
            if row["model"] != name:
                raise ArtifactError(
                    f"eval dataset config {name!r} row {number} is for model {row['model']!r}: push the eval dataset again"
                )
            if row_key(row) in seen:
                raise ArtifactError(
                    f"eval dataset config {name!r} row {number} duplicates id {row['id']!r} seed {row['seed']} "
                    f"sample {row['sample']}: push the eval dataset again"
                )
            seen.add(row_key(row))
            rows.append(row)
        samples[name] = rows
    if not samples:
        raise ArtifactError("the eval dataset has no model configs: push it with `cot-compress push-eval`")
    return samples


def _write_samples(path: Path, rows: list[dict]) -> None:
    """Replace a samples.jsonl atomically with exactly these rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
    ) as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(handle.name, path)


def _check_summary_config(configs: dict[str, datasets.DatasetDict], fresh: dict[str, dict]) -> None:
    """The dataset's own summary rows must agree with the metrics recomputed from its samples."""
    if SUMMARY_CONFIG not in configs or SPLIT not in configs[SUMMARY_CONFIG]:
        return
    for row in configs[SUMMARY_CONFIG][SPLIT].to_list():
        metrics = fresh.get(row["model"])
        for field in ("n_total", "n_correct", "accuracy", "n_correct_lenient", "accuracy_lenient") if metrics else ():
            if row[field] != metrics[field]:
                raise ArtifactError(
                    f"eval dataset summary row {row['model']!r} field '{field}' is {row[field]!r} but its samples "
                    f"give {metrics[field]!r}: push the eval dataset again with `cot-compress push-eval`"
                )


def restore_run_dir_from_eval_dataset(run_dir: RunDir, configs: dict[str, datasets.DatasetDict]) -> list[str]:
    """Write the dataset's samples into ``run_dir`` and recompute every model's metrics.json.

    Everything is checked before anything is written (schema, duplicates, a ``base`` config, and the
    ``summary`` config's counts against the recomputed metrics), so a bad dataset leaves the run dir as it was.

    Returns:
        The restored models, base first.
    """
    samples = samples_from_eval_dataset(configs)
    models = sort_models(samples)
    if models[0] != "base":
        raise ArtifactError("the eval dataset has no 'base' config: the paired comparison needs it")
    fresh = {
        model: compute_model_metrics(
            samples[model],
            model=model,
            level=model_level(model),
            base_samples=None if model == "base" else samples["base"],
            prompt_samples=samples.get(prompt_baseline_of(model)),
            sft_samples=samples.get(sft_sibling_of(model)),
        )
        for model in models
    }
    _check_summary_config(configs, fresh)
    for model in models:
        _write_samples(run_dir.samples(model), samples[model])
    for model in models:  # base first: the levels' metrics pair with it
        write_metrics(run_dir, model, model_level(model))
    return models
