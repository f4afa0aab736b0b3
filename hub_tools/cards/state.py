"""The collection's URL that publishing recorded in ``publish/state.json``, for the cards to link."""

from __future__ import annotations

from eval_artifacts.rundir import RunDir, read_json
from eval_artifacts.study.config import StudyConfig
from hub_tools.cards.context import collections_url


def collection_url_from_state(config: StudyConfig, run_dir: RunDir) -> str | None:
    """The collection's URL from ``publish/state.json`` once publishing created it, else None.

    The collection recorded for the config's Hub and namespace; else the top-level ``collection_slug`` (the
    last published collection, whichever Hub it went to) if it is in the config's namespace.
    """
    if not run_dir.publish_state.is_file():
        return None
    state = read_json(run_dir.publish_state, what="publish state", hint="delete it and publish again")
    if not isinstance(state, dict):
        return None
    hub = (state.get("hubs") or {}).get(config.hub.endpoint) or {}
    recorded = ((hub.get("collections") or {}).get(config.hub.namespace) or {}).get("slug")
    last = state.get("collection_slug")
    slug = recorded or (last if last and last.split("/")[0] == config.hub.namespace else None)
    return collections_url(config, slug) if slug else None
