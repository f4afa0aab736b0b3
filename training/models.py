"""Where the base model comes from (a Hub id, a local folder, or the tiny study model built here), and which
commit of a Hub repo a study read."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal

from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import StudyConfig, is_hub_id

_SHA = re.compile(r"[0-9a-f]{40}")


def resolve_base_model(config: StudyConfig) -> str:
    """The path or Hub id to pass to ``from_pretrained`` for the study's base model."""
    if config.tiny_base:
        from training.tiny import ensure_tiny_base

        return str(ensure_tiny_base(config))
    return config.base_model.id


def recorded_base_id(config: StudyConfig) -> str:
    """What training.json names as the base: the Hub repo a local copy stands for (``base_model.hub_id``),
    else the configured id. training.json is pushed with every adapter, so a folder path of the machine that
    trained is never in it when the base names its Hub repo (publish refuses a local base that names none)."""
    return config.base_model.hub_id or config.base_model.id


def as_sha(revision: str) -> str | None:
    """``revision`` when it is a full commit sha, else None."""
    return revision if _SHA.fullmatch(revision) else None


def resolve_revision(
    repo_id: str, revision: str, *, repo_type: Literal["model", "dataset"] = "model"
) -> str | None:
    """The commit sha that ``repo_id@revision`` names now: the revision itself when it is a sha, else the Hub's
    answer, else the local cache's snapshot of it; None when neither knows (offline, never downloaded)."""
    if as_sha(revision):
        return revision
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    info = api.model_info if repo_type == "model" else api.dataset_info
    # Any failure to ask (offline mode, no network, a 404) means only "not resolved here"; the cache is next.
    try:
        return info(repo_id, revision=revision).sha
    except Exception:  # noqa: BLE001
        pass
    try:
        path = snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True)
    except Exception:  # noqa: BLE001
        return None
    name = Path(path).name
    return name if _SHA.fullmatch(name) else None


def local_snapshot_sha(path: Path | None) -> str | None:
    """The commit of a folder that is a Hub cache snapshot (``…/snapshots/<sha>``), else None."""
    if path is None:
        return None
    path = Path(path).resolve()
    return path.name if path.parent.name == "snapshots" and _SHA.fullmatch(path.name) else None


def base_model_hub(config: StudyConfig) -> dict[str, str | None]:
    """The Hub repo and commit the base model stands for, for training.json and study.lock.json.

    The tiny base gets its Hub id and commit when publishing pushes it (``{prefix}-base``), so both are null
    here; a local folder stands for ``base_model.hub_id`` (its sha when the folder is a cache snapshot).
    """
    base = config.base_model
    if config.tiny_base:
        return {"id": None, "sha": None}
    if is_hub_id(base.id):
        return {"id": base.id, "sha": resolve_revision(base.id, base.revision)}
    sha = local_snapshot_sha(Path(base.id)) or (
        resolve_revision(base.hub_id, base.revision) if base.hub_id else None
    )
    return {"id": base.hub_id, "sha": sha}


def export_tiny_base(config: StudyConfig, run_dir: RunDir) -> Path:
    """Copy the tiny base (weights, tokenizer, chat template, build.json) into ``run_dir.base_dir``: what
    publishing pushes as ``{prefix}-base``, so that the adapters' base travels with the run directory."""
    from training.tiny import is_build_of

    target = run_dir.base_dir
    if is_build_of(target, config):
        return target
    source = Path(resolve_base_model(config))
    staging = target.with_name(f".{target.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # whole or not at all: build.json marks a complete copy
    return target
