"""What several test modules build: sample rows (and, below, tiny models). Test modules import only this."""

from __future__ import annotations

from eval_artifacts.records import SampleRecord, model_level
from eval_artifacts.study.levels import build_prompt


def sample_row(
    pid: str,
    correct: bool,
    think: int,
    completion: int,
    *,
    model: str = "level_2",
    seed: int = 0,
    finish: str = "stop",
) -> dict:
    """One valid samples.jsonl row with these grading and token counts, its text consistent with them.

    The gold answer is 14; a wrong answer that finished says 13, one cut by the token limit says nothing.
    """
    level = model_level(model)
    question = f"Problem {pid}: Tom has 12 pens, gets 7, gives 5."
    predicted = "14" if correct else (None if finish == "length" else "13")
    reasoning = None if level is None else "x" * think
    body = "x" * think if level is None else f"<think>\n{reasoning}\n</think>"
    return SampleRecord(
        id=pid,
        question=question,
        gold="14",
        prompt=question if level is None else build_prompt(level, question),
        completion=body if predicted is None else f"{body}\n#### {predicted}",
        reasoning=reasoning,
        predicted=predicted,
        extractor=None if predicted is None else "hash",
        correct=correct,
        think_tokens=think,
        completion_tokens=completion,
        finish_reason=finish,
        model=model,
        level=level,
        seed=seed,
    ).to_row()
