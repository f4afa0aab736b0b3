"""The collection's URL that publishing recorded in ``publish/state.json``, for the cards to link."""

from __future__ import annotations

from eval_artifacts.rundir import RunDir, read_json
from eval_artifacts.study.config import StudyConfig
from hub_tools.cards.context import collections_url


def collection_url_from_state(config: StudyConfig, run_dir: RunDir) -> str | None:
    """The collection's URL from ``publish/state.json`` once publishing created it, else None.

    Reads the top-level ``collection_slug``: the last published collection, whichever Hub it went to.
    """
    if not run_dir.publish_state.is_file():
        return None
    state = read_json(run_dir.publish_state, what="publish state", hint="delete it and publish again")
    slug = state.get("collection_slug") if isinstance(state, dict) else None
    return collections_url(config, slug) if slug else None
