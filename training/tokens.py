"""Think-token counting: one counter for every model, so compressed and stock outputs compare fairly.

Think tokens are the tokens strictly inside ``<think>…</think>``, counted with the base model's tokenizer
(the newlines that frame the block are format, not reasoning, and are not counted). An output with no
think block (the stock model) is charged the tokens before the line holding the final answer that the
strict grading rule reads (``gsm8k.final_answer_start``: ``#### N``, ``\\boxed{N}``, "the answer is N" in its
last lines); with none, the whole output is reasoning. A think block that was opened but never closed (a
truncated output) is charged everything after ``<think>``.
"""

from __future__ import annotations

from eval_artifacts.study.levels import THINK_CLOSE, THINK_OPEN, parse_response
from training.gsm8k import final_answer_start


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` alone, without any special tokens the tokenizer would add."""
    if not text:
        return 0
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def reasoning_text(completion: str, *, finish_reason: str = "stop") -> str:
    """The part of a completion that counts as thinking (see the module docstring)."""
    parsed = parse_response(completion)
    if parsed.reasoning is not None:
        return parsed.reasoning
    if THINK_OPEN in completion:
        return completion.split(THINK_OPEN, 1)[1].replace(THINK_CLOSE, "").strip()
    answer_start = final_answer_start(completion, finish_reason=finish_reason, kind="stock")
    return completion[:answer_start].strip() if answer_start is not None else completion.strip()


def think_tokens(tokenizer, completion: str, *, finish_reason: str = "stop") -> int:
    """Think tokens of one completion, counted with ``tokenizer`` (the base model's)."""
    return count_tokens(tokenizer, reasoning_text(completion, finish_reason=finish_reason))
