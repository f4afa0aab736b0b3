"""Metric math against known values, and metrics.json against an independent recomputation."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
from helpers import sample_row
from scipy.stats import binomtest

from eval_artifacts.metrics import (
    check_metrics_match_samples,
    compute_model_metrics,
    mcnemar_exact_p,
    paired_delta_ci,
    read_metrics,
    wilson_ci,
    write_metrics,
)
from eval_artifacts.records import SAMPLE_FIELDS, read_samples
from eval_artifacts.rundir import RunDir, append_jsonl
from eval_artifacts.study.errors import ArtifactError

Z = 1.959963984540054


def random_rows(
    model: str, *, seed: int, n: int, p_correct: float, think_scale: int, rng_seed: int
) -> list[dict]:
    rng = random.Random(rng_seed)
    rows = []
    for i in range(n):
        finish = "length" if rng.random() < 0.08 else "stop"
        correct = finish == "stop" and rng.random() < p_correct
        # Some unfinished outputs end their reasoning on the gold number: only the lenient rule credits them.
        lenient = not correct and rng.random() < 0.3
        think = rng.randint(think_scale // 3, think_scale * 2)
        completion = think + rng.randint(4, 12)
        grading = {"finish": finish, "lenient": lenient}
        rows.append(sample_row(f"p{i:03d}", correct, think, completion, model=model, seed=seed, **grading))
    return rows


# ---------------------------------------------------------------- known values


def test_wilson_matches_the_issue_value_and_scipy():
    low, high = wilson_ci(765, 1319)
    assert (round(low, 3), round(high, 3)) == (0.553, 0.606)
    for k, n in [(0, 5), (1, 5), (5, 5), (13, 40), (765, 1319), (1, 1319)]:
        expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_ci(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)
    assert wilson_ci(0, 7)[0] == 0.0 and wilson_ci(7, 7)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_ci(6, 5)


def _exact_two_sided(b: int, c: int) -> float:
    n = b + c
    tail = sum(Fraction(math.comb(n, i), 2**n) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), 2 * tail))


def test_mcnemar_exact_matches_scipy_binomtest_and_exact_sums():
    for b in range(0, 15):
        for c in range(0, 15):
            p = mcnemar_exact_p(b, c)
            if b + c == 0:
                assert p == 1.0
                continue
            assert p == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
            assert p == pytest.approx(_exact_two_sided(b, c), rel=1e-12)
            assert p == mcnemar_exact_p(c, b)
    # 1 vs 9 discordant pairs: 2 * (1 + 10) / 2**10.
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024, rel=1e-12)


# Newcombe 1998 (Stat Med 17:2635), Table III, method 10, printed to 4 d.p. with z = 1.96.
# Cells in the paper's order (e, f, g, h): both +, first + only, second + only, both -; the interval
# is for the first proportion minus the second. Ours is model minus base: a=e, c=f, b=g, d=h.
NEWCOMBE_TABLE_III = {
    (36, 12, 2, 0): (0.0569, 0.3404),
    (20, 12, 2, 16): (0.0562, 0.3292),
    (18, 14, 0, 18): (0.1441, 0.3963),
    (2, 97, 1, 0): (0.8721, 0.9854),
    (0, 30, 0, 0): (0.8395, 1.0),
    (53, 0, 0, 1): (-0.0729, 0.0729),
    (27, 0, 0, 27): (-0.0351, 0.0351),
}


@pytest.mark.parametrize("cells", sorted(NEWCOMBE_TABLE_III))
def test_paired_ci_reproduces_newcombe_table_iii(cells):
    e, f, g, h = cells
    low, high = paired_delta_ci(a=e, b=g, c=f, d=h, z=1.96)
    assert (round(low, 4), round(high, 4)) == NEWCOMBE_TABLE_III[cells]


def test_paired_ci_reproduces_fagerland_textbook_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8, Cavo et al.
    # table [[59, 6], [16, 80]]: Newcombe square-and-add estimate -0.0621, 95% CI -0.1186 to -0.0046.
    low, high = paired_delta_ci(a=59, b=16, c=6, d=80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    assert paired_delta_ci(a=0, b=0, c=0, d=0) == (-1.0, 1.0)


# ---------------------------------------------------------------- independent recomputation


def _p90(values: list[int]) -> float:
    xs = sorted(values)
    h = (len(xs) - 1) * 0.9
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def _median(values: list[int]) -> float:
    xs = sorted(values)
    mid = len(xs) // 2
    return float(xs[mid]) if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    denom = 1 + Z**2 / n
    centre = (p + Z**2 / (2 * n)) / denom
    half = Z / denom * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return centre - half, centre + half


def _newcombe10(a: int, b: int, c: int, d: int) -> tuple[float, float]:
    n = a + b + c + d
    p1, p2 = (a + c) / n, (a + b) / n  # model, base
    l1, u1 = _wilson(a + c, n)
    l2, u2 = _wilson(a + b, n)
    num = a * d - b * c
    num = max(num - n / 2, 0) if num > 0 else num
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = num / math.sqrt(den) if den else 0.0
    lo = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    hi = p1 - p2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return lo, hi


@pytest.fixture
def run_dir(tmp_path: Path) -> RunDir:
    rd = RunDir(tmp_path / "runs" / "tiny")
    append_jsonl(
        rd.samples("base"), random_rows("base", seed=0, n=57, p_correct=0.62, think_scale=60, rng_seed=1)
    )
    append_jsonl(
        rd.samples("level_2"), random_rows("level_2", seed=0, n=57, p_correct=0.5, think_scale=25, rng_seed=2)
    )
    return rd


def test_metrics_json_matches_independent_recomputation(run_dir: RunDir):
    write_metrics(run_dir, "base", None)
    write_metrics(run_dir, "level_2", 2)
    stored = json.loads(run_dir.metrics("level_2").read_text())
    rows = [json.loads(line) for line in run_dir.samples("level_2").read_text().splitlines()]
    base = {r["id"]: r["correct"] for r in map(json.loads, run_dir.samples("base").read_text().splitlines())}

    n = len(rows)
    k = sum(r["correct"] for r in rows)
    think = [r["think_tokens"] for r in rows]
    comp = [r["completion_tokens"] for r in rows]
    reasons = [r["grade_reason"] for r in rows]
    k_lenient = sum(r["correct_lenient"] for r in rows)
    # The data is not trivial: every grade reason occurs, and the lenient rule credits more.
    assert 0 < k < n and sum(r["finish_reason"] == "length" for r in rows) > 0
    assert set(reasons) == {"correct", "wrong", "no_answer", "truncated"} and k_lenient > k
    assert stored["schema_version"] == 2 and stored["model"] == "level_2" and stored["level"] == 2
    assert stored["seeds"] == [0]
    assert (stored["n_total"], stored["n_correct"]) == (n, k)
    assert stored["accuracy"] == k / n
    assert stored["ci95"] == pytest.approx(_wilson(k, n), rel=1e-12)
    assert stored["think_tokens"]["mean"] == sum(think) / n
    assert stored["think_tokens"]["median"] == _median(think)
    assert stored["think_tokens"]["p90"] == pytest.approx(_p90(think), rel=1e-12)
    assert stored["completion_tokens"]["mean"] == sum(comp) / n
    assert stored["completion_tokens"]["median"] == _median(comp)
    assert stored["completion_tokens"]["p90"] == pytest.approx(_p90(comp), rel=1e-12)
    assert stored["tokens_per_correct"] == sum(comp) / k
    assert stored["think_tokens_per_correct"] == sum(think) / k
    assert stored["truncated"] == sum(r["finish_reason"] == "length" for r in rows)
    assert (stored["n_correct_lenient"], stored["accuracy_lenient"]) == (k_lenient, k_lenient / n)
    assert (stored["n_no_answer"], stored["n_truncated"]) == (reasons.count("no_answer"), reasons.count("truncated"))

    a = sum(base[r["id"]] and r["correct"] for r in rows)
    b = sum(base[r["id"]] and not r["correct"] for r in rows)
    c = sum(not base[r["id"]] and r["correct"] for r in rows)
    d = n - a - b - c
    vs = stored["vs_base"]
    assert (vs["b"], vs["c"], vs["n_paired"]) == (b, c, n)
    assert vs["delta"] == (c - b) / n
    assert vs["delta"] == pytest.approx(stored["accuracy"] - sum(base.values()) / n, abs=1e-12)
    assert vs["test"] == "mcnemar_exact"
    assert vs["p_value"] == pytest.approx(_exact_two_sided(b, c), rel=1e-12)
    assert vs["ci95"] == pytest.approx(_newcombe10(a, b, c, d), rel=1e-12)
    assert (stored["n_problems"], stored["samples_per_problem"], stored["ci_method"]) == (n, 1, "wilson")
    assert stored["training_seed"] == 42 and stored["vs_prompt"] is None

    base_metrics = read_metrics(run_dir, "base")
    assert base_metrics["vs_base"] is None and base_metrics["level"] is None
    check_metrics_match_samples(run_dir, "level_2")  # consistent: no error


def _sampled(rows: list[dict], draws: list[list[bool]], *, model: str) -> list[dict]:
    """Each problem of ``rows`` drawn len(draws[i]) times: sample j correct as draws[i][j]."""
    return [
        sample_row(r["id"], ok, r["think_tokens"], r["completion_tokens"], model=model, sample=j)
        for r, outcomes in zip(rows, draws, strict=True)
        for j, ok in enumerate(outcomes)
    ]


def test_k_identical_draws_give_exactly_the_single_runs_ci_and_paired_test():
    """Issue 16: duplicates must not narrow the error bars nor sharpen the paired test."""
    base = random_rows("base", seed=0, n=200, p_correct=0.6, think_scale=50, rng_seed=7)
    level = random_rows("level_4", seed=0, n=200, p_correct=0.27, think_scale=15, rng_seed=8)
    single = compute_model_metrics(level, model="level_4", level=4, base_samples=base)
    for k in (2, 3, 8):
        copies = _sampled(level, [[r["correct"]] * k for r in level], model="level_4")
        base_copies = _sampled(base, [[r["correct"]] * k for r in base], model="base")
        pooled = compute_model_metrics(copies, model="level_4", level=4, base_samples=base_copies)
        assert (pooled["n_total"], pooled["samples_per_problem"], pooled["n_problems"]) == (200 * k, k, 200)
        assert pooled["ci_method"] == "wilson_clustered"
        assert pooled["accuracy"] == single["accuracy"]
        assert pooled["ci95"] == pytest.approx(single["ci95"], abs=1e-15)
        assert pooled["vs_base"] == single["vs_base"]  # McNemar on the same b, c: not p 3.65e-45


def test_sampled_ci_is_clustered_by_problem_and_paired_test_is_on_problem_means():
    rng = random.Random(3)
    base = random_rows("base", seed=0, n=40, p_correct=0.6, think_scale=50, rng_seed=9)
    level = random_rows("level_3", seed=0, n=40, p_correct=0.5, think_scale=20, rng_seed=10)
    k = 4
    draws = [[rng.random() < (0.9 if i % 3 else 0.2) for _ in range(k)] for i in range(40)]
    rows = _sampled(level, draws, model="level_3")
    payload = compute_model_metrics(rows, model="level_3", level=3, base_samples=base)

    means = [sum(d) / k for d in draws]
    p = sum(means) / 40
    assert payload["accuracy"] == pytest.approx(p, abs=1e-15)
    se2 = sum((m - p) ** 2 for m in means) / 40**2
    n_eff = min(p * (1 - p) / se2, 40 * k)
    denom = 1 + Z**2 / n_eff
    centre = (p + Z**2 / (2 * n_eff)) / denom
    half = Z / denom * math.sqrt(p * (1 - p) / n_eff + Z**2 / (4 * n_eff**2))
    assert payload["ci95"] == pytest.approx([centre - half, centre + half], rel=1e-12)
    # Never narrower than treating the 160 rows as independent, never wider than one draw per problem.
    assert payload["ci95"][1] - payload["ci95"][0] >= (_wilson(round(p * 160), 160)[1] - _wilson(round(p * 160), 160)[0]) - 1e-12

    diffs = [m - float(b["correct"]) for m, b in zip(means, base, strict=True)]
    mean = sum(diffs) / 40
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 39)
    from scipy.stats import t

    vs = payload["vs_base"]
    assert vs["test"] == "paired_t" and vs["delta"] == pytest.approx(mean, abs=1e-15)
    half = t.ppf(0.975, 39) * sd / math.sqrt(40)
    assert vs["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-12)
    statistic = mean / (sd / math.sqrt(40))
    assert vs["p_value"] == pytest.approx(2 * t.sf(abs(statistic), 39), rel=1e-9)
    assert (vs["b"], vs["c"]) == (sum(x < 0 for x in diffs), sum(x > 0 for x in diffs))


def test_adapter_metrics_pair_with_their_levels_prompt_only_baseline(tmp_path: Path):
    rd = RunDir(tmp_path / "runs" / "tiny")
    append_jsonl(rd.samples("base"), random_rows("base", seed=0, n=30, p_correct=0.6, think_scale=50, rng_seed=1))
    prompt = random_rows("prompt_l3", seed=0, n=30, p_correct=0.3, think_scale=20, rng_seed=2)
    level = random_rows("level_3", seed=0, n=30, p_correct=0.5, think_scale=20, rng_seed=3)
    append_jsonl(rd.samples("level_3"), level)
    assert write_metrics(rd, "level_3", 3)["vs_prompt"] is None  # no baseline evaluated
    append_jsonl(rd.samples("prompt_l3"), prompt)
    payload = write_metrics(rd, "level_3", 3)
    right = {r["id"]: r["correct"] for r in prompt}
    b = sum(right[r["id"]] and not r["correct"] for r in level)
    c = sum(not right[r["id"]] and r["correct"] for r in level)
    assert payload["vs_prompt"]["delta"] == (c - b) / 30 and (payload["vs_prompt"]["b"], payload["vs_prompt"]["c"]) == (b, c)
    assert write_metrics(rd, "prompt_l3", 3)["vs_prompt"] is None and payload["training_seed"] == 42


def test_problems_with_different_numbers_of_draws_are_refused():
    rows = [sample_row("p1", True, 3, 6, sample=0), sample_row("p1", False, 3, 6, sample=1), sample_row("p2", True, 3, 6)]
    with pytest.raises(ArtifactError, match="1 to 2 draws"):
        compute_model_metrics(rows, model="level_2", level=2, base_samples=None)


# ---------------------------------------------------------------- bad input


def test_truncated_line_missing_field_and_duplicates_are_named(tmp_path: Path):
    path = tmp_path / "samples.jsonl"
    append_jsonl(path, [sample_row("p1", True, 5, 9), sample_row("p2", False, 7, 11)])
    with path.open("a") as handle:
        handle.write('{"id": "p3", "question": "Tom')
    with pytest.raises(ArtifactError, match="line 3 is not valid JSON"):
        read_samples(path)

    broken = sample_row("p1", True, 5, 9)
    del broken["think_tokens"]
    path.write_text(json.dumps(sample_row("p0", True, 5, 9)) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(ArtifactError, match="line 2 is missing field 'think_tokens'"):
        read_samples(path)

    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [sample_row("p1", True, 5, 9), sample_row("p2", True, 5, 9), sample_row("p1", False, 6, 9)]
        )
    )
    with pytest.raises(ArtifactError, match="line 3 duplicates id 'p1' seed 0 sample 0 .first at line 1"):
        read_samples(path)
    # The same id under another seed, or another draw, is a different sample.
    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [sample_row("p1", True, 5, 9), sample_row("p1", False, 6, 9, seed=1), sample_row("p1", True, 5, 9, sample=1)]
        )
    )
    assert len(read_samples(path)) == 3


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("correct", 1, "field 'correct' must be bool"),
        ("think_tokens", 3.0, "field 'think_tokens' must be int"),
        ("think_tokens", True, "field 'think_tokens' must be int"),
        ("finish_reason", "eos", "field 'finish_reason' must be one of"),
        ("model", "level-2", "field 'model' must be"),
        ("level", 4, "field 'level' is 4 but model 'level_2' means 2"),
        ("schema_version", 0, "field 'schema_version' is 0"),
        ("completion_tokens", -1, "field 'completion_tokens' is negative"),
        ("seed", None, "field 'seed' must be int"),
        ("sample", -1, "field 'sample' is negative"),
        ("training_seed", None, "field 'training_seed' is None but model 'level_2' means an int"),
        ("correct_lenient", None, "field 'correct_lenient' must be bool"),
        ("grade_reason", "no_answer", "field 'grade_reason' is 'no_answer' but .* mean 'correct'"),
        ("extra", "x", "unknown field 'extra'"),
    ],
)
def test_bad_field_values_are_named(tmp_path: Path, field, value, message):
    bad = sample_row("p1", True, 5, 9)
    bad[field] = value
    path = tmp_path / "samples.jsonl"
    append_jsonl(path, [bad])
    with pytest.raises(ArtifactError, match=message):
        read_samples(path)


def test_sample_fields_order_and_record_row():
    assert SAMPLE_FIELDS[:3] == ("id", "question", "gold") and SAMPLE_FIELDS[-1] == "schema_version"
    assert list(sample_row("p1", True, 5, 9)) == list(SAMPLE_FIELDS)


def test_metrics_disagreeing_with_samples_name_the_field(run_dir: RunDir):
    write_metrics(run_dir, "base", None)
    write_metrics(run_dir, "level_2", 2)
    path = run_dir.metrics("level_2")
    payload = json.loads(path.read_text())
    payload["think_tokens"]["median"] += 0.5
    path.write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match="disagree with their samples at field 'think_tokens.median'"):
        check_metrics_match_samples(run_dir, "level_2")

    # Samples changed after metrics were written (one more row appended): the count is named first.
    write_metrics(run_dir, "level_2", 2)
    append_jsonl(run_dir.samples("level_2"), [sample_row("p999", True, 4, 8)])
    append_jsonl(run_dir.samples("base"), [sample_row("p999", False, 40, 48, model="base")])
    with pytest.raises(ArtifactError, match="field 'n_problems' .stored 57, samples give 58"):
        check_metrics_match_samples(run_dir, "level_2")

    payload = json.loads(path.read_text())
    del payload["vs_base"]
    path.write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match="missing field 'vs_base'"):
        read_metrics(run_dir, "level_2")


def test_level_needs_base_samples_and_samples_are_required(tmp_path: Path):
    rd = RunDir(tmp_path / "runs" / "tiny")
    append_jsonl(rd.samples("level_1"), [sample_row("p1", True, 50, 60, model="level_1")])
    with pytest.raises(ArtifactError, match="samples not found at .*base"):
        write_metrics(rd, "level_1", 1)
    with pytest.raises(ArtifactError, match="no samples"):
        compute_model_metrics([], model="level_1", level=1, base_samples=None)
