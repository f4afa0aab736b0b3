"""Card text from values: the one place that formats artifact numbers, model labels and inert free text."""

from __future__ import annotations

import html
import re
from typing import Any

from eval_artifacts.records import is_rl, model_kind, model_level, other_seed_of
from eval_artifacts.study.levels import LEVELS


def fmt_accuracy(value: float) -> str:
    """Accuracy, deltas' magnitudes and CI ends: 3 decimals."""
    return f"{value:.3f}"


def fmt_ci(ci: list[float] | tuple[float, float]) -> str:
    return f"[{fmt_accuracy(ci[0])}, {fmt_accuracy(ci[1])}]"


def fmt_tokens(value: float) -> str:
    """Token means (and other means): 2 decimals."""
    return f"{value:.2f}"


def fmt_median(value: float) -> str:
    """Medians of integer counts are integral (odd n) or halves: ``35``, not ``35.00``."""
    return str(int(value)) if float(value).is_integer() else fmt_tokens(value)


def fmt_count(value: int) -> str:
    return str(int(value))


def fmt_fraction(correct: int, total: int) -> str:
    return f"{int(correct)} / {int(total)}"


def fmt_delta(value: float) -> str:
    return f"{value:+.3f}"


def fmt_p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def fmt_change(new: float, old: float) -> str:
    """A relative change, ``+4.2%``; ``n/a`` from zero; ``0.0%`` for one that rounds to nothing (never ``-0.0%``)."""
    if old == 0:
        return "n/a"
    change = (new - old) / old
    return "0.0%" if round(change, 3) == 0 else f"{change:+.1%}"


def fmt_mean_sd(spread: dict, fmt: Any) -> str:
    """``0.512 ± 0.014``: a mean and its sample sd across training seeds, each through ``fmt``."""
    return f"{fmt(spread['mean'])} ± {'n/a' if spread['sd'] is None else fmt(spread['sd'])}"


TEST_NAMES = {"mcnemar_exact": "exact McNemar", "paired_t": "paired t on per-problem means"}
CI_METHODS = {
    "wilson": "Wilson",
    "wilson_clustered": "Wilson at the problem-clustered effective sample size",
}


def branch_of(model: str) -> str:
    """The Hub branch an adapter is published on: ``main`` (first training seed) or ``seed-<s>``."""
    seed = other_seed_of(model)
    return "main" if seed is None else f"seed-{seed}"


def _compared(key: str, field: str, fmt: Any) -> Any:
    """A comparison cell: ``m[key][field]`` through ``fmt``, ``n/a`` when there is no such comparison."""
    return lambda m: "n/a" if m[key] is None else fmt(m[key][field])


