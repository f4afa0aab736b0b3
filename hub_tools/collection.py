"""The study's collection: wanted state (title, items: the tiny base, L1…L5, the eval dataset; notes), diff, apply.

Only items that belong to the study (its adapter repos and eval dataset) are added, moved, re-noted or
removed; anything a user added by hand stays, after the study's items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx2
from huggingface_hub import Collection
from huggingface_hub.errors import HfHubHTTPError

from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import CardValidationError, HubError
from eval_artifacts.study.levels import LEVELS
from hub_tools import cards
from hub_tools.hub_client import HubTarget, describe, reading, status_of, writing


@dataclass(frozen=True)
class WantedItem:
    item_id: str
    item_type: str  # "model" | "dataset"
    note: str


@dataclass
class CollectionPlan:
    """What must change for the collection to reach the wanted state."""

    title: str
    namespace: str
    private: bool
    wanted: list[WantedItem]
    current: Collection | None  # None: the collection does not exist yet
    owned_ids: set[str]  # every repo id the study may own (any level), for removals
    notes_only: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str | None:
        return self.current.slug if self.current else None

    def _current_items(self) -> list:
        return list(self.current.items) if self.current else []

    def additions(self) -> list[WantedItem]:
        present = {(i.item_type, i.item_id) for i in self._current_items()}
        return [] if self.notes_only else [w for w in self.wanted if (w.item_type, w.item_id) not in present]

    def removals(self) -> list:
        wanted = {(w.item_type, w.item_id) for w in self.wanted}
        if self.notes_only:
            return []
        return [
            i
            for i in self._current_items()
            if i.item_id in self.owned_ids and (i.item_type, i.item_id) not in wanted
        ]

    def note_changes(self) -> list[tuple[str, WantedItem, str | None]]:
        """(item object id, wanted item, note on the Hub) for items whose note differs."""
        by_key = {(i.item_type, i.item_id): i for i in self._current_items()}
        out = []
        for w in self.wanted:
            item = by_key.get((w.item_type, w.item_id))
            if item is not None and (item.note or "") != w.note:
                out.append((item.item_object_id, w, item.note))
        return out

    def final_order(self) -> list[tuple[str, str]]:
        """The order the Hub will show after adds and removals, before any move (adds go to the end)."""
        gone = {(i.item_type, i.item_id) for i in self.removals()}
        order = [
            (i.item_type, i.item_id) for i in self._current_items() if (i.item_type, i.item_id) not in gone
        ]
        return order + [(w.item_type, w.item_id) for w in self.additions()]

    def moves(self) -> list[tuple[tuple[str, str], int]]:
        """(item, new position) moves, in order, that put the wanted items first in their wanted order."""
        if self.notes_only:
            return []
        order, out = self.final_order(), []
        for position, w in enumerate(self.wanted):
            key = (w.item_type, w.item_id)
            if key in order and order.index(key) != position:
                order.remove(key)
                order.insert(position, key)
                out.append((key, position))
        return out

    @property
    def title_change(self) -> bool:
        return self.current is not None and self.current.title != self.title and not self.notes_only

    @property
    def changed(self) -> bool:
        if self.current is None:
            return not self.notes_only  # regenerate-cards never creates a collection
        return bool(
            self.title_change or self.additions() or self.removals() or self.note_changes() or self.moves()
        )

    def describe(self) -> list[str]:
        """Human-readable lines for --dry-run and the report."""
        head = f'collection "{self.title}"'
        if self.current is None and self.notes_only:
            return [f"{head}: not on the Hub; `cot-compress publish` creates it"]
        if self.current is None:
            lines = [f"{head}: create ({'private' if self.private else 'public'}) in {self.namespace}"]
        else:
            lines = [f"{head} ({self.current.slug}): " + ("update" if self.changed else "unchanged")]
        if self.title_change:
            lines.append(f"  title: {self.current.title!r} -> {self.title!r}")
        for w in self.additions():
            lines.append(f"  + {w.item_type} {w.item_id} (note: {w.note!r})")
        for item in self.removals():
            lines.append(f"  - {item.item_type} {item.item_id}")
        for _, w, old in self.note_changes():
            lines.append(f"  ~ note of {w.item_id}: {old!r} -> {w.note!r}")
        for (item_type, item_id), position in self.moves():
            lines.append(f"  > move {item_type} {item_id} to position {position}")
        return lines + self.warnings


def wanted_items(config: StudyConfig, notes: dict[str, str]) -> list[WantedItem]:
    """The tiny base (the tiny study), adapters L1…Ln in level order (each RL adapter right after its SFT
    sibling), then the eval dataset, each with its note.

    Raises:
        CardValidationError: a note is missing, empty or longer than the Hub's 500 characters.
    """
    ids = [(config.base_repo_id, "model")] if config.tiny_base else []
    ids += [(cards.card_repo_id(config, level, rl), "model") for level, rl in cards.adapter_cards(config)]
    ids.append((config.eval_repo_id, "dataset"))
    items = []
    for repo_id, repo_type in ids:
        note = (notes.get(repo_id) or "").strip()
        if not note:
            raise CardValidationError(
                f"no collection note was rendered for {repo_id}: check the note template"
            )
        if len(note) > cards.NOTE_MAX_CHARS:
            raise CardValidationError(
                f"the collection note of {repo_id} has {len(note)} characters, over the Hub's "
                f"{cards.NOTE_MAX_CHARS}: shorten the note template"
            )
        items.append(WantedItem(repo_id, repo_type, note))
    return items


def owned_repo_ids(config: StudyConfig) -> set[str]:
    adapters = {repo for level in LEVELS for repo in (config.adapter_repo_id(level), config.rl_repo_id(level))}
    return adapters | {config.eval_repo_id, config.base_repo_id}


def find_collection(target: HubTarget, *, namespace: str, title: str, slug: str | None) -> Collection | None:
    """The study's collection: by the slug recorded in publish/state.json, else by title in the namespace."""
    api, token = target.api, target.token
    try:
        if slug:
            try:
                return reading(lambda: api.get_collection(slug, token=token))
            except HfHubHTTPError as error:
                if status_of(error) != 404:
                    raise
        for found in reading(lambda: list(api.list_collections(owner=namespace, token=token))):
            if found.title == title:  # a list holds at most 4 items of each collection: get the whole one
                return reading(lambda slug=found.slug: api.get_collection(slug, token=token))
    except (HfHubHTTPError, httpx2.TransportError) as error:
        raise HubError(f"cannot read the collections of {namespace!r}: {describe(error, token)}") from None
    return None


