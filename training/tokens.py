"""Think-token counting: one counter for every model, so compressed and stock outputs compare fairly.

Think tokens are the tokens strictly inside ``<think>…</think>``, counted with the base model's tokenizer
(the newlines that frame the block are format, not reasoning, and are not counted). An output with no
think block (the stock model) is charged the tokens before its final-answer line (``#### N`` or
"The answer is N"); with no such line, the whole output is reasoning. A think block that was opened but
never closed (a truncated output) is charged everything after ``<think>``.
"""

from __future__ import annotations

import re

from eval_artifacts.study.levels import THINK_CLOSE, THINK_OPEN, parse_response

# The start of the last line that carries the final answer.
_ANSWER_LINE_RE = re.compile(r"^[^\n]*?(?:####|the answer is)", re.IGNORECASE | re.MULTILINE)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` alone, without any special tokens the tokenizer would add."""
    if not text:
        return 0
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def reasoning_text(completion: str) -> str:
    """The part of a completion that counts as thinking (see the module docstring)."""
    parsed = parse_response(completion)
    if parsed.reasoning is not None:
        return parsed.reasoning
    if THINK_OPEN in completion:
        return completion.split(THINK_OPEN, 1)[1].replace(THINK_CLOSE, "").strip()
    answer_lines = list(_ANSWER_LINE_RE.finditer(completion))
    if not answer_lines:
        return completion.strip()
    return completion[: answer_lines[-1].start()].strip()


def think_tokens(tokenizer, completion: str) -> int:
    """Think tokens of one completion, counted with ``tokenizer`` (the base model's)."""
    return count_tokens(tokenizer, reasoning_text(completion))
