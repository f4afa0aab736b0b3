"""Metrics computed only from samples.jsonl: accuracy with its confidence interval, token statistics, and the
paired comparisons with the stock model and with the level's prompt-only baseline.

The statistical unit is the problem, never the row (Miller 2024, "Adding Error Bars to Evals", arXiv
2411.00640). A model has d draws per problem (evaluation seeds × ``eval.sampling.samples_per_problem``; 1
when greedy), and every problem has the same d.

Definitions (the cards quote them):
- ``accuracy`` / ``n_correct``: strict grading (each sample's ``correct``); ``accuracy_lenient`` /
  ``n_correct_lenient``: the lenient rule (``correct_lenient``), reported beside it. ``n_no_answer`` and
  ``n_truncated`` count the samples graded ``no_answer`` (finished without a readable final answer) and
  ``truncated`` (cut by the token limit before one); ``truncated`` counts every output that hit the limit,
  answered or not.
- ``accuracy`` is the mean over problems of each problem's mean correctness (= n_correct / n_total, since
  every problem has d draws). ``n_problems`` = P, ``samples_per_problem`` = d.
- ``ci95`` (``ci_method``): the Wilson score interval (z = 1.959963984540054) at the effective sample size
  n_eff = p(1 - p) / SE², where SE² = (1 / P²) Σ_i (m_i - p)² is the problem-clustered variance of the
  accuracy p from the per-problem means m_i, and n_eff is capped at the number of draws P·d. With one draw
  per problem (greedy) m_i is 0 or 1, SE² = p(1 - p) / P and n_eff = P: the plain Wilson interval
  (``ci_method: wilson``). With several draws (``ci_method: wilson_clustered``) draws that agree add
  nothing: k identical draws per problem give exactly the one-draw interval. SE = 0 (every m_i equal) gives
  n_eff = P when p is 0 or 1, else P·d.
- token stats: over all draws (the same as over per-problem means, every problem having d draws):
  ``mean`` = sum / n; ``median`` = the middle value (mean of the two middle values for even n);
  ``p90`` = ``numpy.percentile(values, 90, method="linear")``, i.e. with sorted values x and
  h = 0.9 * (n - 1), p90 = x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]).
- ``tokens_per_correct``: total completion tokens / n_correct (None when nothing is correct); it charges
  the tokens of wrong answers to the right ones, which is what a user pays per right answer.
- ``vs_base`` (and ``vs_prompt`` for an adapter: against the base model given the same level's prompt),
  paired per problem on the per-problem means of the problems both evaluated. ``b`` = problems where the
  other model does better, ``c`` = problems where this one does better, ``delta`` = mean of the
  per-problem differences = this accuracy - the other's on the paired problems. ``test``:
  - ``mcnemar_exact`` when every per-problem mean of both is 0 or 1 (greedy; or draws that all agree):
    exact McNemar p on (b, c) and Newcombe's paired score interval for delta;
  - ``paired_t`` otherwise: one-sample t-test of the per-problem differences against 0, and
    delta ± t(0.975, P - 1) · sd / √P (sd with ddof = 1); p = 1 when every difference is 0 (0 when
    they are all one non-zero value).
- ``vs_sft`` for an RL adapter (``rl_l<n>``): the same paired comparison against the SFT adapter it
  continues (``level_<n>``), so that ``delta`` is what the RL stage bought on top of SFT; None for every
  other model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.stats import binomtest, ttest_1samp
from scipy.stats import t as student_t

from eval_artifacts.records import is_rl, model_kind, model_level, model_sort_key, read_samples
from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, read_json, write_json
from eval_artifacts.study.errors import ArtifactError
from eval_artifacts.study.levels import LEVELS

Z95 = 1.959963984540054
"""The 97.5% standard normal quantile: a two-sided 95% interval."""


# ---------------------------------------------------------------- statistics


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (``(0.0, 1.0)`` when n == 0)."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson_ci needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    return wilson_interval(k / n, n, z)


def wilson_interval(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` at a (possibly effective, non-integer) sample size ``n``."""
    if not 0 <= p <= 1 or n <= 0:
        raise ValueError(f"wilson_interval needs 0 <= p <= 1 and n > 0, got p={p}, n={n}")
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # The exact bounds at the ends are 0 and 1; the formula leaves rounding noise there.
    low = 0.0 if p == 0 else max(0.0, centre - half)
    high = 1.0 if p == 1 else min(1.0, centre + half)
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


