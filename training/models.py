"""Where the base model comes from: a Hub id, a local folder, or the tiny study model built here."""

from __future__ import annotations

from eval_artifacts.study.config import StudyConfig


def resolve_base_model(config: StudyConfig) -> str:
    """The path or Hub id to pass to ``from_pretrained`` for the study's base model."""
    if config.base_model.id == "tiny":
        from training.tiny import ensure_tiny_base

        return str(ensure_tiny_base(config))
    return config.base_model.id
