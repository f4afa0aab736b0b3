"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def local_hub(tmp_path):
    """A local Hub on a free port with this process's huggingface_hub/datasets pointed at it."""
    from hub_tools.local_hub import configure_clients, running_hub

    with running_hub(tmp_path / "hub-data") as hub:
        configure_clients(hub.endpoint)
        yield hub