# ---------------------------------------------------------------- per problem


def problem_means(samples: list[dict]) -> dict[str, float]:
    """Each problem's mean correctness over its draws (evaluation seeds × samples)."""
    right: dict[str, list[int]] = {}
    for row in samples:
        counts = right.setdefault(row["id"], [0, 0])
        counts[0] += bool(row["correct"])
        counts[1] += 1
    return {problem: k / n for problem, (k, n) in right.items()}


def draws_per_problem(samples: list[dict]) -> int:
    """d, the draws of every problem; an ``ArtifactError`` when problems have different numbers of draws."""
    counts: dict[str, int] = {}
    for row in samples:
        counts[row["id"]] = counts.get(row["id"], 0) + 1
    distinct = sorted(set(counts.values()))
    if len(distinct) != 1:
        raise ArtifactError(
            f"{samples[0]['model']}: problems have {distinct[0]} to {distinct[-1]} draws each; every problem needs "
            "the same: rerun `cot-compress evaluate` to complete the missing ones"
        )
    return distinct[0]


def clustered_ci(samples: list[dict]) -> tuple[list[float], str]:
    """The accuracy's 95% interval clustered by problem, and its ``ci_method`` (module docstring)."""
    means = list(problem_means(samples).values())
    n_problems, draws = len(means), len(samples)
    p = sum(1 for row in samples if row["correct"]) / draws
    if draws == n_problems:  # one draw per problem: the means are the 0/1 outcomes themselves
        return list(wilson_ci(sum(1 for row in samples if row["correct"]), draws)), "wilson"
    variance = sum((m - p) ** 2 for m in means) / n_problems**2
    if variance == 0:
        n_eff = float(n_problems if p in (0.0, 1.0) else draws)
    else:
        n_eff = min(p * (1 - p) / variance, float(draws))
    return list(wilson_interval(p, n_eff)), "wilson_clustered"


def paired_comparison(samples: list[dict], other_samples: list[dict], *, other: str) -> dict[str, Any]:
    """This model against ``other``, paired per problem on per-problem means (module docstring).

    Raises:
        ArtifactError: the two share no problem.
    """
    mine, theirs = problem_means(samples), problem_means(other_samples)
    paired = sorted(mine.keys() & theirs.keys())
    if not paired:
        raise ArtifactError(
            f"no sample shares a problem id with the {other} samples: evaluate {other} on the same problems"
        )
    differences = [mine[i] - theirs[i] for i in paired]
    b = sum(1 for d in differences if d < 0)
    c = sum(1 for d in differences if d > 0)
    n = len(paired)
    if all(mine[i] in (0.0, 1.0) and theirs[i] in (0.0, 1.0) for i in paired):
        a = sum(1 for i in paired if mine[i] == theirs[i] == 1.0)
        return {
            "test": "mcnemar_exact",
            "delta": (c - b) / n,
            "ci95": list(paired_delta_ci(a=a, b=b, c=c, d=n - a - b - c)),
            "p_value": mcnemar_exact_p(b, c),
            "b": b,
            "c": c,
            "n_paired": n,
        }
    delta = sum(differences) / n
    sd = float(np.std(differences, ddof=1)) if n > 1 else 0.0
    if sd == 0:
        p_value, half = (1.0 if delta == 0 else 0.0), 0.0
    else:
        p_value = float(ttest_1samp(differences, 0.0).pvalue)
        half = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {
        "test": "paired_t",
        "delta": delta,
        "ci95": [max(-1.0, delta - half), min(1.0, delta + half)],
        "p_value": p_value,
        "b": b,
        "c": c,
        "n_paired": n,
    }