def plan_collection(
    config: StudyConfig, notes: dict[str, str], *, current: Collection | None, notes_only: bool = False
) -> CollectionPlan:
    """Compare the wanted collection with ``current``, the Hub's (``find_collection``)."""
    plan = CollectionPlan(
        title=config.hub.collection_title,
        namespace=config.hub.namespace,
        private=config.hub.private,
        wanted=wanted_items(config, notes),
        current=current,
        owned_ids=owned_repo_ids(config),
        notes_only=notes_only,
    )
    if current is not None and current.private != config.hub.private:
        wanted = "private" if config.hub.private else "public"
        plan.warnings.append(
            f"warning: collection {current.slug} is {'private' if current.private else 'public'} but the config "
            f"says {wanted}: left as it is; change it on the Hub if you mean it"
        )
    return plan


def create_collection(target: HubTarget, plan: CollectionPlan) -> Collection:
    """Create the (empty) collection; its items are added by ``apply_collection``.

    ``exists_ok`` makes a repeated create return the collection of that title, so after a lost answer the
    create is simply sent again (``writing``), unless a read finds the collection already there.
    """
    api, token = target.api, target.token

    def create() -> Collection:
        return api.create_collection(
            plan.title, namespace=plan.namespace, private=plan.private, exists_ok=True, token=token
        )

    try:
        return writing(
            create,
            landed=lambda: find_collection(target, namespace=plan.namespace, title=plan.title, slug=None),
        )
    except (HfHubHTTPError, httpx2.TransportError) as error:
        raise HubError(
            f"creating collection {plan.title!r} failed: {describe(error, token)}; rerun publish"
        ) from None


def retitle_collection(target: HubTarget, plan: CollectionPlan) -> Collection:
    """Give the existing collection the study's title (which changes its slug); the rest is ``apply_collection``'s."""
    api, token = target.api, target.token

    def landed() -> Collection | None:
        current = reading(lambda: api.get_collection(plan.slug, token=token))
        return current if current.title == plan.title else None

    try:
        return writing(
            lambda: api.update_collection_metadata(plan.slug, title=plan.title, token=token), landed=landed
        )
    except (HfHubHTTPError, httpx2.TransportError) as error:
        raise HubError(
            f"retitling collection {plan.slug} failed: {describe(error, token)}; rerun publish to finish it"
        ) from None


def apply_collection(target: HubTarget, plan: CollectionPlan) -> Collection:
    """Bring the collection to the wanted state: create, retitle, add, remove, re-note, reorder.

    Every step is idempotent once re-planned, so after a lost answer the collection is read again, re-planned,
    and what is still missing is sent again (``writing``).
    """
    if plan.current is None:
        plan.current = create_collection(target, plan)
    api, token = target.api, target.token

    def landed() -> Collection | None:
        plan.current = reading(lambda: api.get_collection(plan.slug, token=token))
        return None if plan.changed else plan.current

    try:
        return writing(lambda: _apply_changes(target, plan), landed=landed)
    except (HfHubHTTPError, httpx2.TransportError) as error:
        raise HubError(
            f"updating collection {plan.title!r} failed: {describe(error, token)}; rerun publish to finish it"
        ) from None


def _apply_changes(target: HubTarget, plan: CollectionPlan) -> Collection:
    api, token = target.api, target.token
    slug = plan.slug
    if plan.title_change:
        slug = api.update_collection_metadata(slug, title=plan.title, token=token).slug
    for item in plan.removals():
        api.delete_collection_item(slug, item.item_object_id, missing_ok=True, token=token)
    for w in plan.additions():
        api.add_collection_item(slug, w.item_id, w.item_type, note=w.note, exists_ok=True, token=token)
        maybe_crash("collection.item_added")
    for object_id, w, _ in plan.note_changes():
        api.update_collection_item(slug, object_id, note=w.note, token=token)
        maybe_crash("collection.note_updated")
    if plan.moves():
        ids = {
            (i.item_type, i.item_id): i.item_object_id
            for i in reading(lambda: api.get_collection(slug, token=token)).items
        }
        for key, position in plan.moves():
            api.update_collection_item(slug, ids[key], position=position, token=token)
            maybe_crash("collection.item_moved")
    return reading(lambda: api.get_collection(slug, token=token))
