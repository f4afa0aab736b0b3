"""GSM8K: loading, gold answers, calculator annotations, reasoning steps, answer extraction and grading.

Answer extraction is an ordered list of named extractors, as in lm-evaluation-harness: the first one that
matches wins, its name is recorded with the sample, and no match gives ``None`` instead of an exception.
Grading (``grade``) reads the final answer strictly, from the part of the output a finished answer lives
in, and also gives the lenient verdict of ``extract_answer`` on the whole output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eval_artifacts.arithmetic import (
    clean_expression,
    equation_holds,
    normalize_number,
    numbers_equal,
    plain_equations,
    safe_eval,
)
from eval_artifacts.records import grade_reason
from eval_artifacts.study.errors import DataError
from eval_artifacts.study.levels import STOCK_ANSWER_LINES, parse_response

# ---------------------------------------------------------------- numbers

# A leading "-" or the Unicode minus sign (U+2212), which models and LaTeX renderers emit.
_NUMBER = r"[-−]?\$?\d[\d,]*(?:\.\d+)?|[-−]?\$?\.\d+"


# ---------------------------------------------------------------- gold answers and annotations

_GOLD_RE = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
ANNOTATION_RE = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def parse_gold(answer_text: str) -> str:
    """The gold answer after ``####``, normalised. Raises DataError when there is none."""
    match = _GOLD_RE.search(answer_text)
    gold = normalize_number(match.group(1)) if match else None
    if gold is None:
        raise DataError(f"GSM8K answer has no parsable '#### N' final line: {answer_text[-80:]!r}")
    return gold


# ---------------------------------------------------------------- reasoning steps


@dataclass(frozen=True)
class Step:
    sentence: str
    """The line of the reference solution with annotations removed."""
    expression: str
    """Normalised arithmetic: ``48/2``."""
    value: str
    """Normalised stated result: ``24``."""
    arithmetic_ok: bool


def strip_annotations(text: str) -> str:
    return ANNOTATION_RE.sub("", text)


def solution_steps(answer_text: str) -> list[Step]:
    """The arithmetic steps of a GSM8K reference solution, in order.

    A line's calculator annotations ``<<expr=value>>`` are its steps; a line without one contributes its
    plain-text equation (``20/4 = $5``), as GSM8K's last lines often are unannotated.
    """
    body = answer_text.split("####")[0]
    steps: list[Step] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        sentence = " ".join(strip_annotations(line).split())
        annotations = ANNOTATION_RE.findall(line)
        pairs = annotations or plain_equations(line)
        for expression, stated in pairs:
            expression = clean_expression(expression)
            value = normalize_number(stated)
            if not expression or value is None:
                continue
            arithmetic_ok = equation_holds(expression, stated)
            # A plain-text match that does not check out is a misread (``1/2 = 1/4`` read as ``= 1``), not a
            # wrong step: annotations are the solution's own claims, free text is only our parse of it.
            if not annotations and not arithmetic_ok:
                continue
            steps.append(Step(sentence, expression, value, arithmetic_ok))
    return steps


# ---------------------------------------------------------------- answer extraction from model output

