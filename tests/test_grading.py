"""Strict grading (``training.gsm8k.grade``) beside the lenient rule, and the arithmetic check that picks the
adapter cards' example output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eval_artifacts.arithmetic import chain_checks_out
from training.gsm8k import extract_answer, grade, load_local_split, numbers_equal, strip_annotations

# (completion, finish_reason, kind, strict answer read, grade_reason, lenient verdict) with gold 72.
GRADES = [
    # Adapters (and prompt-only baselines): the answer after a closed think block, in the level format.
    ("<think>\nm=48/2=24→t=48+24=72\n</think>\n#### 72", "stop", "adapter", "72", "correct", True),
    ("<think>\nm=48/2=24→t=48+24=71\n</think>\n#### 71", "stop", "adapter", "71", "wrong", False),
    ("<think>\n48/2=24\n</think>\nThe total is 72", "stop", "adapter", "72", "correct", True),
    ("<think>\n48/2=24; 48+24=72", "stop", "adapter", None, "no_answer", True),  # never closed
    ("<think>\n48/2=24; 48+24=72", "length", "adapter", None, "truncated", True),
    ("<think>\n48/2=24; 48+24=72\n</think>\n", "stop", "adapter", None, "no_answer", True),  # nothing after
    ("#### 72", "stop", "adapter", None, "no_answer", True),  # no think block: not the level format
    # Cut by the token limit: the unfinished last line is not read ("#### 72" may have been "#### 720"), and
    # only an answer marked as final counts.
    ("<think>\n48/2=24\n</think>\n#### 72", "length", "adapter", None, "truncated", True),
    ("<think>\n48/2=24\n</think>\n#### 72\n#### 72\n###", "length", "adapter", "72", "correct", True),
    ("<think>\n48/2=24\n</think>\nso 48+24=72\nthen", "length", "adapter", None, "truncated", True),
    # The stock model: a marked final answer (####, \boxed, "the answer is") in its last 5 non-blank lines.
    ("Natalia sold 48/2 = 24 clips.\n48+24 = 72\n#### 72", "stop", "stock", "72", "correct", True),
    ("48/2 = 24 in May.\nSo the answer is 72.", "stop", "stock", "72", "correct", True),
    ("48/2 = 24\n\n### Final Answer:\n$$\n\\boxed{72}\n$$", "stop", "stock", "72", "correct", True),
    ("48/2 = 24\n**Final Answer:**\n**72** clips", "stop", "stock", "72", "correct", True),
    ("48/2 = 24\nThe answer is 70.", "stop", "stock", "70", "wrong", False),
    ("Natalia sold 48+24 = 72 clips altogether.", "stop", "stock", None, "no_answer", True),  # unmarked
    # An announcement far from the end is not the final answer (the lenient rule takes it).
    ("The answer is 72, or so I think.\nb\nc\nd\ne\nf\nso 71", "stop", "stock", None, "no_answer", True),
    ("Natalia sold 48/2 = 24 clips.\nThen 48+24 = 72", "length", "stock", None, "truncated", True),
    ("48/2 = 24\n48+24 = 72\n#### 72", "length", "stock", None, "truncated", True),
    ("48/2 = 24\n48+24 = 72\n#### 72\nNatalia", "length", "stock", "72", "correct", True),
]


@pytest.mark.parametrize(("completion", "finish", "kind", "answer", "reason", "lenient"), GRADES)
def test_grade(completion, finish, kind, answer, reason, lenient):
    graded = grade(completion, "72", finish_reason=finish, kind=kind)
    assert (graded.predicted, graded.reason, graded.correct_lenient) == (answer, reason, lenient)
    assert graded.correct == (reason == "correct")
    assert graded.correct_lenient == numbers_equal(extract_answer(completion)[0], "72")  # the lenient rule


def test_grade_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="'adapter', 'stock'"):
        grade("#### 72", "72", finish_reason="stop", kind="prompt")


# ---------------------------------------------------------------- outputs cut inside their think block

# GSM8K-style reference solutions (calculator annotations and "#### N" line), written for this test.
SOLUTIONS = [
    (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    ),
    (
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    ),
    (
        "Betty has 100 / 2 = $<<100/2=50>>50.\nHer grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
        "She needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"
    ),
    (
        "James writes 3 * 2 = <<3*2=6>>6 pages a week to each friend.\n"
        "So he writes 6 * 2 = <<6*2=12>>12 pages a week.\n"
        "That means he writes 12 * 52 = <<12*52=624>>624 pages a year.\n#### 624"
    ),
    (
        "There are 80/100 * 10 = <<80/100*10=8>>8 more purple flowers than yellow flowers.\n"
        "So there are 10 + 8 = <<10+8=18>>18 purple flowers.\n"
        "Purple and yellow flowers sum up to 10 + 18 = <<10+18=28>>28 flowers.\n"
        "That means in Mark's garden there are 25/100 * 28 = <<25/100*28=7>>7 green flowers.\n"
        "So in total Mark has 28 + 7 = <<28+7=35>>35 plants in his garden.\n#### 35"
    ),
]
CUTS = (0.5, 0.8, 1.0)
"""Share of the reasoning left before the cut; 1.0 is cut just before the answer line."""


def cut_in_think_block(solution: str, share: float) -> tuple[str, str]:
    """The solution as a level-format output cut after ``share`` of its reasoning, and its gold answer."""
    reasoning, gold = strip_annotations(solution).split("####")
    reasoning = reasoning.strip()
    return "<think>\n" + reasoning[: int(len(reasoning) * share)], gold.strip()


def assert_never_credited(solution: str) -> list[bool]:
    """Grade every cut of ``solution`` both ways; return the lenient verdicts of the length-cut ones."""
    lenient = []
    for share in CUTS:
        completion, gold = cut_in_think_block(solution, share)
        for finish, reason in (("length", "truncated"), ("stop", "no_answer")):
            graded = grade(completion, gold, finish_reason=finish, kind="adapter")
            assert (graded.correct, graded.predicted, graded.reason) == (False, None, reason), completion
            assert graded.correct_lenient == numbers_equal(extract_answer(completion)[0], gold)
        lenient.append(graded.correct_lenient)
    return lenient


def test_outputs_cut_inside_their_think_block_are_never_credited():
    lenient = [assert_never_credited(solution) for solution in SOLUTIONS]
    # The lenient rule credits the last number of unfinished reasoning: Natalia's cut at 80% ("48+24 = 72
    # clips altogethe"), and every solution cut just before its answer line.
    assert lenient == [[False, True, True]] + [[False, False, True]] * 4


@pytest.mark.realdata
def test_real_gsm8k_solutions_cut_inside_their_think_block_are_never_credited():
    problems = load_local_split(Path(os.environ["COT_GSM8K_DIR"]), "test")
    lenient = [assert_never_credited(problem.answer) for problem in problems]
    credited = [sum(verdicts[index] for verdicts in lenient) for index in range(len(CUTS))]
    print(f"GSM8K test, {len(problems)} solutions cut at {CUTS}: lenient rule credits {credited}")
    assert len(problems) == 1319 and credited[-1] > credited[0]


# ---------------------------------------------------------------- the cards' example: arithmetic that checks out

# (reasoning, answer, checks out)
CHAINS = [
    ("m=48/2=24→t=48+24=72", "72", True),
    ("48/2 = 24; 48 + 24 = 72", "72", True),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.", "72", True),
    ("48+48/2", "72", True),  # Level 5: the final expression alone
    ("72", "72", True),  # or the answer alone
    ("s=14+5=18→a=18-8=11", "11", False),  # 14+5 is 19: two errors that cancel
    ("s=14+5=19→a=19-8=11", "11", True),
    ("48/2=24; 48+24=72", "71", False),  # holds, but does not end at the answer
    ("48+48/2", "71", False),
    ("She sold half as many, so twice that in all.", "72", False),  # nothing to check
    (None, "72", False),
]


@pytest.mark.parametrize(("reasoning", "answer", "expected"), CHAINS)
def test_chain_checks_out(reasoning, answer, expected):
    assert chain_checks_out(reasoning, answer) is expected