def compute_model_metrics(
    samples: list[dict],
    *,
    model: str,
    level: int | None,
    base_samples: list[dict] | None,
    prompt_samples: list[dict] | None = None,
    sft_samples: list[dict] | None = None,
) -> dict[str, Any]:
    """The metrics.json payload of one model; ``base_samples=None`` for base itself, ``prompt_samples`` (the
    level's prompt-only baseline) for an adapter whose baseline was evaluated, ``sft_samples`` (the level's
    SFT adapter) for an RL adapter.

    Raises:
        ArtifactError: no samples, problems with different numbers of draws, or nothing to pair with.
    """
    if not samples:
        raise ArtifactError("no samples to compute metrics from: run `cot-compress evaluate` first")
    draws = draws_per_problem(samples)
    n_total = len(samples)
    n_correct = sum(1 for row in samples if row["correct"])
    n_correct_lenient = sum(1 for row in samples if row["correct_lenient"])
    think = [row["think_tokens"] for row in samples]
    completion = [row["completion_tokens"] for row in samples]
    ci95, ci_method = clustered_ci(samples)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "level": level,
        "training_seed": samples[0]["training_seed"],
        "seeds": sorted({row["seed"] for row in samples}),
        "n_problems": n_total // draws,
        "samples_per_problem": draws,
        "n_total": n_total,
        "n_correct": n_correct,
        "accuracy": n_correct / n_total,
        "ci95": ci95,
        "ci_method": ci_method,
        "n_correct_lenient": n_correct_lenient,
        "accuracy_lenient": n_correct_lenient / n_total,
        "n_no_answer": sum(1 for row in samples if row["grade_reason"] == "no_answer"),
        "n_truncated": sum(1 for row in samples if row["grade_reason"] == "truncated"),
        "think_tokens": _token_stats(think),
        "completion_tokens": _token_stats(completion),
        "tokens_per_correct": sum(completion) / n_correct if n_correct else None,
        "think_tokens_per_correct": sum(think) / n_correct if n_correct else None,
        "truncated": sum(1 for row in samples if row["finish_reason"] == "length"),
        "vs_base": None if base_samples is None else paired_comparison(samples, base_samples, other="base"),
        "vs_prompt": None
        if prompt_samples is None
        else paired_comparison(samples, prompt_samples, other=LEVELS[level].prompt_key),
        "vs_sft": None if sft_samples is None else paired_comparison(samples, sft_samples, other=LEVELS[level].key),
    }


# ---------------------------------------------------------------- metrics.json

METRICS_FIELDS = (
    "schema_version",
    "model",
    "level",
    "training_seed",
    "seeds",
    "n_problems",
    "samples_per_problem",
    "n_total",
    "n_correct",
    "accuracy",
    "ci95",
    "ci_method",
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
    "vs_prompt",
    "vs_sft",
)


def _recompute(run_dir: RunDir, model: str, level: int | None) -> dict[str, Any]:
    samples = read_samples(run_dir.samples(model), model=model)
    for row in samples[:1]:
        if row["level"] != level:
            raise ArtifactError(f"samples of {model} have level {row['level']!r}, expected {level!r}")
    base = None if model == "base" else read_samples(run_dir.samples("base"), model="base")
    return compute_model_metrics(
        samples,
        model=model,
        level=level,
        base_samples=base,
        prompt_samples=_covering_samples(run_dir, prompt_baseline_of(model), samples),
        sft_samples=_covering_samples(run_dir, sft_sibling_of(model), samples),
    )


def prompt_baseline_of(model: str) -> str | None:
    """The model an adapter is compared with as its prompt-only baseline (``prompt_l<n>``); None otherwise."""
    return LEVELS[model_level(model)].prompt_key if model_kind(model) == "adapter" else None


def sft_sibling_of(model: str) -> str | None:
    """The SFT adapter an RL adapter continues (``rl_l<n>`` -> ``level_<n>``); None for every other model."""
    return LEVELS[model_level(model)].key if is_rl(model) else None


def _covering_samples(run_dir: RunDir, other: str | None, samples: list[dict]) -> list[dict] | None:
    """The samples of ``other`` when they cover every problem of ``samples``; None when there is no ``other``
    or it was not (fully) evaluated."""
    if other is None or not run_dir.samples(other).is_file():
        return None
    theirs = read_samples(run_dir.samples(other))
    return theirs if {row["id"] for row in samples} <= {row["id"] for row in theirs} else None


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
    """Model names in study order (``records.model_sort_key``)."""
    return sorted(set(values), key=model_sort_key)
