"""Point the real ``huggingface_hub`` and ``datasets`` clients of this process at a Hub endpoint.

Both libraries read the endpoint once, at import (hub_protocol.md §1.1): the environment is set for libraries
not imported yet, and every module-level copy is patched in those already imported.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

# Xet uploads need a CAS server the local hub does not have; telemetry and update checks would leave loopback.
ENVIRONMENT = {
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "0",  # offline mode refuses loopback requests too
    "HF_DATASETS_OFFLINE": "0",
}


def configure_clients(endpoint: str) -> None:
    """Make huggingface_hub and datasets in this process talk to ``endpoint`` (e.g. ``http://127.0.0.1:PORT``).

    The environment is set first, so modules imported afterwards read the new values; then both libraries are
    imported (if not already) and their module-level copies patched, which covers modules imported earlier and
    the switches that have no environment variable (``datasets.config.USE_PARQUET_EXPORT``). Also disables Xet
    and telemetry, turns offline mode off and keeps loopback off any proxy.
    """
    endpoint = endpoint.rstrip("/")
    os.environ.update(ENVIRONMENT, HF_ENDPOINT=endpoint)
    host = urlsplit(endpoint).hostname or ""
    no_proxy = [h for h in os.environ.get("NO_PROXY", "").split(",") if h]
    os.environ["NO_PROXY"] = ",".join(dict.fromkeys([*no_proxy, host, "127.0.0.1", "localhost"]))

    from datasets import config
    from huggingface_hub import constants, hf_api

    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_URL_HOSTS = constants.HF_URL_HOSTS | {host}
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
    constants.HF_HUB_OFFLINE = False
    hf_api.api.endpoint = endpoint  # module-level helpers (upload_file, RepoCard.push_to_hub) use this one

    config.HF_ENDPOINT = endpoint
    config.HUB_DATASETS_URL = endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
    config.HF_HUB_OFFLINE = False
    config.HF_DATASETS_OFFLINE = False
    # The parquet-export lookup goes to http://datasets-server.<host>, which does not exist here.
    config.USE_PARQUET_EXPORT = False
