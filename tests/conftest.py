"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def local_hub(tmp_path):
    """A local Hub on a free port with this process's huggingface_hub/datasets pointed at it."""
    from hubtools import isolated_hf_caches

    from hub_tools.local_hub import configure_clients, running_hub

    with running_hub(tmp_path / "hub-data") as hub:
        configure_clients(hub.endpoint)
        with isolated_hf_caches(tmp_path / "hf-cache"):
            yield hub
