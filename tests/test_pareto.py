"""The Pareto frontier of (mean think tokens, accuracy) on hand-made point sets, ties included."""

from __future__ import annotations

import pytest

from eval_artifacts.pareto import pareto_frontier


def test_typical_study_shape():
    points = {
        "base": (212.4, 0.91),
        "level_1": (180.0, 0.90),
        "level_2": (95.5, 0.88),
        "level_3": (101.0, 0.86),  # more tokens and less accurate than level_2: dominated
        "level_4": (31.2, 0.84),
        "level_5": (8.0, 0.62),
    }
    assert pareto_frontier(points) == ["level_5", "level_4", "level_2", "level_1", "base"]


def test_same_tokens_keeps_only_the_more_accurate():
    points = {"a": (50.0, 0.70), "b": (50.0, 0.75), "c": (20.0, 0.40)}
    assert pareto_frontier(points) == ["c", "b"]


def test_same_accuracy_keeps_only_the_cheaper():
    points = {"a": (50.0, 0.70), "b": (35.0, 0.70), "c": (80.0, 0.90)}
    assert pareto_frontier(points) == ["b", "c"]


def test_identical_points_are_both_kept_and_sorted_by_name():
    points = {"level_2": (40.0, 0.8), "level_1": (40.0, 0.8), "level_3": (45.0, 0.79), "level_4": (10.0, 0.5)}
    assert pareto_frontier(points) == ["level_4", "level_1", "level_2"]


def test_identical_points_both_dominated_by_a_third():
    points = {"x": (40.0, 0.8), "y": (40.0, 0.8), "z": (39.0, 0.8)}
    assert pareto_frontier(points) == ["z"]


def test_one_point_dominates_everything_and_single_points():
    assert pareto_frontier({"a": (10.0, 0.9), "b": (11.0, 0.9), "c": (10.0, 0.2), "d": (99.0, 0.95)}) == [
        "a",
        "d",
    ]
    assert pareto_frontier({"only": (5.0, 0.1)}) == ["only"]
    assert pareto_frontier({}) == []


def test_non_finite_points_are_rejected():
    with pytest.raises(ValueError, match="'bad' is not finite"):
        pareto_frontier({"bad": (float("nan"), 0.5), "ok": (1.0, 0.5)})
