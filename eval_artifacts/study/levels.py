"""The five compression levels: one table used by the teachers, the prompts, the cards and the tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

from eval_artifacts.study.errors import ConfigError


@dataclass(frozen=True)
class Level:
    number: int
    name: str
    style: str
    typical_length: str
    example: str

    @property
    def key(self) -> str:
        """The model name of the level's published adapter (the first training seed's): ``level_4``."""
        return f"level_{self.number}"

    def seed_key(self, training_seed: int) -> str:
        """The model name of the adapter trained with another training seed: ``level_4_seed43``."""
        return f"{self.key}_seed{training_seed}"

    @property
    def prompt_key(self) -> str:
        """The model name of the level's prompt-only baseline (base model, level prompt, no adapter)."""
        return f"prompt_l{self.number}"

    @property
    def rl_key(self) -> str:
        """The model name of the level's SFT adapter continued with GRPO: ``rl_l4``."""
        return f"rl_l{self.number}"

    @property
    def max_chars(self) -> int:
        """The upper end of ``typical_length`` in characters: the reasoning length a level should not pass."""
        return int(re.findall(r"\d+", self.typical_length)[-1])


LEVELS: dict[int, Level] = {
    level.number: level
    for level in (
        Level(
            1,
            "Full",
            "every step in full sentences, like the GSM8K reference solution without calculator annotations",
            "200–400 chars",
            "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May.",
        ),
        Level(
            2,
            "Concise",
            "one short clause per step, with its arithmetic",
            "~100–150 chars",
            "May clips: 48/2 = 24. Total clips: 48+24 = 72.",
        ),
        Level(3, "Equations", "the equations only, `;`-separated", "~60–90 chars", "48/2=24; 48+24=72"),
        Level(
            4,
            "Ultra-compact",
            "a short variable chain with arrows",
            "~45 chars",
            "m=48/2=24→t=48+24=72",
        ),
        Level(5, "Minimal", "the single final expression, or the answer alone", "≤ 20 chars", "48+48/2"),
    )
}

PROMPT_TEMPLATE = "Solve this using Level {number} ({name}).\nProblem: {question}"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_MARKER = "####"
STOCK_ANSWER_LINES = 5
"""The stock model is not trained on the level format: its final answer is a marked one (``#### N``,
``\\boxed{N}``, "the answer is N") in its last this many non-blank lines, or it gave none."""

_THINK_RE = re.compile(r"<think>\s*(.*?)\s*</think>", re.DOTALL)


def get_level(number: int) -> Level:
    try:
        return LEVELS[int(number)]
    except (KeyError, ValueError):
        raise ConfigError(f"level {number!r} does not exist; levels are {sorted(LEVELS)}") from None


def build_prompt(level: int, question: str) -> str:
    spec = get_level(level)
    return PROMPT_TEMPLATE.format(number=spec.number, name=spec.name, question=question.strip())


BASELINE_PROMPT_TEMPLATE = (
    "Solve this using Level {number} ({name}). Reasoning style: {style} ({typical_length}), for example "
    "`{example}`.\n"
    "Write the reasoning inside {think_open}…{think_close}, then the final answer on its own line as "
    "`{marker} <number>`.\n"
    "Problem: {question}"
)
"""The prompt-only baseline's user message. The stock model has never seen what "Level 4" means, so the
level's style, length and answer format are spelled out, as Chain of Draft does: the baseline measures
what asking buys, and the adapter's delta against it measures what training buys on top."""


def build_baseline_prompt(level: int, question: str) -> str:
    spec = get_level(level)
    return BASELINE_PROMPT_TEMPLATE.format(
        number=spec.number,
        name=spec.name,
        style=spec.style,
        typical_length=spec.typical_length,
        example=spec.example,
        think_open=THINK_OPEN,
        think_close=THINK_CLOSE,
        marker=ANSWER_MARKER,
        question=question.strip(),
    )


def build_response(reasoning: str, answer: str) -> str:
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n{ANSWER_MARKER} {answer}"


@dataclass(frozen=True)
class ParsedResponse:
    reasoning: str | None
    """Text strictly inside ``<think>…</think>``; None when the output has no closed think block."""
    after_think: str
    """Everything after the think block (the whole text when there is none): where the answer lives."""


def parse_response(text: str) -> ParsedResponse:
    """Split a model response into its reasoning and the part that carries the answer."""
    match = _THINK_RE.search(text)
    if match is None:
        return ParsedResponse(reasoning=None, after_think=text)
    return ParsedResponse(reasoning=match.group(1), after_think=text[match.end() :])
