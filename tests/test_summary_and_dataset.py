"""summary.json, the sweet spot, the Pareto plot's determinism, and the Hub eval dataset's round trip."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from helpers import sample_row

import eval_artifacts
from eval_artifacts.hub_dataset import (
    SAMPLE_FEATURES,
    build_eval_dataset,
    restore_run_dir_from_eval_dataset,
    samples_from_eval_dataset,
)
from eval_artifacts.metrics import write_metrics
from eval_artifacts.plots import pareto_figure, plot_pareto
from eval_artifacts.rundir import RunDir, append_jsonl
from eval_artifacts.study.errors import ArtifactError
from eval_artifacts.summary import build_summary, read_summary, sweet_spot, write_summary

MODELS = ["base", "level_1", "level_2", "level_3", "level_4", "level_5"]
# (accuracy target, think-token scale) per model: shorter reasoning, mostly lower accuracy.
SHAPE = {
    "base": (0.70, 120),
    "level_1": (0.72, 90),
    "level_2": (0.66, 45),
    "level_3": (0.55, 50),
    "level_4": (0.60, 20),
    "level_5": (0.30, 4),
}


def make_run_dir(root: Path) -> RunDir:
    rd = RunDir(root)
    for index, model in enumerate(MODELS):
        accuracy, scale = SHAPE[model]
        rng = random.Random(100 + index)
        rows = []
        for i in range(48):
            finish = "length" if rng.random() < 0.05 else "stop"
            correct = finish == "stop" and rng.random() < accuracy
            think = rng.randint(max(scale // 2, 1), scale * 2)
            # Every fifth wrong output ends its unfinished reasoning on the gold number: lenient-only credit.
            lenient = not correct and i % 5 == 0
            completion = think + rng.randint(3, 9)
            rows.append(sample_row(f"q{i:02d}", correct, think, completion, model=model, finish=finish, lenient=lenient))
        append_jsonl(rd.samples(model), rows)
    for model in MODELS:
        write_metrics(rd, model, None if model == "base" else int(model[-1]))
    return rd


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> RunDir:
    return make_run_dir(tmp_path_factory.mktemp("runs") / "tiny")


# ---------------------------------------------------------------- summary


def test_summary_carries_metrics_and_an_independent_frontier(study: RunDir):
    summary = write_summary(study, study="tiny", models=MODELS)
    assert read_summary(study) == summary
    assert summary["schema_version"] == 2 and summary["study"] == "tiny"
    assert [entry["model"] for entry in summary["models"]] == MODELS
    metrics = {m: json.loads(study.metrics(m).read_text()) for m in MODELS}
    for entry in summary["models"]:
        source = metrics[entry["model"]]
        for key in (
            "level",
            "n_total",
            "n_correct",
            "accuracy",
            "ci95",
            "n_correct_lenient",
            "accuracy_lenient",
            "n_no_answer",
            "n_truncated",
            "think_tokens",
            "ci_method",
            "vs_base",
            "vs_prompt",
            "training_seed",
        ):
            assert entry[key] == source[key]
        assert entry["kind"] == ("base" if entry["model"] == "base" else "adapter")
        assert entry["n_correct_lenient"] > entry["n_correct"]
    # Frontier recomputed by brute force: nobody at most as many tokens and at least as accurate, one strictly.
    points = {m: (metrics[m]["think_tokens"]["mean"], metrics[m]["accuracy"]) for m in MODELS}
    expected = sorted(
        (
            m
            for m, (t, a) in points.items()
            if not any(
                t2 <= t and a2 >= a and (t2, a2) != (t, a) for m2, (t2, a2) in points.items() if m2 != m
            )
        ),
        key=lambda m: points[m][0],
    )
    assert summary["frontier"] == expected and 1 < len(expected) < len(MODELS)
    assert [e["model"] for e in summary["models"] if e["on_frontier"]] == sorted(expected, key=MODELS.index)


def test_summary_needs_every_metrics_file(tmp_path: Path):
    with pytest.raises(ArtifactError, match="metrics not found at .*level_9"):
        build_summary(RunDir(tmp_path), study="tiny", models=["level_9"])


def _entry(model: str, tokens: float, accuracy: float, delta: float | None, p: float | None) -> dict:
    vs_base = None if delta is None else {"delta": delta, "p_value": p}
    return {"model": model, "think_tokens": {"mean": tokens}, "accuracy": accuracy, "vs_base": vs_base}


SWEET = {
    "models": [
        _entry("base", 150.0, 0.80, None, None),
        _entry("level_1", 100.0, 0.79, -0.01, 0.70),
        _entry("level_2", 60.0, 0.77, -0.03, 0.20),
        _entry("level_3", 40.0, 0.74, -0.06, 0.01),
        _entry("level_4", 30.0, 0.70, -0.10, 0.001),
        _entry("level_5", 10.0, 0.50, -0.30, 1e-9),
    ]
}


@pytest.mark.parametrize(
    "margin,alpha,expected",
    [
        (0.0, 0.05, "level_2"),  # cheapest not significantly worse
        (0.06, 0.05, "level_3"),  # significantly worse but within the margin
        (0.10, 0.05, "level_4"),
        (0.0, 0.25, "level_1"),  # stricter test: level_2's p = 0.20 now counts as worse
        (0.0, 0.9, None),  # every level significantly worse, no margin
    ],
)
def test_sweet_spot(margin, alpha, expected):
    assert sweet_spot(SWEET, margin=margin, alpha=alpha) == expected


def test_sweet_spot_keeps_significantly_better_levels_and_breaks_token_ties_by_accuracy():
    summary = {
        "models": [
            _entry("base", 150.0, 0.60, None, None),
            _entry("level_3", 40.0, 0.66, 0.06, 0.001),
            _entry("level_4", 40.0, 0.70, 0.10, 0.0001),
            _entry("level_5", 5.0, 0.20, -0.40, 1e-12),
        ]
    }
    assert sweet_spot(summary, margin=0.0) == "level_4"


# ---------------------------------------------------------------- plot


def test_plot_is_byte_identical_for_identical_data(study: RunDir, tmp_path: Path):
    summary = build_summary(study, study="tiny", models=MODELS)
    first, second = tmp_path / "a" / "pareto.png", tmp_path / "b" / "pareto.png"
    plot_pareto(summary, first)
    plot_pareto(json.loads(json.dumps(summary)), second)
    data = first.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert data == second.read_bytes()
    assert b"Software" not in data and b"matplotlib" not in data.lower()

    changed = json.loads(json.dumps(summary))
    changed["models"][2]["accuracy"] += 0.05
    plot_pareto(changed, second)
    assert second.read_bytes() != data

    # A later run is another process (another hash seed, fresh font cache lookup): same bytes.
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    script = (
        "import json, pathlib; from eval_artifacts.plots import pareto_figure, plot_pareto; "
        f"plot_pareto(json.loads(pathlib.Path({str(tmp_path / 'summary.json')!r}).read_text()), "
        f"pathlib.Path({str(tmp_path / 'other.png')!r}))"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert (tmp_path / "other.png").read_bytes() == data

    svg_a, svg_b = tmp_path / "a.svg", tmp_path / "b.svg"
    plot_pareto(summary, svg_a)
    plot_pareto(summary, svg_b)
    assert svg_a.read_bytes() == svg_b.read_bytes() and b"<dc:date>" not in svg_a.read_bytes()
    with pytest.raises(ArtifactError, match="use a .png or .svg path"):
        plot_pareto(summary, tmp_path / "pareto.jpg")


def test_plot_labels_overlap_nothing_and_the_legend_hides_no_point(study: RunDir):
    """Points a label's width apart (the tiny study's base and L1 are 0.04 tokens apart) keep readable labels."""
    crowded = build_summary(study, study="tiny", models=MODELS)
    for i, row in enumerate(crowded["models"]):
        row["think_tokens"]["mean"], row["accuracy"] = 24.0 + 0.04 * i, 0.70 - 0.004 * i
        row["ci95"] = [row["accuracy"] - 0.05, row["accuracy"] + 0.05]
    figure = pareto_figure(crowded)
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    [axes] = figure.axes
    labels = {text.get_text(): text.get_window_extent(renderer) for text in axes.texts}
    assert sorted(labels) == ["L1", "L2", "L3", "L4", "L5", "base"]
    boxes = list(labels.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1), (a, b)
    [legend] = figure.legends
    assert legend.get_window_extent(renderer).y1 <= axes.get_window_extent(renderer).y0  # below the axes


# ---------------------------------------------------------------- Hub eval dataset


def test_eval_dataset_configs_types_and_summary(study: RunDir):
    configs = build_eval_dataset(study, models=MODELS)
    assert list(configs) == [*MODELS, "summary"]
    base = configs["base"]["test"]
    assert base.features == SAMPLE_FEATURES and base.num_rows == 48
    assert base.features["reasoning"] == datasets.Value("string") and set(base["reasoning"]) == {None}
    assert set(base["level"]) == {None}
    assert base.features["correct_lenient"] == datasets.Value("bool")
    assert base.features["grade_reason"] == datasets.Value("string")
    rows = [json.loads(line) for line in study.samples("base").read_text().splitlines()]
    assert base["correct_lenient"] == [r["correct_lenient"] for r in rows] and True in base["correct_lenient"]
    assert base["grade_reason"] == [r["grade_reason"] for r in rows] and "no_answer" in base["grade_reason"]
    table = configs["summary"]["test"].to_list()
    assert [r["model"] for r in table] == MODELS
    for r in table:
        metrics = json.loads(study.metrics(r["model"]).read_text())
        assert r["accuracy"] == metrics["accuracy"] and r["n_correct"] == metrics["n_correct"]
        assert (r["ci95_low"], r["ci95_high"]) == tuple(metrics["ci95"])
        assert r["think_tokens_p90"] == metrics["think_tokens"]["p90"]
        assert r["completion_tokens_median"] == metrics["completion_tokens"]["median"]
        assert r["truncated"] == metrics["truncated"]
        for key in ("n_correct_lenient", "accuracy_lenient", "n_no_answer", "n_truncated"):
            assert r[key] == metrics[key]
        if r["model"] == "base":
            assert r["delta_vs_base"] is None and r["p_value_vs_base"] is None and r["level"] is None
        else:
            assert r["delta_vs_base"] == metrics["vs_base"]["delta"]
            assert r["p_value_vs_base"] == metrics["vs_base"]["p_value"]
            assert r["test_vs_base"] == "mcnemar_exact" and r["kind"] == "adapter"
    frontier = build_summary(study, study="tiny", models=MODELS)["frontier"]
    assert [r["model"] for r in table if r["on_frontier"]] == sorted(frontier, key=MODELS.index)


def test_eval_dataset_rows_are_sorted_by_id(tmp_path: Path):
    """Rows appended in batch order are published sorted by (id, seed), the same order in every config."""
    run_dir = make_run_dir(tmp_path / "run")
    for model in MODELS:
        rows = run_dir.samples(model).read_text().splitlines(keepends=True)
        random.Random(model).shuffle(rows)
        run_dir.samples(model).write_text("".join(rows))
    configs = build_eval_dataset(run_dir, models=MODELS)
    expected = [f"q{i:02d}" for i in range(48)]
    assert all(configs[model]["test"]["id"] == expected for model in MODELS)


def test_eval_dataset_round_trip_restores_the_run_dir(study: RunDir, tmp_path: Path):
    configs = build_eval_dataset(study, models=MODELS)
    # What the Hub stores is Parquet: round-trip one config through it as well.
    configs["level_2"]["test"].to_parquet(str(tmp_path / "level_2.parquet"))
    configs["level_2"] = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_parquet(
                str(tmp_path / "level_2.parquet"), features=SAMPLE_FEATURES, cache_dir=str(tmp_path / "cache")
            )
        }
    )
    samples = samples_from_eval_dataset(configs)
    assert sorted(samples) == sorted(MODELS)

    restored = RunDir(tmp_path / "restored")
    assert restore_run_dir_from_eval_dataset(restored, configs) == MODELS
    for model in MODELS:
        assert restored.samples(model).read_bytes() == study.samples(model).read_bytes()
        assert json.loads(restored.metrics(model).read_text()) == json.loads(study.metrics(model).read_text())


def test_eval_dataset_inconsistencies_are_refused(study: RunDir, tmp_path: Path):
    configs = build_eval_dataset(study, models=MODELS)
    table = configs["summary"]["test"].to_list()
    table[3]["n_correct"] += 1
    forged = dict(configs, summary=datasets.DatasetDict({"test": datasets.Dataset.from_list(table)}))
    with pytest.raises(ArtifactError, match="summary row 'level_3' field 'n_correct'"):
        restore_run_dir_from_eval_dataset(RunDir(tmp_path / "a"), forged)
    assert not (tmp_path / "a").exists()  # checked before anything is written
    table = configs["summary"]["test"].to_list()
    table[2]["n_correct_lenient"] -= 1
    forged = dict(configs, summary=datasets.DatasetDict({"test": datasets.Dataset.from_list(table)}))
    with pytest.raises(ArtifactError, match="summary row 'level_2' field 'n_correct_lenient'"):
        restore_run_dir_from_eval_dataset(RunDir(tmp_path / "a"), forged)

    regraded = configs["level_3"]["test"].map(lambda row: {"grade_reason": "wrong"})
    with pytest.raises(ArtifactError, match="config 'level_3' line 1 field 'grade_reason' is 'wrong'"):
        samples_from_eval_dataset(dict(configs, level_3=datasets.DatasetDict({"test": regraded})))

    doubled = datasets.concatenate_datasets(
        [configs["level_5"]["test"], configs["level_5"]["test"].select([7])]
    )
    with pytest.raises(ArtifactError, match="config 'level_5' row 49 duplicates id 'q07' seed 0"):
        samples_from_eval_dataset(dict(configs, level_5=datasets.DatasetDict({"test": doubled})))

    swapped = dict(configs, level_1=configs["level_2"])
    with pytest.raises(ArtifactError, match="config 'level_1' row 1 is for model 'level_2'"):
        samples_from_eval_dataset(swapped)

    no_base = {k: v for k, v in configs.items() if k != "base"}
    with pytest.raises(ArtifactError, match="no 'base' config"):
        restore_run_dir_from_eval_dataset(RunDir(tmp_path / "b"), no_base)


def test_eval_dataset_refuses_metrics_that_disagree_with_samples(tmp_path: Path):
    rd = make_run_dir(tmp_path / "tiny")
    path = rd.metrics("level_4")
    payload = json.loads(path.read_text())
    payload["accuracy"] = 0.99
    path.write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match="level_4.*disagree with their samples at field 'accuracy'"):
        build_eval_dataset(rd, models=MODELS)


def test_eval_artifacts_imports_only_itself_stdlib_and_its_four_libraries():
    """DESIGN.md: ``eval_artifacts`` depends on nothing of ours, so cards and training can both use it."""
    allowed = {"eval_artifacts", "numpy", "scipy", "matplotlib", "datasets"} | set(sys.stdlib_module_names)
    package = Path(eval_artifacts.__file__).parent
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{source.name} imports {name}"
