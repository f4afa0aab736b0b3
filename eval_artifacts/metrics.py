"""Metrics computed only from samples.jsonl: accuracy with its Wilson CI, token statistics, and the
paired comparison with the stock model (delta with Newcombe's paired CI, exact McNemar p, b and c).

Definitions (the cards quote them):
- ``accuracy`` / ``n_correct``: strict grading (each sample's ``correct``); ``accuracy_lenient`` /
  ``n_correct_lenient``: the lenient rule (``correct_lenient``), reported beside it. ``n_no_answer`` and
  ``n_truncated`` count the samples graded ``no_answer`` (finished without a readable final answer) and
  ``truncated`` (cut by the token limit before one); ``truncated`` counts every output that hit the limit,
  answered or not.
- ``ci95``: Wilson score interval of the strict accuracy, z = 1.959963984540054.
- token stats: ``mean`` = sum / n; ``median`` = the middle value (mean of the two middle values for even n);
  ``p90`` = ``numpy.percentile(values, 90, method="linear")``, i.e. with sorted values x and
  h = 0.9 * (n - 1), p90 = x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]).
- ``tokens_per_correct``: total completion tokens / n_correct (None when nothing is correct); it charges
  the tokens of wrong answers to the right ones, which is what a user pays per right answer.
- ``vs_base``: pairs each sample with base's sample of the same problem id (and seed, pooled over seeds).
  ``b`` = base right & model wrong, ``c`` = base wrong & model right, ``delta`` = (c - b) / n_paired =
  model accuracy - base accuracy on the paired problems.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.stats import binomtest

from eval_artifacts.records import model_level, read_samples
from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, read_json, write_json
from eval_artifacts.study.errors import ArtifactError

Z95 = 1.959963984540054
"""The 97.5% standard normal quantile: a two-sided 95% interval."""


# ---------------------------------------------------------------- statistics


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (``(0.0, 1.0)`` when n == 0)."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson_ci needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # The exact bounds at the ends are 0 and 1; the formula leaves rounding noise there.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p: the binomial test of b successes in b + c trials at p = 0.5.

    Only the discordant pairs carry information; with none, nothing contradicts equality and p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact_p needs non-negative counts, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5).pvalue)


def paired_delta_ci(*, a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """CI for model accuracy minus base accuracy on paired problems: Newcombe's hybrid score method.

    Newcombe RG, "Improved confidence intervals for the difference between binomial proportions based
    on paired data", Statistics in Medicine 17:2635-2650 (1998), method 10: the Wilson intervals of the
    two marginal proportions combined square-and-add, with the correlation phi of the paired table
    (continuity-corrected: numerator ``max(ad - bc - n/2, 0)`` when ``ad > bc``; phi = 0 when a margin
    is empty). It stays inside [-1, 1] and, unlike the Wald interval, is not degenerate when b = c = 0.

    Args:
        a: both right. b: base right, model wrong. c: base wrong, model right. d: both wrong.

    Returns:
        ``(low, high)`` around ``(c - b) / n``; ``(-1.0, 1.0)`` when there are no pairs.
    """
    if min(a, b, c, d) < 0:
        raise ValueError(f"paired_delta_ci needs non-negative cells, got a={a}, b={b}, c={c}, d={d}")
    n = a + b + c + d
    if n == 0:
        return (-1.0, 1.0)
    p_model, p_base = (a + c) / n, (a + b) / n
    l_model, u_model = wilson_ci(a + c, n, z)
    l_base, u_base = wilson_ci(a + b, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    numerator = max(cross - n / 2, 0.0) if cross > 0 else float(cross)
    phi = numerator / math.sqrt(margins) if margins > 0 else 0.0
    delta = p_model - p_base
    down_m, up_m = p_model - l_model, u_model - p_model
    down_b, up_b = p_base - l_base, u_base - p_base
    low = delta - math.sqrt(max(down_m**2 - 2 * phi * down_m * up_b + up_b**2, 0.0))
    high = delta + math.sqrt(max(up_m**2 - 2 * phi * up_m * down_b + down_b**2, 0.0))
    return (max(-1.0, low), min(1.0, high))


def _token_stats(values: list[int]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": sum(values) / len(values),  # exact integer sum, one rounding
        "median": float(np.median(array)),
        "p90": float(np.percentile(array, 90, method="linear")),
    }


# ---------------------------------------------------------------- one seed / pooled


def _base_rows_for_seed(base_samples: list[dict], seed: int) -> list[dict]:
    """Base rows to pair with one seed: base's rows of that seed, or base's only seed.

    Base is greedy, so a single base seed is the natural partner of every model seed.
    """
    base_seeds = sorted({row["seed"] for row in base_samples})
    if seed in base_seeds:
        return [row for row in base_samples if row["seed"] == seed]
    if len(base_seeds) == 1:
        return base_samples
    raise ArtifactError(
        f"base samples have seeds {base_seeds} but not seed {seed}: evaluate base with --seeds {seed}"
    )


def _paired_table(samples: list[dict], base_samples: list[dict]) -> tuple[int, int, int, int]:
    """The 2x2 table (a, b, c, d) of samples paired with base on (id, seed)."""
    counts = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for seed in sorted({row["seed"] for row in samples}):
        base_right = {row["id"]: row["correct"] for row in _base_rows_for_seed(base_samples, seed)}
        for row in samples:
            if row["seed"] == seed and row["id"] in base_right:
                counts[(base_right[row["id"]], row["correct"])] += 1
    # (base correct, model correct): a = both, b = base only, c = model only, d = neither.
    return counts[(True, True)], counts[(True, False)], counts[(False, True)], counts[(False, False)]


def _vs_base(samples: list[dict], base_samples: list[dict]) -> dict[str, Any]:
    a, b, c, d = _paired_table(samples, base_samples)
    n_paired = a + b + c + d
    if n_paired == 0:
        raise ArtifactError(
            "no sample shares a problem id with the base samples: evaluate base on the same problems"
        )
    return {
        "delta": (c - b) / n_paired,
        "ci95": list(paired_delta_ci(a=a, b=b, c=c, d=d)),
        "mcnemar_p": mcnemar_exact_p(b, c),
        "b": b,
        "c": c,
        "n_paired": n_paired,
    }


def _pooled_metrics(samples: list[dict], base_samples: list[dict] | None) -> dict[str, Any]:
    if not samples:
        raise ArtifactError("no samples to compute metrics from: run `cot-compress evaluate` first")
    n_total = len(samples)
    n_correct = sum(1 for row in samples if row["correct"])
    n_correct_lenient = sum(1 for row in samples if row["correct_lenient"])
    think = [row["think_tokens"] for row in samples]
    completion = [row["completion_tokens"] for row in samples]
    return {
        "n_total": n_total,
        "n_correct": n_correct,
        "accuracy": n_correct / n_total,
        "ci95": list(wilson_ci(n_correct, n_total)),
        "n_correct_lenient": n_correct_lenient,
        "accuracy_lenient": n_correct_lenient / n_total,
        "n_no_answer": sum(1 for row in samples if row["grade_reason"] == "no_answer"),
        "n_truncated": sum(1 for row in samples if row["grade_reason"] == "truncated"),
        "think_tokens": _token_stats(think),
        "completion_tokens": _token_stats(completion),
        "tokens_per_correct": sum(completion) / n_correct if n_correct else None,
        "think_tokens_per_correct": sum(think) / n_correct if n_correct else None,
        "truncated": sum(1 for row in samples if row["finish_reason"] == "length"),
        "vs_base": None if base_samples is None else _vs_base(samples, base_samples),
    }


def compute_metrics(samples: list[dict], *, base_samples: list[dict] | None) -> dict[str, Any]:
    """The DESIGN.md metrics of one model for ONE seed; ``base_samples=None`` for base itself.

    Raises:
        ArtifactError: no samples, several seeds, or nothing to pair with base.
    """
    seeds = sorted({row["seed"] for row in samples})
    if len(seeds) > 1:
        raise ArtifactError(f"compute_metrics takes one seed, got seeds {seeds}: use compute_model_metrics")
    return _pooled_metrics(samples, base_samples)


def _mean_sd(values: list[float]) -> dict[str, float | None]:
    mean = sum(values) / len(values)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": mean, "sd": sd}


def compute_model_metrics(
    samples: list[dict], *, model: str, level: int | None, base_samples: list[dict] | None
) -> dict[str, Any]:
    """The metrics.json payload of one model over any number of seeds.

    Headline fields are the one seed's metrics, or, for several seeds, pooled over all (id, seed) rows
    (vs_base paired on (id, seed)). ``across_seeds`` gives mean and sample sd (ddof=1; sd None for one
    seed) of the per-seed accuracy and mean token counts. ``per_seed`` keeps every seed's metrics.

    The pooled Wilson CI counts every (problem, seed) as a trial, so with several seeds it reflects
    problem sampling only; ``across_seeds.accuracy.sd`` is the seed-to-seed spread to report beside it.
    """
    seeds = sorted({row["seed"] for row in samples})
    per_seed = [
        {
            "seed": seed,
            **compute_metrics([r for r in samples if r["seed"] == seed], base_samples=base_samples),
        }
        for seed in seeds
    ]
    headline = _pooled_metrics(samples, base_samples)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "level": level,
        "seeds": seeds,
        **headline,
        "across_seeds": {
            "accuracy": _mean_sd([m["accuracy"] for m in per_seed]),
            "think_tokens_mean": _mean_sd([m["think_tokens"]["mean"] for m in per_seed]),
            "completion_tokens_mean": _mean_sd([m["completion_tokens"]["mean"] for m in per_seed]),
        },
        "per_seed": per_seed,
    }


# ---------------------------------------------------------------- metrics.json

METRICS_FIELDS = (
    "schema_version",
    "model",
    "level",
    "seeds",
    "n_total",
    "n_correct",
    "accuracy",
    "ci95",
    "n_correct_lenient",
    "accuracy_lenient",
    "n_no_answer",
    "n_truncated",
    "think_tokens",
    "completion_tokens",
    "tokens_per_correct",
    "think_tokens_per_correct",
    "truncated",
    "vs_base",
    "across_seeds",
    "per_seed",
)


def _recompute(run_dir: RunDir, model: str, level: int | None) -> dict[str, Any]:
    samples = read_samples(run_dir.samples(model), model=model)
    for row in samples[:1]:
        if row["level"] != level:
            raise ArtifactError(f"samples of {model} have level {row['level']!r}, expected {level!r}")
    base = None if model == "base" else read_samples(run_dir.samples("base"), model="base")
    return compute_model_metrics(samples, model=model, level=level, base_samples=base)


def write_metrics(run_dir: RunDir, model: str, level: int | None) -> dict[str, Any]:
    """Compute ``eval/<model>/metrics.json`` from its samples.jsonl (and base's) and write it."""
    payload = _recompute(run_dir, model, level)
    write_json(run_dir.metrics(model), payload)
    return payload


def read_metrics(run_dir: RunDir, model: str) -> dict[str, Any]:
    """Read ``eval/<model>/metrics.json``; a missing field or wrong schema is an ``ArtifactError``."""
    path = run_dir.metrics(model)
    payload = read_json(
        path, what="metrics", hint=f"run `cot-compress evaluate --models {model}` to write it"
    )
    if not isinstance(payload, dict):
        raise ArtifactError(
            f"metrics {path} is not a JSON object: rerun `cot-compress evaluate --models {model}`"
        )
    missing = [name for name in METRICS_FIELDS if name not in payload]
    if missing:
        raise ArtifactError(
            f"metrics {path} is missing field '{missing[0]}': rerun `cot-compress evaluate --models {model}`"
        )
    if payload["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"metrics {path} has schema_version {payload['schema_version']}, this code reads {SCHEMA_VERSION}: "
            f"rerun `cot-compress evaluate --models {model}`"
        )
    if payload["model"] != model:
        raise ArtifactError(f"metrics {path} is for model {payload['model']!r}, not {model!r}")
    return payload


def _first_difference(stored: Any, fresh: Any, where: str) -> str | None:
    """Dotted path of the first field where two JSON values differ (None when equal)."""
    if isinstance(stored, dict) and isinstance(fresh, dict):
        for key in list(fresh) + [k for k in stored if k not in fresh]:
            if key not in stored or key not in fresh:
                return f"{where}{key}"
            found = _first_difference(stored[key], fresh[key], f"{where}{key}.")
            if found:
                return found
        return None
    if isinstance(stored, list) and isinstance(fresh, list) and len(stored) == len(fresh):
        for index, (left, right) in enumerate(zip(stored, fresh, strict=True)):
            found = _first_difference(left, right, f"{where}{index}.")
            if found:
                return found
        return None
    # bool is an int in Python: True == 1 must still count as a difference.
    same = type(stored) is type(fresh) or {type(stored), type(fresh)} <= {int, float}
    return None if same and stored == fresh else where.rstrip(".") or "(root)"


def _lookup(payload: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(payload, list) and part.isdigit() and int(part) < len(payload):
            payload = payload[int(part)]
        elif isinstance(payload, dict) and part in payload:
            payload = payload[part]
        else:
            return "(absent)"
    return payload


def check_metrics_match_samples(run_dir: RunDir, model: str) -> None:
    """Recompute metrics from samples and require metrics.json to agree, field by field.

    Raises:
        ArtifactError: naming the first field whose stored value differs from the recomputed one.
    """
    stored = read_metrics(run_dir, model)
    fresh = _recompute(run_dir, model, model_level(model))
    # Compare what a reader of the JSON would see: round-trip floats exactly as write_json stores them.
    fresh = json.loads(json.dumps(fresh))
    field = _first_difference(stored, fresh, "")
    if field is not None:
        raise ArtifactError(
            f"metrics {run_dir.metrics(model)} disagree with their samples at field '{field}' "
            f"(stored {_lookup(stored, field)!r}, samples give {_lookup(fresh, field)!r}): "
            f"rerun `cot-compress evaluate --models {model}` to recompute metrics.json"
        )


def sort_models(values: Iterable[str]) -> list[str]:
    """Model names in study order: base first, then levels by number."""
    return sorted(set(values), key=lambda name: model_level(name) or 0)
