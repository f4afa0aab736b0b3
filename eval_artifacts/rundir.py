"""The run directory: the contract between stages. Every path of DESIGN.md's layout is named here once.

Writes are atomic (temp file + ``os.replace``) so a killed process never leaves half a JSON file, and
JSONL files are appended one complete line at a time, so a kill loses at most the line in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.study.errors import ArtifactError

SCHEMA_VERSION = 2


class RunDir:
    """Named paths of one study's run directory (``runs/<study>/``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- layout ----
    @property
    def lock(self) -> Path:
        return self.root / "study.lock.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def train_file(self, level: int) -> Path:
        return self.data_dir / f"level_{level}" / "train.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.data_dir / "stats.json"

    @property
    def base_dir(self) -> Path:
        """The tiny study's base model, as published to ``{prefix}-base``."""
        return self.root / "base"

    def adapter_dir(self, adapter: int | str) -> Path:
        """``adapters/<model>/`` of an adapter model (``level_4``, ``level_4_seed43``); a level number names
        the level's published adapter, ``adapters/level_<n>/``."""
        return self.root / "adapters" / (f"level_{adapter}" if isinstance(adapter, int) else adapter)

    def training_json(self, adapter: int | str) -> Path:
        return self.adapter_dir(adapter) / "training.json"

    def rl_adapter_dir(self, level: int) -> Path:
        """The level's SFT adapter continued with GRPO (model ``rl_l<n>``)."""
        return self.adapter_dir(f"rl_l{level}")

    def rl_training_json(self, level: int) -> Path:
        return self.rl_adapter_dir(level) / "training.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def samples(self, model: str) -> Path:
        return self.eval_dir / model / "samples.jsonl"

    def metrics(self, model: str) -> Path:
        return self.eval_dir / model / "metrics.json"

    @property
    def summary(self) -> Path:
        return self.eval_dir / "summary.json"

    @property
    def generation_log(self) -> Path:
        """One row per (model, seed) generation session: engine, device, tokens/s, peak memory."""
        return self.eval_dir / "generation_log.jsonl"

    @property
    def pareto_png(self) -> Path:
        return self.eval_dir / "pareto.png"

    @property
    def cards_dir(self) -> Path:
        return self.root / "cards"

    def card(self, repo_name: str) -> Path:
        return self.cards_dir / repo_name / "README.md"

    @property
    def publish_state(self) -> Path:
        return self.root / "publish" / "state.json"

    @property
    def hub_data_dir(self) -> Path:
        """Storage of the embedded local Hub when ``hub.endpoint`` is ``local``."""
        return self.root / "hub"

    @property
    def local_hub_endpoint(self) -> Path:
        """The embedded local Hub's last address, reused so that the cards' links stay the same across runs."""
        return self.root / "publish" / "local_hub.json"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The PEFT adapter in ``adapters/level_<n>/``: what ``save_pretrained`` writes and ``from_pretrained`` reads."""


def epochs_trained(steps: int, effective_batch_size: int, train_rows: int) -> float:
    """Passes over the training data that ``steps`` optimizer steps made (``max_steps`` overrides ``epochs``);
    training.json's ``epochs_trained``."""
    return round(steps * effective_batch_size / train_rows, 2)


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for one that is not installed), recorded beside artifacts."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (adapters and data files can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(
    path: Path, chunks: Iterable[str], *, crash_point: str | None = None, crash_detail: str | None = None
) -> None:
    """Write ``chunks`` to ``path`` so that readers see the old file or the new one, never a torn one.

    ``crash_point`` is a fault point hit with the temporary file complete but not yet in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fixed temporary name: a killed writer's leftover is overwritten and moved by the rerun, never piled up.
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    if crash_point:
        maybe_crash(crash_point, crash_detail)
    os.replace(temporary, path)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (``write_atomically``)."""
    text = json.dumps(payload, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    write_atomically(path, [text], crash_point="write_json", crash_detail=path.name)
    maybe_crash("wrote_json", path.name)


def write_jsonl(
    path: Path, rows: Iterable[dict], *, crash_point: str | None = None, crash_detail: str | None = None
) -> None:
    """Write JSON lines atomically (``write_atomically``), one row a line."""
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomically(path, lines, crash_point=crash_point, crash_detail=crash_detail)


def read_json(path: Path, *, what: str, hint: str) -> Any:
    """Read a JSON artifact; a missing or broken file is an ``ArtifactError`` that says how to make it."""
    if not path.is_file():
        raise ArtifactError(f"{what} not found at {path}: {hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{what} at {path} is not valid JSON (line {error.lineno}): {hint}") from None


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append complete lines and flush them to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False) + "\n"

            def torn(line: str = line) -> None:  # what a kill halfway through a line leaves on disk
                handle.write(line[: len(line) // 2])
                handle.flush()

            maybe_crash("append_jsonl_torn", path.parent.name, before=torn)
            handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def iter_jsonl(path: Path, *, what: str) -> Iterator[dict]:
    """Yield the rows of a JSONL artifact; any malformed line is an ``ArtifactError`` naming it."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ArtifactError(
                    f"{what} {path} line {number} is not valid JSON (truncated?): delete the file and rerun the stage"
                ) from None
            if not isinstance(row, dict):
                raise ArtifactError(f"{what} {path} line {number} is not a JSON object")
            yield row


def repair_jsonl_tail(path: Path) -> int:
    """Drop a partial last line left by a killed writer, so that an appending rerun can resume.

    Returns the number of bytes removed (0 when the file ends with a newline or does not exist).
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as handle:
        handle.truncate(keep)
    return len(data) - keep