def fmt_plain(value: float) -> str:
    """Hyperparameters as the config wrote them: ``0.0002``, ``0.05``, ``2``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# One definition per results column: header -> metrics.json value as card text. The renderer fills the
# table from these and the validator parses the table back and compares through the same functions.
RESULT_COLUMNS: dict[str, Any] = {
    "Accuracy": lambda m: fmt_accuracy(m["accuracy"]),
    "95% CI": lambda m: fmt_ci(m["ci95"]),
    "Correct / total": lambda m: fmt_fraction(m["n_correct"], m["n_total"]),
    "Lenient accuracy": lambda m: fmt_accuracy(m["accuracy_lenient"]),
    "No answer": lambda m: fmt_count(m["n_no_answer"]),
    "Truncated": lambda m: fmt_count(m["n_truncated"]),
    "Think tokens (mean)": lambda m: fmt_tokens(m["think_tokens"]["mean"]),
    "Think tokens (median)": lambda m: fmt_median(m["think_tokens"]["median"]),
    "Completion tokens (mean)": lambda m: fmt_tokens(m["completion_tokens"]["mean"]),
}
VS_BASE_COLUMNS: dict[str, Any] = {
    "Δ accuracy vs base": lambda m: fmt_delta(m["vs_base"]["delta"]),
    "95% CI of Δ": lambda m: fmt_ci(m["vs_base"]["ci95"]),
    "p": lambda m: fmt_p(m["vs_base"]["p_value"]),
    "Test": lambda m: TEST_NAMES[m["vs_base"]["test"]],
    "Problems base does better": lambda m: fmt_count(m["vs_base"]["b"]),
    "Problems it does better": lambda m: fmt_count(m["vs_base"]["c"]),
}
# One row per adapter of a level (one per training seed), in the adapter card's training-seeds table.
TRAINING_SEED_COLUMNS: dict[str, Any] = {
    "Training seed": lambda m: fmt_count(m["training_seed"]),
    "Branch": lambda m: branch_of(m["model"]),
    "Accuracy": lambda m: fmt_accuracy(m["accuracy"]),
    "95% CI": lambda m: fmt_ci(m["ci95"]),
    "Think tokens (mean)": lambda m: fmt_tokens(m["think_tokens"]["mean"]),
    "Δ vs base": lambda m: fmt_delta(m["vs_base"]["delta"]),
    "p vs base": lambda m: fmt_p(m["vs_base"]["p_value"]),
    "Δ vs prompt only": _compared("vs_prompt", "delta", fmt_delta),
    "p vs prompt only": _compared("vs_prompt", "p_value", fmt_p),
}
# One row per method of a level with an RL adapter (SFT, then SFT+RL), on both adapters' cards.
SFT_VS_RL_COLUMNS: dict[str, Any] = {
    "Accuracy": lambda m: fmt_accuracy(m["accuracy"]),
    "95% CI": lambda m: fmt_ci(m["ci95"]),
    "Correct / total": lambda m: fmt_fraction(m["n_correct"], m["n_total"]),
    "Think tokens (mean)": lambda m: fmt_tokens(m["think_tokens"]["mean"]),
    "Think tokens (median)": lambda m: fmt_median(m["think_tokens"]["median"]),
    "Δ vs base": lambda m: fmt_delta(m["vs_base"]["delta"]),
    "p vs base": lambda m: fmt_p(m["vs_base"]["p_value"]),
}
MODEL_COLUMN = "Model"


def model_label(model: str) -> str:
    """``Base (stock model)``, ``L4 Ultra-compact``, ``L4 Ultra-compact, seed 43`` (another training seed's
    adapter), ``L4 Ultra-compact + RL`` (continued with GRPO) or ``P4 Ultra-compact, prompt only``; the validator maps labels back with ``label_model``."""
    number = model_level(model)
    if number is None:
        return "Base (stock model)"
    level = LEVELS[number]
    if model_kind(model) == "prompt":
        return f"P{level.number} {level.name}, prompt only"
    if is_rl(model):
        return f"L{level.number} {level.name} + RL"
    seed = other_seed_of(model)
    return f"L{level.number} {level.name}" + ("" if seed is None else f", seed {seed}")


def label_model(label: str) -> str | None:
    # From the label's digits, not LEVELS: ``L9`` or ``L04`` must map to no model of the study.
    match = re.match(r"^([LP])(\d+)\b.*?(?:, seed (\d+)|( \+ RL))?(?: \(this adapter\))?$", label)
    if match:
        letter, number, seed, rl = match.groups()
        if letter == "P":
            return f"prompt_l{number}"
        if rl:
            return f"rl_l{number}"
        return f"level_{number}" + ("" if seed is None else f"_seed{seed}")
    return "base" if label.startswith("Base") else None


_MD_ESCAPE = re.compile(r"([\\`*_{}\[\]|~%#])")
_LINE_START = re.compile(r"^([-+=#>])")
_LIST_NUMBER = re.compile(r"^(\d{1,9})([.)])(?=\s|$)")


def md_inline(value: Any) -> str:
    """Free text as inert inline markdown: one line, HTML escaped, markup characters backslash-escaped.

    ``<script>`` becomes ``&lt;script&gt;``, ``{{`` becomes ``\\{\\{``, ``---`` cannot start a line
    (thematic break / front matter), and ``*``, ``_``, ``[``, ``|`` and backticks lose their meaning.
    """
    text = html.escape(" ".join(str(value).split()), quote=False)
    text = _MD_ESCAPE.sub(r"\\\1", text)
    text = re.sub(r"-{2,}", lambda m: "\\-" * len(m.group()), text)
    return _LIST_NUMBER.sub(r"\1\\\2", _LINE_START.sub(r"\\\1", text))


def code_span(value: Any) -> str:
    """Text as one inline code span (no escapes apply inside, so none are added)."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def code_block(value: Any, language: str = "") -> str:
    """Text in a fenced code block whose fence is longer than any backtick run inside it."""
    text = str(value).rstrip("\n")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def plain_text(value: Any) -> str:
    """One line of plain text (collection notes): whitespace collapsed, control characters dropped."""
    return " ".join("".join(ch for ch in str(value) if ch.isprintable() or ch.isspace()).split())
