"""Teachers write each level's reasoning for a problem. A row is kept only if its answer matches gold.

``rule`` rewrites GSM8K's reference solution deterministically, offline, from its calculator annotations.
``model`` prompts a causal LM with the level's spec and a few worked examples (see ``ModelTeacher``).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass

from eval_artifacts.study.levels import LEVELS, build_prompt, build_response
from training.gsm8k import Problem, Step, extract_answer, numbers_equal, solution_steps, strip_annotations

L5_MAX_CHARS = 20


@dataclass(frozen=True)
class TeacherRow:
    """One SFT row, or the reason it was dropped."""

    problem_id: str
    reasoning: str | None
    answer: str | None
    dropped: str | None = None


def _final_chain(problem: Problem) -> tuple[list[Step] | None, str | None]:
    """The solution's steps up to the last one whose result is the gold answer, or the reason there are none."""
    steps = solution_steps(problem.answer)
    if not steps:
        return None, "no_arithmetic_steps"
    ends = [index for index, step in enumerate(steps) if numbers_equal(step.value, problem.gold)]
    if not ends:
        return None, "chain_result_not_gold"
    chain = steps[: ends[-1] + 1]
    if not all(step.arithmetic_ok for step in chain):
        return None, "arithmetic_error"
    return chain, None


def _spaced(expression: str) -> str:
    return re.sub(r"\s*([-+*/])\s*", r" \1 ", expression).replace("( ", "(").replace(" )", ")").strip()


def _variable_names(chain: list[Step]) -> list[str]:
    """A letter per step, from the word that follows its result in the sentence (``24 clips`` → ``c``)."""
    names: list[str] = []
    for step in chain:
        match = re.search(re.escape(step.value) + r"\s+([A-Za-z])", step.sentence)
        candidates = ([match.group(1).lower()] if match else []) + list("abcdefghkmnpqrstuvwxyz")
        names.append(next(c for c in candidates if c not in names))
    return names


def _clause(step: Step) -> str:
    """A short clause: the sentence's leading words (no digits), then the step's arithmetic."""
    words = []
    for word in step.sentence.split():
        if any(ch.isdigit() for ch in word) or len(words) == 3:
            break
        words.append(word.strip(",.;:$"))
    head = " ".join(w for w in words if w)
    return (
        f"{head}: {_spaced(step.expression)} = {step.value}"
        if head
        else f"{_spaced(step.expression)} = {step.value}"
    )


def rule_reasoning(level: int, chain: list[Step], gold: str) -> str:
    """Level ``level``'s reasoning for a verified chain of steps."""
    if level == 1:
        return "\n".join(dict.fromkeys(step.sentence for step in chain))
    if level == 2:
        return ". ".join(_clause(step) for step in chain) + "."
    if level == 3:
        return "; ".join(f"{_spaced(step.expression)} = {step.value}" for step in chain)
    if level == 4:
        names = _variable_names(chain)
        return "→".join(
            f"{name}={step.expression}={step.value}" for name, step in zip(names, chain, strict=True)
        )
    if level == 5:
        final = chain[-1].expression
        return final if len(final) <= L5_MAX_CHARS else gold
    raise ValueError(f"unknown level {level}")


def _full_sentences(problem: Problem, chain: list[Step]) -> str:
    """Level 1: the reference solution's lines up to the final step, calculator annotations removed."""
    lines = [
        " ".join(strip_annotations(line).split()) for line in problem.answer.split("####")[0].splitlines()
    ]
    lines = [line for line in lines if line]
    return "\n".join(lines[: lines.index(chain[-1].sentence) + 1])


def rule_teacher(level: int, problem: Problem) -> TeacherRow:
    chain, reason = _final_chain(problem)
    if chain is None:
        return TeacherRow(problem.id, None, None, dropped=reason)
    reasoning = _full_sentences(problem, chain) if level == 1 else rule_reasoning(level, chain, problem.gold)
    return TeacherRow(problem.id, reasoning, chain[-1].value)


# ---------------------------------------------------------------- model teacher


def teacher_instruction(level: int, examples: list[tuple[str, str, str]]) -> str:
    """The instruction a model teacher gets: the level's spec and worked examples in the target format."""
    spec = LEVELS[level]
    lines = [
        f"Rewrite the reasoning for math problems at Level {spec.number} ({spec.name}): {spec.style}, "
        f"{spec.typical_length}. Reply in exactly this format:",
        "<think>\nREASONING\n</think>\n#### ANSWER",
    ]
    for question, reasoning, answer in examples:
        lines += ["", f"Problem: {question}", build_response(reasoning, answer)]
    return "\n".join(lines)


