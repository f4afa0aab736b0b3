"""GSM8K: loading, gold answers, calculator annotations, reasoning steps, and answer extraction.

Answer extraction is an ordered list of named extractors, as in lm-evaluation-harness: the first one that
matches wins, its name is recorded with the sample, and no match gives ``None`` instead of an exception.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from eval_artifacts.study.errors import DataError

# ---------------------------------------------------------------- numbers

# A leading "-" or the Unicode minus sign (U+2212), which models and LaTeX renderers emit.
_NUMBER = r"[-−]?\$?\d[\d,]*(?:\.\d+)?|[-−]?\$?\.\d+"


def normalize_number(text: str | None) -> str | None:
    """Canonical text of a number: no '$', ',', '%', trailing zeros or trailing '.'; None if not a number.

    ``"$1,234.50"`` → ``"1234.5"``, ``"-3.0"`` → ``"-3"``, ``"7."`` → ``"7"``.
    """
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace("%", "").replace("−", "-").rstrip(".")
    cleaned = cleaned.replace(" ", "")
    if not cleaned:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def numbers_equal(a: str | None, b: str | None) -> bool:
    na, nb = normalize_number(a), normalize_number(b)
    return na is not None and na == nb


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


_OPS: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def safe_eval(expression: str) -> Decimal | None:
    """Evaluate plain arithmetic (numbers, + - * / // % **, parentheses); None for anything else."""
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace(",", "").replace("$", "")
    text = re.sub(r"(?<=\d)\s*x\s*(?=[\d(])", "*", text)
    text = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", text)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None

    def walk(node: ast.AST) -> Decimal:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            return Decimal(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 12:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"unsupported {type(node).__name__}")

    try:
        return walk(tree)
    except (ValueError, ArithmeticError, TypeError):
        return None


def values_match(computed: Decimal | None, stated: str) -> bool:
    """Does arithmetic agree with the value the text states (to the precision the text states)?"""
    stated_norm = normalize_number(stated)
    if computed is None or stated_norm is None:
        return False
    stated_value = Decimal(stated_norm)
    decimals = max(0, -stated_value.as_tuple().exponent) if "." in stated_norm else 0
    tolerance = Decimal(1).scaleb(-decimals) / 2 if decimals else Decimal("0.005")
    return abs(computed - stated_value) <= max(tolerance, Decimal("1e-9"))


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


_PLAIN_EQUATION_RE = re.compile(
    r"((?:\(?\s*\$?\d[\d,]*(?:\.\d+)?\s*\)?\s*(?:[-+*/×x÷−])\s*)+\(?\s*\$?\d[\d,]*(?:\.\d+)?%?\s*\)?)"
    r"\s*=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)"
)


def _clean_expression(text: str) -> str:
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("$", "").replace(",", "")
    text = re.sub(r"(?<=\d)\s*x\s*(?=[\d(])", "*", text)
    return re.sub(r"\s+", "", text)


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
        if annotations:
            pairs = annotations
        else:
            pairs = [(m.group(1), m.group(2)) for m in _PLAIN_EQUATION_RE.finditer(line)]
        for expression, stated in pairs:
            expression = _clean_expression(expression)
            value = normalize_number(stated)
            if not expression or value is None:
                continue
            arithmetic_ok = values_match(safe_eval(expression), stated)
            # A plain-text match that does not check out is a misread (``1/2 = 1/4`` read as ``= 1``), not a
            # wrong step: annotations are the solution's own claims, free text is only our parse of it.
            if not annotations and not arithmetic_ok:
                continue
            steps.append(Step(sentence, expression, value, arithmetic_ok))
    return steps


# ---------------------------------------------------------------- answer extraction from model output

# "#### 18", also with markdown emphasis or a currency sign before the number ("#### **18** per day").
_HASH_RE = re.compile(r"####\s*[*_]*\s*(" + _NUMBER + r")")
# "the answer is" / "Answer:" / "final answer =" and the rest of that line. The connector is required, so
# the verb ("needs to answer 34-16 = 18 questions") is not taken for an announcement of the answer.
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer|answer)\s*(?:is\b|:|=)\s*[:=]?([^\n]*)", re.IGNORECASE)
# An arithmetic chain at the start of the announced answer: "12 + 6 = 18" means 18, "5 apples" means 5.
_CHAIN_RE = re.compile(
    r"^[\s*_]*((?:" + _NUMBER + r")(?:\s*(?:[-+*/×÷x=]|−)\s*\$?(?:" + _NUMBER + r"))*)"
)
_ANY_NUMBER_RE = re.compile(_NUMBER)
# LaTeX inside \boxed{}: thousands separators ("1{,}234", "1\,234"), escaped signs, \text{} units.
_LATEX_NOISE_RE = re.compile(r"\{,\}|\\[,!;: ]|\\\$|\\%|%|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _last(pattern: re.Pattern) -> Callable[[str], str | None]:
    def extract(text: str) -> str | None:
        matches = pattern.findall(text)
        return matches[-1] if matches else None

    return extract


def _announced_answer(text: str) -> str | None:
    """The number of the last "the answer is …": the result of a chain like ``12 + 6 = 18``."""
    for clause in reversed(_ANSWER_IS_RE.findall(text)):
        chain = _CHAIN_RE.match(clause)
        if chain:
            return _ANY_NUMBER_RE.findall(chain.group(1))[-1]
    return None


def _boxed_contents(text: str) -> list[str]:
    """What each ``\\boxed{…}`` holds, nested braces included (``\\boxed{\\dfrac{36}{2}}``)."""
    contents = []
    for start in (m.end() for m in re.finditer(r"\\boxed\{", text)):
        depth, end = 1, start
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth == 0:
            contents.append(text[start : end - 1])
    return contents


def _boxed_answer(text: str) -> str | None:
    """The last boxed value: a number, or a fraction or plain arithmetic that evaluates to one."""
    for content in reversed(_boxed_contents(text)):
        cleaned = _LATEX_NOISE_RE.sub("", content).replace("$", "").strip()
        cleaned = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", cleaned).replace("\\cdot", "*").replace("\\times", "*")
        if re.fullmatch(_NUMBER, cleaned):
            return cleaned
        value = safe_eval(cleaned)
        if value is not None:
            return str(value)
    return None


EXTRACTORS: list[tuple[str, Callable[[str], str | None]]] = [
    ("hash", _last(_HASH_RE)),
    ("boxed", _boxed_answer),
    ("answer_is", _announced_answer),
    ("last_number", _last(_ANY_NUMBER_RE)),
]


def extract_answer(text: str) -> tuple[str | None, str | None]:
    """The normalised answer in a model output and the name of the extractor that found it.

    Reasoning inside ``<think>…</think>`` is ignored when the output has a think block and something after it,
    so an intermediate number in the reasoning is never taken for the answer.
    """
    from eval_artifacts.study.levels import parse_response

    parsed = parse_response(text)
    search_in = parsed.after_think if parsed.reasoning is not None and parsed.after_think.strip() else text
    for name, extractor in EXTRACTORS:
        found = normalize_number(extractor(search_in))
        if found is not None:
            return found, name
    return None, None


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
