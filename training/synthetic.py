"""Seeded synthetic problems in GSM8K's format, for the tiny study and the default tests.

Each problem has a short question, a reference solution whose steps carry calculator annotations
``<<expr=value>>``, and a ``#### N`` line, so every tool that reads GSM8K reads these the same way.
Problems are one or two steps with numbers up to ``max_number``: small enough that a ~1M-parameter model
learns to solve some of them on a CPU within minutes.
"""

from __future__ import annotations

import random

from training.gsm8k import Problem, parse_gold

NAMES = ["Tom", "Ann", "Sam", "Lia", "Max", "Eva", "Ben", "Mia", "Leo", "Zoe", "Kai", "Ivy"]
OBJECTS = ["pens", "cards", "apples", "books", "coins", "shells", "stamps", "eggs", "cups", "toys"]


def _one_step(rng: random.Random, name: str, obj: str, top: int) -> tuple[str, str]:
    kind = rng.choice(["gets", "gives", "times"])
    if kind == "gets":
        a, b = rng.randint(1, top), rng.randint(1, top)
        question = f"{name} has {a} {obj}, gets {b}. How many {obj} now?"
        return question, f"{name} has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {obj} now.\n#### {a + b}"
    if kind == "gives":
        a = rng.randint(2, top)
        b = rng.randint(1, a)
        question = f"{name} has {a} {obj}, gives {b}. How many {obj} now?"
        return question, f"{name} has {a}-{b} = <<{a}-{b}={a - b}>>{a - b} {obj} left.\n#### {a - b}"
    a, b = rng.randint(2, 5), rng.randint(2, top // 2)
    question = f"{name} has {a} bags of {b} {obj}. How many {obj}?"
    return question, f"{name} has {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {obj} in all.\n#### {a * b}"


def _two_steps(rng: random.Random, name: str, obj: str, top: int) -> tuple[str, str]:
    a, b = rng.randint(1, top), rng.randint(1, top)
    total = a + b
    c = rng.randint(1, total)
    question = f"{name} has {a} {obj}, gets {b}, gives {c}. How many {obj} now?"
    answer = (
        f"{name} has {a}+{b} = <<{a}+{b}={total}>>{total} {obj} after getting {b}.\n"
        f"Then {name} has {total}-{c} = <<{total}-{c}={total - c}>>{total - c} {obj} left.\n"
        f"#### {total - c}"
    )
    return question, answer


def generate_problems(n: int, *, seed: int, max_number: int = 20, split: str = "train") -> list[Problem]:
    """``n`` distinct problems, the same for the same seed. Train and test use disjoint seeds by split name."""
    rng = random.Random(f"{split}:{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        make = _two_steps if rng.random() < 0.5 else _one_step
        question, answer = make(rng, name, obj, max_number)
        if question in seen:
            continue
        seen.add(question)
        problems.append(
            Problem(
                id=f"{split}-{len(problems):05d}", question=question, answer=answer, gold=parse_gold(answer)
            )
        )
    return problems
