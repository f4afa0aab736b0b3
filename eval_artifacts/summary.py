"""``eval/summary.json``: every model's headline metrics and kind (base, adapter, prompt-only baseline), its
Pareto-frontier membership, each level's spread across training seeds, and the pick of the cheapest level
that keeps base accuracy (the "sweet spot" the cards point to)."""

from __future__ import annotations

from typing import Any

import numpy as np

from eval_artifacts.metrics import METRICS_FIELDS, read_metrics
from eval_artifacts.pareto import pareto_frontier
from eval_artifacts.records import is_rl, model_kind, model_level, other_seed_of
from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, read_json, write_json
from eval_artifacts.study.errors import ArtifactError

# A summary row is a model's metrics.json without its provenance, plus its kind and frontier flag.
_METRICS_LEFT_OUT = ("schema_version", "seeds", "think_tokens_per_correct")
SUMMARY_MODEL_FIELDS = (
    *(name for name in METRICS_FIELDS if name not in _METRICS_LEFT_OUT),
    "kind",
    "rl",
    "on_frontier",
)


def on_the_plot(model: str) -> bool:
    """Base, the published adapters and the prompt-only baselines; other training seeds' adapters are
    summarised per level (``training_seeds``) instead of crowding the frontier."""
    return other_seed_of(model) is None


def mean_sd(values: list[float]) -> dict[str, float | None]:
    """Mean and sample sd (ddof = 1; None for a single value)."""
    return {
        "mean": sum(values) / len(values),
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
    }


def training_seed_spread(metrics: dict[str, dict]) -> list[dict[str, Any]]:
    """Per level with adapters in ``metrics``: its SFT adapters (published first), their training seeds, and
    the mean ± sd across them of accuracy and of mean think tokens (an RL adapter is another method, not
    another seed)."""
    by_level: dict[int, list[str]] = {}
    for model in metrics:
        if model_kind(model) == "adapter" and not is_rl(model):
            by_level.setdefault(model_level(model), []).append(model)
    spread = []
    for level, models in sorted(by_level.items()):
        models.sort(key=lambda name: (other_seed_of(name) is not None, other_seed_of(name) or 0))
        spread.append(
            {
                "level": level,
                "models": models,
                "training_seeds": [metrics[m]["training_seed"] for m in models],
                "accuracy": mean_sd([metrics[m]["accuracy"] for m in models]),
                "think_tokens_mean": mean_sd([metrics[m]["think_tokens"]["mean"] for m in models]),
            }
        )
    return spread


def build_summary(run_dir: RunDir, *, study: str, models: list[str]) -> dict[str, Any]:
    """Read each model's metrics.json and assemble the summary, models in the order given.

    The frontier is taken on (mean think tokens, accuracy) over base, the published adapters and the
    prompt-only baselines (``on_the_plot``).
    """
    if not models:
        raise ArtifactError("build_summary needs at least one model: evaluate base and the levels first")
    metrics = {model: read_metrics(run_dir, model) for model in models}
    frontier = pareto_frontier(
        {m: (p["think_tokens"]["mean"], p["accuracy"]) for m, p in metrics.items() if on_the_plot(m)}
    )
    rows = [
        {
            **{name: metrics[model][name] for name in SUMMARY_MODEL_FIELDS[:-3]},
            "kind": model_kind(model),
            "rl": is_rl(model),
            "on_frontier": model in frontier,
        }
        for model in models
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "study": study,
        "models": rows,
        "frontier": frontier,
        "training_seeds": training_seed_spread(metrics),
    }


def write_summary(run_dir: RunDir, *, study: str, models: list[str]) -> dict[str, Any]:
    """Build the summary and write it to ``eval/summary.json``."""
    summary = build_summary(run_dir, study=study, models=models)
    write_json(run_dir.summary, summary)
    return summary


def read_summary(run_dir: RunDir) -> dict[str, Any]:
    """Read ``eval/summary.json``; a missing field or wrong schema is an ``ArtifactError``."""
    path = run_dir.summary
    summary = read_json(path, what="summary", hint="run `cot-compress evaluate` to write it")
    for name in ("schema_version", "study", "models", "frontier", "training_seeds"):
        if not isinstance(summary, dict) or name not in summary:
            raise ArtifactError(f"summary {path} is missing field '{name}': rerun `cot-compress evaluate`")
    if summary["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"summary {path} has schema_version {summary['schema_version']}, this code reads {SCHEMA_VERSION}: "
            "rerun `cot-compress evaluate`"
        )
    for row in summary["models"]:
        missing = [name for name in SUMMARY_MODEL_FIELDS if name not in row]
        if missing:
            raise ArtifactError(
                f"summary {path} model {row.get('model')!r} is missing field '{missing[0]}': rerun `cot-compress evaluate`"
            )
    return summary


SWEET_SPOT_ALPHA = 0.05
"""Significance level of the McNemar test by which a level "keeps" base accuracy."""


def sweet_spot(summary: dict, *, margin: float, alpha: float = SWEET_SPOT_ALPHA) -> str | None:
    """The level with the fewest mean think tokens that keeps base accuracy; None when no level does.

    Only the published SFT adapters compete (the RL adapters are compared with their SFT sibling instead). A level keeps base accuracy when it is not significantly below base
    (paired p >= alpha, or not below at all) or when it is at most ``margin`` below base. Ties on tokens go
    to the more accurate.
    """
    kept = []
    for row in summary["models"]:
        vs_base = row["vs_base"]
        model = row["model"]
        if model_kind(model) != "adapter" or is_rl(model) or not on_the_plot(model) or vs_base is None:
            continue
        not_worse = vs_base["p_value"] >= alpha or vs_base["delta"] >= 0
        if not_worse or vs_base["delta"] >= -margin:
            kept.append(row)
    if not kept:
        return None
    best = min(kept, key=lambda row: (row["think_tokens"]["mean"], -row["accuracy"], row["model"]))
    return best["model"]
