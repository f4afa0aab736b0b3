"""Point the real ``huggingface_hub`` and ``datasets`` clients of this process at a Hub endpoint.

Both libraries read the endpoint once, at import (hub_protocol.md §1.1): the environment is set for libraries
not imported yet, and every module-level copy is patched in those already imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlsplit

# Xet uploads need a CAS server the local hub does not have; telemetry and update checks would leave loopback.
ENVIRONMENT = {
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "0",  # offline mode refuses loopback requests too
    "HF_DATASETS_OFFLINE": "0",
}


def configure_clients(endpoint: str) -> Callable[[], None]:
    """Make huggingface_hub and datasets in this process talk to ``endpoint`` (e.g. ``http://127.0.0.1:PORT``).

    The environment is set first, so modules imported afterwards read the new values; then both libraries are
    imported (if not already) and their module-level copies patched, which covers modules imported earlier and
    the switches that have no environment variable (``datasets.config.USE_PARQUET_EXPORT``). Also disables Xet
    and telemetry, turns offline mode off and keeps loopback off any proxy.

    Returns a function that puts every changed variable and attribute back (call it when the hub stops).
    """
    endpoint = endpoint.rstrip("/")
    host = urlsplit(endpoint).hostname or ""
    no_proxy = [h for h in os.environ.get("NO_PROXY", "").split(",") if h]
    environment = {
        **ENVIRONMENT,
        "HF_ENDPOINT": endpoint,
        "NO_PROXY": ",".join(dict.fromkeys([*no_proxy, host, "127.0.0.1", "localhost"])),
    }
    saved_environment = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)

    from datasets import config
    from huggingface_hub import constants, hf_api

    patches = [
        (constants, "ENDPOINT", endpoint),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host}),
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (constants, "HF_HUB_OFFLINE", False),
        (hf_api.api, "endpoint", endpoint),  # module-level helpers (upload_file, RepoCard.push_to_hub) use it
        (config, "HF_ENDPOINT", endpoint),
        (config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
        (config, "HF_HUB_OFFLINE", False),
        (config, "HF_DATASETS_OFFLINE", False),
        # The parquet-export lookup goes to http://datasets-server.<host>, which does not exist here.
        (config, "USE_PARQUET_EXPORT", False),
    ]
    saved_attributes = [(target, name, getattr(target, name)) for target, name, _ in patches]
    for target, name, value in patches:
        setattr(target, name, value)

    def restore() -> None:
        for key, value in saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for target, name, value in saved_attributes:
            setattr(target, name, value)

    return restore
