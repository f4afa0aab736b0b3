"""Numbers and arithmetic in GSM8K-format text: normalisation, safe evaluation, and equation checks.

One checker for everyone who asks "does this arithmetic hold?": the rule teacher keeps a reference solution
only when its steps do (``training.teachers``), and an adapter card showcases an output only when its
chain does (``hub_tools.cards.context``). It lives here, below both, because the card layer may not import
``training``.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation


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


# ---------------------------------------------------------------- equations written in text

# "20/4 = $5", "(3+4)*2=14", "18-8=11" inside "s=14+5=18→a=18-8=11": numbers and operators, "=", a number.
_PLAIN_EQUATION_RE = re.compile(
    r"((?:\(?\s*\$?\d[\d,]*(?:\.\d+)?\s*\)?\s*(?:[-+*/×x÷−])\s*)+\(?\s*\$?\d[\d,]*(?:\.\d+)?%?\s*\)?)"
    r"\s*=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)"
)


def clean_expression(text: str) -> str:
    """Arithmetic as ``safe_eval`` and the teachers write it: ``48 × 2`` → ``48*2``, no '$', ',' or spaces."""
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("$", "").replace(",", "")
    text = re.sub(r"(?<=\d)\s*x\s*(?=[\d(])", "*", text)
    return re.sub(r"\s+", "", text)


def plain_equations(line: str) -> list[tuple[str, str]]:
    """The ``(expression, stated result)`` of each equation written in one line of text, in order."""
    return [(m.group(1), m.group(2)) for m in _PLAIN_EQUATION_RE.finditer(line)]


def equation_holds(expression: str, stated: str) -> bool:
    return values_match(safe_eval(clean_expression(expression)), stated)


def chain_checks_out(reasoning: str | None, answer: str | None) -> bool:
    """Does a chain of reasoning's arithmetic hold and lead to ``answer``?

    Every equation in it must hold and the last one must end at the answer (``m=48/2=24→t=48+24=72`` for
    72); a chain with no equation must be plain arithmetic that evaluates to the answer (Level 5's
    ``48+48/2``, or ``72`` alone). Two errors that cancel (``s=14+5=18→a=18-8=11``) do not check out, and
    neither does prose with no arithmetic to check.
    """
    if reasoning is None or answer is None:
        return False
    equations = [equation for line in reasoning.splitlines() for equation in plain_equations(line)]
    if not equations:
        return values_match(safe_eval(clean_expression(reasoning)), answer)
    holds = all(equation_holds(expression, stated) for expression, stated in equations)
    return holds and numbers_equal(equations[-1][1], answer)
