"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def local_hub(tmp_path):
    """A local Hub on a free port with this process's huggingface_hub/datasets pointed at it."""
    from hubtools import clients_for, isolated_hf_caches

    from hub_tools.local_hub import running_hub

    with (
        running_hub(tmp_path / "hub-data") as hub,
        clients_for(hub),
        isolated_hf_caches(tmp_path / "hf-cache"),
    ):
        yield hub
