"""What publishing recorded in ``publish/state.json`` that the cards state: the Hub, the collection, the commits."""

from __future__ import annotations

from dataclasses import dataclass, field

from eval_artifacts.rundir import RunDir, read_json
from eval_artifacts.study.config import StudyConfig

STATE_KEY = "cards"
"""The key, per Hub in ``publish/state.json``, of the ``Published`` facts each namespace's cards were rendered with."""


@dataclass(frozen=True)
class Published:
    """What only a publish knows and the cards state.

    Args:
        hub_url: the Hub the study was published to (``None``: not yet; the cards link the config's Hub).
        collection_slug: the collection's slug as the Hub returned it.
        base_commit: the commit of the published tiny base (``{prefix}-base``), which the adapters pin.
        adapter_commits: model (``level_<n>``) -> the adapter repo's commit holding the evaluated weights.
    """

    hub_url: str | None = None
    collection_slug: str | None = None
    base_commit: str | None = None
    adapter_commits: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "hub_url": self.hub_url,
            "collection_slug": self.collection_slug,
            "base_commit": self.base_commit,
            "adapter_commits": dict(sorted(self.adapter_commits.items())),
        }


def published_from_state(config: StudyConfig, run_dir: RunDir) -> Published:
    """The facts the last publish to the config's Hub and namespace rendered its cards with, so that a later
    ``render-cards`` writes the same cards; empty before the first publish there."""
    if not run_dir.publish_state.is_file():
        return Published()
    state = read_json(run_dir.publish_state, what="publish state", hint="delete it and publish again")
    hub = (state.get("hubs") or {}).get(config.hub.endpoint) if isinstance(state, dict) else None
    recorded = ((hub or {}).get(STATE_KEY) or {}).get(config.hub.namespace)
    if not isinstance(recorded, dict):
        return Published()
    return Published(
        hub_url=recorded.get("hub_url"),
        collection_slug=recorded.get("collection_slug"),
        base_commit=recorded.get("base_commit"),
        adapter_commits=dict(recorded.get("adapter_commits") or {}),
    )