def parse_teacher_output(text: str, gold: str) -> tuple[str | None, str | None, str | None]:
    """(reasoning, answer, drop reason) from a model teacher's output."""
    from eval_artifacts.study.levels import parse_response

    parsed = parse_response(text)
    answer, _ = extract_answer(text)
    if parsed.reasoning is None or not parsed.reasoning.strip():
        return None, answer, "no_think_block"
    if not numbers_equal(answer, gold):
        return parsed.reasoning.strip(), answer, "answer_not_gold"
    return parsed.reasoning.strip(), answer, None


def sft_row(level: int, problem: Problem, reasoning: str, answer: str, teacher: str) -> dict:
    return {
        "id": problem.id,
        "prompt": build_prompt(level, problem.question),
        "completion": build_response(reasoning, answer),
        "reasoning": reasoning,
        "answer": answer,
        "teacher": teacher,
    }


def reasoning_char_stats(rows: list[dict]) -> dict:
    lengths = [len(row["reasoning"]) for row in rows]
    if not lengths:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": round(statistics.fmean(lengths), 2), "median": float(statistics.median(lengths))}


class ModelTeacher:
    """A causal LM writes each level's reasoning, prompted with the level's spec and worked examples.

    The examples are the rule teacher's rewrites of the first problems it can verify, so the model sees
    the exact target format. Rows are appended to ``train.jsonl`` (kept) or ``dropped.jsonl`` (id and
    reason) batch by batch; a rerun skips every id already in either file, so a killed run resumes.
    """

    def __init__(self, config, *, engine=None):
        self.config = config
        if engine is None:
            from training.generate import GenerationEngine

            engine = GenerationEngine(config.teacher.model_id, revision=config.teacher.revision)
        self.engine = engine

    def examples(self, level: int, problems: list[Problem]) -> list[tuple[str, str, str]]:
        shots = []
        for problem in problems:
            if len(shots) == self.config.teacher.few_shot:
                break
            row = rule_teacher(level, problem)
            if row.dropped is None:
                shots.append((problem.question, row.reasoning, row.answer))
        return shots

    def write_level(self, level: int, problems: list[Problem], path) -> tuple[list[dict], Counter]:
        from pathlib import Path

        from eval_artifacts.rundir import append_jsonl, iter_jsonl, repair_jsonl_tail

        path = Path(path)
        dropped_path = path.with_name("dropped.jsonl")
        for file in (path, dropped_path):
            repair_jsonl_tail(file)
        kept = list(iter_jsonl(path, what="SFT data")) if path.is_file() else []
        dropped = list(iter_jsonl(dropped_path, what="dropped rows")) if dropped_path.is_file() else []
        done = {row["id"] for row in kept} | {row["id"] for row in dropped}
        # Few-shot examples are left out of the rows the model writes: it would copy them.
        shots = self.examples(level, problems)
        shot_questions = {question for question, _, _ in shots}
        examples_used = [p for p in problems if p.id not in done and p.question in shot_questions]
        append_jsonl(dropped_path, [{"id": p.id, "reason": "used_as_example"} for p in examples_used])
        dropped += [{"id": p.id, "reason": "used_as_example"} for p in examples_used]
        todo = [p for p in problems if p.id not in done and p.question not in shot_questions]
        instruction = teacher_instruction(level, shots)
        prompts = [f"{instruction}\n\nProblem: {problem.question}" for problem in todo]
        teacher_name = f"model:{self.config.teacher.model_id}"
        batches = self.engine.generate(
            prompts, adapter=None, max_new_tokens=self.config.teacher.max_new_tokens,
            batch_size=self.config.teacher.batch_size,
        )  # fmt: skip
        for batch in batches:
            new_kept, new_dropped = [], []
            for generation in batch:
                problem = todo[generation.index]
                reasoning, answer, reason = parse_teacher_output(generation.text, problem.gold)
                if reason is None:
                    new_kept.append(sft_row(level, problem, reasoning, answer, teacher_name))
                else:
                    new_dropped.append({"id": problem.id, "reason": reason})
            append_jsonl(path, new_kept)
            append_jsonl(dropped_path, new_dropped)
            kept += new_kept
            dropped += new_dropped
        return kept, Counter(row["reason"] for row in dropped)
