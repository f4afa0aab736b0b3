"""The per-sample record: one line of ``eval/<model>/samples.jsonl`` per (problem, seed, sample).

Every downstream number is computed from these rows, so reading them is strict: a missing or mistyped
field, an unknown field, or a second row for the same (id, seed, sample) is an ``ArtifactError`` that names
the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_artifacts.rundir import SCHEMA_VERSION, iter_jsonl
from eval_artifacts.study.errors import ArtifactError

FINISH_REASONS = ("stop", "length")
GRADE_REASONS = ("correct", "wrong", "no_answer", "truncated")
MODEL_RE = re.compile(
    r"^(?:base|level_(?P<level>[1-9][0-9]*)(?:_seed(?P<seed>[0-9]+))?|prompt_l(?P<prompt>[1-9][0-9]*)"
    r"|rl_l(?P<rl>[1-9][0-9]*))$"
)
"""Model names: ``base``; ``level_<n>`` (the published adapter, first training seed); ``level_<n>_seed<s>``
(the adapter of another training seed); ``prompt_l<n>`` (base given level n's prompt, no adapter);
``rl_l<n>`` (``level_<n>`` continued with GRPO). An ``rl_l<n>`` row's ``training_seed`` is the first
training seed, the seed of the SFT adapter it continues: the field names the adapter's lineage, the same
for SFT and SFT+RL, and the RL stage's own seed is in ``adapters/rl_l<n>/training.json``."""
MODEL_NAMES = "'base', 'level_<n>', 'level_<n>_seed<s>', 'prompt_l<n>' or 'rl_l<n>'"


def _parse_model(model: str) -> re.Match:
    match = MODEL_RE.match(model)
    if match is None:
        raise ArtifactError(f"{model!r} is not a model name: model names are {MODEL_NAMES}")
    return match


def model_kind(model: str) -> str:
    """``base``, ``adapter`` (``level_<n>``, ``level_<n>_seed<s>``, ``rl_l<n>``) or ``prompt``
    (``prompt_l<n>``)."""
    match = _parse_model(model)
    return "adapter" if match["level"] or match["rl"] else ("prompt" if match["prompt"] else "base")


def model_level(model: str) -> int | None:
    """``base`` -> None, ``level_3`` -> 3, ``level_3_seed43`` -> 3, ``prompt_l3`` -> 3, ``rl_l3`` -> 3."""
    match = _parse_model(model)
    number = match["level"] or match["prompt"] or match["rl"]
    return None if number is None else int(number)


def is_rl(model: str) -> bool:
    """``rl_l<n>``: an SFT adapter continued with GRPO."""
    return _parse_model(model)["rl"] is not None


def other_seed_of(model: str) -> int | None:
    """The training seed a name carries: ``level_3_seed43`` -> 43; None for every other name (the
    published ``level_<n>`` is the first training seed's, which only the config knows)."""
    seed = _parse_model(model)["seed"]
    return None if seed is None else int(seed)


def model_sort_key(model: str) -> tuple:
    """Study order: base, published adapters, prompt-only baselines, other training seeds' adapters, then
    the RL adapters (``StudyConfig.model_keys``'s order)."""
    kind, level, seed = model_kind(model), model_level(model) or 0, other_seed_of(model)
    group = 4 if is_rl(model) else {"base": 0, "adapter": 1 if seed is None else 3, "prompt": 2}[kind]
    return (group, level, seed or 0)


def described(doc: str, **kwargs: Any) -> Any:
    """A dataclass field that carries its column's documentation (shown in the eval dataset's card)."""
    return dataclasses.field(metadata={"doc": doc}, **kwargs)


@dataclass(frozen=True)
class Column:
    """One field of a record as every consumer sees it: validators, Hub features and column docs."""

    name: str
    kind: type
    nullable: bool
    doc: str


def columns_of(record: type) -> tuple[Column, ...]:
    """The columns a record dataclass declares, in order: ``T | None`` fields are the nullable ones."""
    hints = typing.get_type_hints(record)
    columns = []
    for spec in dataclasses.fields(record):
        parts = [part for part in typing.get_args(hints[spec.name]) if part is not type(None)]
        kind = parts[0] if parts else hints[spec.name]
        nullable = bool(parts)
        columns.append(Column(spec.name, kind, nullable, spec.metadata["doc"]))
    return tuple(columns)


@dataclass(frozen=True)
class SampleRecord:
    """One generated answer to one problem, with its grading and its token counts: the schema of a
    samples.jsonl row and of the eval dataset's model configs, declared once."""

    id: str = described("problem id (GSM8K test row, or the synthetic problem's id)")
    question: str = described("the problem text")
    gold: str = described("the reference answer, normalised")
    prompt: str = described(
        "the user message sent to the model (the bare question for base, the level prompt for adapters)"
    )
    completion: str = described("everything the model generated")
    reasoning: str | None = described("text strictly inside the think block (empty for base, which has none)")
    predicted: str | None = described(
        "the final answer read by the strict rule (empty when the output gives none), normalised"
    )
    extractor: str | None = described(
        "what read it: hash (#### N), boxed (\\boxed{N}), answer_is (the answer is N), last_number"
    )
    correct: bool = described(
        "strict grading: predicted equals gold; the answer is read only where a finished answer stands (after "
        "a closed think block for adapters; for base, a marked answer in its last 5 lines), so an unfinished "
        "output is never correct"
    )
    correct_lenient: bool = described(
        "lenient grading: the last marked answer or, failing one, the last number anywhere in the output "
        "(the reasoning of an unfinished output included) equals gold"
    )
    grade_reason: str = described(
        "correct, wrong, no_answer (finished without a final answer the strict rule can read) or truncated "
        "(cut by the token limit before a final answer)"
    )
    think_tokens: int = described(
        "tokens inside the think block (base: completion tokens before the final-answer line)"
    )
    completion_tokens: int = described("generated tokens up to and including end of sequence")
    finish_reason: str = described("stop (end of sequence) or length (hit the token limit)")
    model: str = described(
        "base, level_<n> (published adapter), level_<n>_seed<s> (adapter of training seed s) or prompt_l<n> "
        "(base model with level n's prompt, no adapter)"
    )
    level: int | None = described("compression level (empty for base)")
    training_seed: int | None = described("the adapter's training seed (empty for base and prompt_l<n>)")
    seed: int = described("evaluation seed")
    sample: int = described("index of the draw for this problem and evaluation seed (0 when greedy)")
    schema_version: int = described("record schema version", default=SCHEMA_VERSION)

    def to_row(self) -> dict[str, Any]:
        """The JSONL row, validated, fields in ``SAMPLE_FIELDS`` order."""
        return validate_record(dataclasses.asdict(self), path="SampleRecord", line=0)


SAMPLE_COLUMNS = columns_of(SampleRecord)
SAMPLE_FIELDS: tuple[str, ...] = tuple(column.name for column in SAMPLE_COLUMNS)


def validate_record(row: dict, *, path: Path | str, line: int) -> dict[str, Any]:
    """Check one sample row against the schema and return it with fields in ``SAMPLE_FIELDS`` order.

    Raises:
        ArtifactError: naming ``path``, ``line`` and the first offending field.
    """
    where = f"sample record {path} line {line}"
    missing = [name for name in SAMPLE_FIELDS if name not in row]
    if missing:
        raise ArtifactError(
            f"{where} is missing field '{missing[0]}': regenerate it with `cot-compress evaluate`"
        )
    unknown = sorted(set(row) - set(SAMPLE_FIELDS))
    if unknown:
        raise ArtifactError(
            f"{where} has unknown field '{unknown[0]}'; the fields are {', '.join(SAMPLE_FIELDS)}"
        )
    for column in SAMPLE_COLUMNS:
        value = row[column.name]
        if value is None and column.nullable:
            continue
        # bool is excluded from int explicitly: True is an int in Python.
        if not isinstance(value, column.kind) or (column.kind is int and isinstance(value, bool)):
            expected = column.kind.__name__ + (" or null" if column.nullable else "")
            raise ArtifactError(f"{where} field '{column.name}' must be {expected}, got {value!r}")
    _check_values(row, where)
    return {name: row[name] for name in SAMPLE_FIELDS}


def _check_values(row: dict, where: str) -> None:
    if row["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"{where} field 'schema_version' is {row['schema_version']}, this code reads {SCHEMA_VERSION}: "
            "re-run `cot-compress evaluate` with this version"
        )
    for name in ("think_tokens", "completion_tokens"):
        if row[name] < 0:
            raise ArtifactError(f"{where} field '{name}' is negative ({row[name]})")
    if row["finish_reason"] not in FINISH_REASONS:
        raise ArtifactError(
            f"{where} field 'finish_reason' must be one of {FINISH_REASONS}, got {row['finish_reason']!r}"
        )
    if MODEL_RE.match(row["model"]) is None:
        raise ArtifactError(f"{where} field 'model' must be {MODEL_NAMES}, got {row['model']!r}")
    expected_level = model_level(row["model"])
    if row["level"] != expected_level:
        raise ArtifactError(
            f"{where} field 'level' is {row['level']!r} but model {row['model']!r} means {expected_level!r}"
        )
    is_adapter = model_kind(row["model"]) == "adapter"
    named_seed = other_seed_of(row["model"])
    if (row["training_seed"] is not None) != is_adapter or (
        named_seed is not None and row["training_seed"] != named_seed
    ):
        expected = "null" if not is_adapter else (named_seed if named_seed is not None else "an int")
        raise ArtifactError(
            f"{where} field 'training_seed' is {row['training_seed']!r} but model {row['model']!r} means {expected}"
        )
    if row["sample"] < 0:
        raise ArtifactError(f"{where} field 'sample' is negative ({row['sample']})")
    if row["correct"] and row["predicted"] is None:
        raise ArtifactError(f"{where} field 'correct' is true but 'predicted' is null")
    reason = grade_reason(predicted=row["predicted"], correct=row["correct"], finish_reason=row["finish_reason"])
    if row["grade_reason"] != reason:
        raise ArtifactError(
            f"{where} field 'grade_reason' is {row['grade_reason']!r} but its predicted, correct and "
            f"finish_reason mean {reason!r}: regenerate it with `cot-compress evaluate`"
        )


def grade_reason(*, predicted: str | None, correct: bool, finish_reason: str) -> str:
    """Why a sample is graded as it is (one of ``GRADE_REASONS``): a final answer was read and is right or
    wrong, or none was, and the output either finished (``no_answer``) or hit the token limit (``truncated``)."""
    if predicted is not None:
        return "correct" if correct else "wrong"
    return "truncated" if finish_reason == "length" else "no_answer"


def row_key(row: dict) -> tuple[str, int, int]:
    """What identifies a sample row within its model: (problem id, evaluation seed, draw)."""
    return (row["id"], row["seed"], row["sample"])


def read_samples(path: Path, *, model: str | None = None) -> list[dict[str, Any]]:
    """Read and validate every row of a samples.jsonl file.

    Args:
        path: the samples file (``RunDir.samples(model)``).
        model: when given, every row must belong to this model.

    Raises:
        ArtifactError: the file is missing, a line is not JSON (a truncated tail), a row breaks the
            schema, rows of several models are mixed, or an (id, seed, sample) key appears twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"samples not found at {path}: run `cot-compress evaluate` for this model first")
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, int, int], int] = {}
    for number, raw in enumerate(iter_jsonl(path, what="samples"), start=1):
        row = validate_record(raw, path=path, line=number)
        expected = model if model is not None else (rows[0]["model"] if rows else row["model"])
        if row["model"] != expected:
            raise ArtifactError(
                f"sample record {path} line {number} is for model {row['model']!r}, the file holds {expected!r}"
            )
        key = row_key(row)
        if key in seen:
            raise ArtifactError(
                f"sample record {path} line {number} duplicates id {row['id']!r} seed {row['seed']} "
                f"sample {row['sample']} "
                f"(first at line {seen[key]}): delete the file and rerun `cot-compress evaluate`"
            )
        seen[key] = number
        rows.append(row)
    return rows
