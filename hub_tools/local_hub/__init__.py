"""A local Hugging Face Hub-compatible server: the embedded publishing target and the ground of every test.

    from hub_tools.local_hub import configure_clients, running_hub

    with running_hub(tmp_path / "hub") as hub:
        configure_clients(hub.endpoint)
        HfApi(endpoint=hub.endpoint, token=hub.default_token).create_repo("cot-compress/demo")

See docs/local_hub.md for what it supports and ../shared/reference/hub_protocol.md for the protocol.
"""

from hub_tools.local_hub.clients import configure_clients
from hub_tools.local_hub.faults import Fault, FaultPlan
from hub_tools.local_hub.server import DEFAULT_USERS, LocalHub, create_app, running_hub, serve_forever

__all__ = [
    "DEFAULT_USERS",
    "Fault",
    "FaultPlan",
    "LocalHub",
    "configure_clients",
    "create_app",
    "running_hub",
    "serve_forever",
]
