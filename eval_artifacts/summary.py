"""``eval/summary.json``: every model's headline metrics, its Pareto-frontier membership, and the pick of
the cheapest level that keeps base accuracy (the "sweet spot" the cards point to)."""

from __future__ import annotations

from typing import Any

from eval_artifacts.metrics import METRICS_FIELDS, read_metrics
from eval_artifacts.pareto import pareto_frontier
from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, read_json, write_json
from eval_artifacts.study.errors import ArtifactError

# A summary row is a model's metrics.json without its per-seed detail and provenance, plus its frontier flag.
_METRICS_LEFT_OUT = ("schema_version", "seeds", "think_tokens_per_correct", "per_seed")
SUMMARY_MODEL_FIELDS = (*(name for name in METRICS_FIELDS if name not in _METRICS_LEFT_OUT), "on_frontier")


def build_summary(run_dir: RunDir, *, study: str, models: list[str]) -> dict[str, Any]:
    """Read each model's metrics.json and assemble the summary, models in the order given.

    The frontier is taken over all listed models (base included) on (mean think tokens, accuracy).
    """
    if not models:
        raise ArtifactError("build_summary needs at least one model: evaluate base and the levels first")
    metrics = {model: read_metrics(run_dir, model) for model in models}
    frontier = pareto_frontier({m: (p["think_tokens"]["mean"], p["accuracy"]) for m, p in metrics.items()})
    rows = [
        {
            **{name: metrics[model][name] for name in SUMMARY_MODEL_FIELDS[:-1]},
            "on_frontier": model in frontier,
        }
        for model in models
    ]
    return {"schema_version": SCHEMA_VERSION, "study": study, "models": rows, "frontier": frontier}


def write_summary(run_dir: RunDir, *, study: str, models: list[str]) -> dict[str, Any]:
    """Build the summary and write it to ``eval/summary.json``."""
    summary = build_summary(run_dir, study=study, models=models)
    write_json(run_dir.summary, summary)
    return summary


def read_summary(run_dir: RunDir) -> dict[str, Any]:
    """Read ``eval/summary.json``; a missing field or wrong schema is an ``ArtifactError``."""
    path = run_dir.summary
    summary = read_json(path, what="summary", hint="run `cot-compress evaluate` to write it")
    for name in ("schema_version", "study", "models", "frontier"):
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

    A level keeps base accuracy when it is not significantly below base (McNemar p >= alpha, or not
    below at all) or when it is at most ``margin`` below base. Ties on tokens go to the more accurate.
    """
    kept = []
    for row in summary["models"]:
        vs_base = row["vs_base"]
        if row["model"] == "base" or vs_base is None:
            continue
        not_worse = vs_base["mcnemar_p"] >= alpha or vs_base["delta"] >= 0
        if not_worse or vs_base["delta"] >= -margin:
            kept.append(row)
    if not kept:
        return None
    best = min(kept, key=lambda row: (row["think_tokens"]["mean"], -row["accuracy"], row["model"]))
    return best["model"]