# "#### 18", also with markdown emphasis or a currency sign before the number ("#### **18** per day").
_HASH_RE = re.compile(r"####\s*[*_]*\s*(" + _NUMBER + r")")
# "the answer is" / "Answer:" / "final answer =" and the rest of that line, or the next line when the
# announcement ends its own ("**Final Answer:**" then "**72**"). The connector is required, so the verb
# ("needs to answer 34-16 = 18 questions") is not taken for an announcement of the answer.
_ANSWER_IS_RE = re.compile(
    r"(?:final answer|the answer|answer)[*_]*\s*(?:is\b|:|=)[*_\s]*[:=]?([^\n]*)", re.IGNORECASE
)
# An arithmetic chain at the start of the announced answer: "12 + 6 = 18" means 18, "5 apples" means 5.
_CHAIN_RE = re.compile(
    r"^[\s*_]*((?:" + _NUMBER + r")(?:\s*(?:[-+*/×÷x=]|−)\s*\$?(?:" + _NUMBER + r"))*)"
)
_ANY_NUMBER_RE = re.compile(_NUMBER)
# LaTeX inside \boxed{}: thousands separators ("1{,}234", "1\,234"), escaped signs, \text{} units.
_LATEX_NOISE_RE = re.compile(r"\{,\}|\\[,!;: ]|\\\$|\\%|%|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


Found = tuple[str, int]
"""What an extractor read: the answer's text, and where in the text its match starts."""


def _last(pattern: re.Pattern) -> Callable[[str], Found | None]:
    def extract(text: str) -> Found | None:
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        match = matches[-1]
        return match.group(1 if pattern.groups else 0), match.start()

    return extract


def _announced_answer(text: str) -> Found | None:
    """The number of the last "the answer is …": the result of a chain like ``12 + 6 = 18``."""
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        chain = _CHAIN_RE.match(match.group(1))
        if chain:
            return _ANY_NUMBER_RE.findall(chain.group(1))[-1], match.start()
    return None


def _boxed_contents(text: str) -> list[tuple[str, int]]:
    """What each ``\\boxed{…}`` holds, nested braces included (``\\boxed{\\dfrac{36}{2}}``), and where it starts."""
    contents = []
    for match in re.finditer(r"\\boxed\{", text):
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth == 0:
            contents.append((text[match.end() : end - 1], match.start()))
    return contents


def _boxed_answer(text: str) -> Found | None:
    """The last boxed value: a number, or a fraction or plain arithmetic that evaluates to one."""
    for content, start in reversed(_boxed_contents(text)):
        cleaned = _LATEX_NOISE_RE.sub("", content).replace("$", "").strip()
        cleaned = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", cleaned).replace("\\cdot", "*").replace("\\times", "*")
        if re.fullmatch(_NUMBER, cleaned):
            return cleaned, start
        value = safe_eval(cleaned)
        if value is not None:
            return str(value), start
    return None


EXTRACTORS: list[tuple[str, Callable[[str], Found | None]]] = [
    ("hash", _last(_HASH_RE)),
    ("boxed", _boxed_answer),
    ("answer_is", _announced_answer),
    ("last_number", _last(_ANY_NUMBER_RE)),
]


# The extractors that read only an answer the output marks as final.
MARKED_EXTRACTORS = [(name, extractor) for name, extractor in EXTRACTORS if name != "last_number"]


def _first_found(text: str, extractors: list) -> tuple[str, str, int] | None:
    """The first extractor's normalised answer, its name and where its match starts in ``text``."""
    for name, extractor in extractors:
        found = extractor(text)
        answer = normalize_number(found[0]) if found else None
        if answer is not None:
            return answer, name, found[1]
    return None


def _first_answer(text: str, extractors: list) -> tuple[str | None, str | None]:
    found = _first_found(text, extractors)
    return (found[0], found[1]) if found else (None, None)


def extract_answer(text: str) -> tuple[str | None, str | None]:
    """The normalised answer in a model output and the name of the extractor that found it.

    Reasoning inside ``<think>…</think>`` is ignored when the output has a think block and something after it,
    so an intermediate number in the reasoning is never taken for the answer.
    """
    parsed = parse_response(text)
    search_in = parsed.after_think if parsed.reasoning is not None and parsed.after_think.strip() else text
    return _first_answer(search_in, EXTRACTORS)


# ---------------------------------------------------------------- grading

GRADE_KINDS = ("adapter", "stock")
"""How an output's final answer is read: ``adapter`` (the level format: after a closed think block; also
for prompt-only baselines, which are asked for that format) or ``stock`` (the stock model's own format)."""


@dataclass(frozen=True)
class Grade:
    """One output graded against its gold answer, strictly and by the lenient rule."""

    predicted: str | None
    """The final answer read by the strict rule, normalised; None when the output gives none."""
    extractor: str | None
    """The extractor that read it (``hash``, ``boxed``, ``answer_is`` or ``last_number``)."""
    correct: bool
    """Strict: ``predicted`` equals gold."""
    correct_lenient: bool
    """The lenient rule: ``extract_answer`` on the whole output, whose last number counts even in an
    unfinished one."""
    reason: str
    """``correct``, ``wrong``, ``no_answer`` (finished without a final answer the rule can read) or
    ``truncated`` (cut by the token limit before one)."""


def finished_text(completion: str, *, finish_reason: str) -> str:
    """The output a final answer may be read from: one cut by the token limit loses its unfinished last line."""
    return completion[: completion.rfind("\n") + 1] if finish_reason == "length" else completion


def final_answer_part(completion: str, *, finish_reason: str, kind: str) -> tuple[str, list]:
    """The text a final answer may be read from, and the extractors allowed to read it.

    - An output cut by the token limit (``finish_reason`` ``length``) loses its last, unfinished line (a cut
      ``#### 72`` may have been ``#### 720``), and only an answer it marked as final counts (``####``,
      ``\\boxed{}``, "the answer is").
    - ``adapter``: only what follows a closed think block; no ``</think>``, no part.
    - ``stock``: the last ``STOCK_ANSWER_LINES`` non-blank lines (after a think block, if there is one), read
      only for a marked answer (``#### 72``, ``\\boxed{72}``, "the answer is 72", "Final answer:" with the
      number on that line or the next). The stock model was not trained on the level format, so this is
      its own format's final-answer rule, no looser: never the last number of its reasoning.
    """
    part, extractors, _ = _answer_part(completion, finish_reason=finish_reason, kind=kind)
    return part, extractors


def _answer_part(completion: str, *, finish_reason: str, kind: str) -> tuple[str, list, list[int]]:
    """``final_answer_part``, with where each of the part's lines (split on ``\\n``) starts in ``completion``."""
    if kind not in GRADE_KINDS:
        raise ValueError(f"grade kind must be one of {GRADE_KINDS}, got {kind!r}")
    cut = finish_reason == "length"
    text = finished_text(completion, finish_reason=finish_reason)
    parsed = parse_response(text)
    start = len(text) - len(parsed.after_think)
    if kind == "adapter":
        part = parsed.after_think if parsed.reasoning is not None else ""
        offsets = [start] + [start + i + 1 for i, char in enumerate(part) if char == "\n"]
        return part, MARKED_EXTRACTORS if cut else EXTRACTORS, offsets
    lines, offset = [], start
    after = parsed.after_think
    for content, line in zip(after.splitlines(), after.splitlines(keepends=True), strict=True):
        if content.strip():
            lines.append((offset, content))
        offset += len(line)
    kept = lines[-STOCK_ANSWER_LINES:]
    return "\n".join(content for _, content in kept), MARKED_EXTRACTORS, [at for at, _ in kept]


def final_answer_start(completion: str, *, finish_reason: str, kind: str) -> int | None:
    """Where, in ``completion``, the line starts that holds the final answer ``grade`` reads (None: no answer).

    What comes before it is the output's reasoning: the think-token count of an output with no think block
    (the stock model's) stops there, so it ends exactly where the grading rule finds the answer.
    """
    part, extractors, offsets = _answer_part(completion, finish_reason=finish_reason, kind=kind)
    found = _first_found(part, extractors)
    return None if found is None else offsets[part.count("\n", 0, found[2])]


def grade(completion: str, gold: str, *, finish_reason: str, kind: str) -> Grade:
    """Grade one output: strictly by ``kind``'s final-answer rule (``final_answer_part``), and leniently.

    ``truncated`` is an output cut by the token limit with no final answer before the cut; ``no_answer``
    one that finished without a final answer the rule can read (an adapter's unclosed think block, a stock
    output with no marked answer in its last lines).
    """
    part, extractors = final_answer_part(completion, finish_reason=finish_reason, kind=kind)
    predicted, extractor = _first_answer(part, extractors)
    lenient, _ = extract_answer(completion)
    correct = numbers_equal(predicted, gold)
    reason = grade_reason(predicted=predicted, correct=correct, finish_reason=finish_reason)
    return Grade(predicted, extractor, correct, numbers_equal(lenient, gold), reason)


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    """The reference solution, with calculator annotations and the ``#### N`` line."""
    gold: str


def problems_from_rows(rows: list[dict], *, split: str, source: str) -> list[Problem]:
    problems = []
    for index, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise DataError(
                f"{source} row {index + 1}: a GSM8K row needs string fields 'question' and 'answer', "
                f"got keys {sorted(row) if isinstance(row, dict) else type(row).__name__}"
            )
        try:
            gold = parse_gold(row["answer"])
        except DataError as error:
            raise DataError(f"{source} row {index + 1}: {error}") from None
        problems.append(
            Problem(id=f"{split}-{index:05d}", question=row["question"], answer=row["answer"], gold=gold)
        )
    return problems


def load_local_split(directory: Path, split: str) -> list[Problem]:
    """Read ``{split}.jsonl`` or ``{split}*.parquet`` from a local folder."""
    directory = Path(directory)
    jsonl = directory / f"{split}.jsonl"
    if jsonl.is_file():
        rows = []
        with jsonl.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(
                        f"{jsonl} line {number} is not valid JSON: fix or remove the line"
                    ) from None
        return problems_from_rows(rows, split=split, source=str(jsonl))
    parquet = sorted(directory.glob(f"{split}*.parquet")) or sorted(directory.glob(f"**/{split}-*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        rows = [row for path in parquet for row in pq.read_table(path).to_pylist()]
        return problems_from_rows(rows, split=split, source=str(parquet[0]))
    raise DataError(
        f"no {split}.jsonl or {split}*.parquet in {directory}: point --data-dir at a GSM8K folder"
    )


def load_hub_split(dataset_id: str, config_name: str, revision: str, split: str) -> list[Problem]:
    """Load a split through ``datasets`` (needs network access to the Hub or a warm cache)."""
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, config_name, revision=revision, split=split).to_list()
    except Exception as error:  # datasets raises many types; the user needs one message
        raise DataError(
            f"could not load {dataset_id} ({config_name}, {split}) from the Hub: {type(error).__name__}. "
            "Offline? Use --data-dir with a local GSM8K folder"
        ) from None
    return problems_from_rows(rows, split=split, source=f"{dataset_id}:{split}")
