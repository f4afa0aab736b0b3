"""``publish/state.json``: per Hub, what each repo last received from us; per (Hub, namespace), the study's collection.

Repos are keyed by their full id, so one run dir published to two namespaces of one Hub keeps two sets of
repos apart; the collection is the one thing a namespace does not name, so it is kept per namespace::

    {"hubs": {"<label>": {"repos": {"<ns>/<name>": {...}}, "collections": {"<ns>": {"slug", "title"}}}},
     "collection_slug": "<the last published one>"}
"""

from __future__ import annotations

from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, read_json, write_json


class PublishState:
    """
    ``publish/state.json`` of one run directory, seen from one namespace of one Hub.

    A rerun reads it to converge: the files we pushed are the only ones a publish may delete, a PR we opened is
    updated rather than duplicated, and the collection is found by its slug even after a rename.

    Args:
        run_dir (`RunDir`):
            The run directory holding ``publish/state.json`` (created on the first ``save``).
        label (`str`):
            The Hub's key in the file: ``local`` or the endpoint URL (``HubTarget.label``).
        namespace (`str`):
            The namespace published to (``hub.namespace``): the key of its collection.

    Raises:
        [`ArtifactError`]:
            The file exists but is not valid JSON.
    """

    def __init__(self, run_dir: RunDir, *, label: str, namespace: str):
        self.path = run_dir.publish_state
        self.data = (
            read_json(self.path, what="publish state", hint="delete it; the next publish rebuilds it")
            if self.path.is_file()
            else {"schema_version": SCHEMA_VERSION, "hubs": {}}
        )
        self.hub = self.data.setdefault("hubs", {}).setdefault(label, {})
        self.repos: dict[str, dict] = self.hub.setdefault("repos", {})
        self.collections: dict[str, dict] = self.hub.setdefault("collections", {})
        old = self.hub.pop("collection", None)  # state.json before namespaces: one collection per Hub
        if old and old.get("slug"):
            self.collections.setdefault(old["slug"].split("/")[0], old)
        self.namespace = namespace

    def repo(self, repo_id: str) -> dict:
        """The entry of ``repo_id``, created empty if the study never pushed to it."""
        return self.repos.setdefault(repo_id, {"files": {}})

    def owned(self, repo_id: str) -> set[str]:
        """Files we pushed to this repo before: the only files a publish may delete."""
        return set(self.repos.get(repo_id, {}).get("files", {}))

    def pr(self, repo_id: str) -> dict | None:
        """The PR we opened on this repo with ``--create-pr`` (number, ref, head), if any."""
        return self.repos.get(repo_id, {}).get("pr")

    @property
    def collection_slug(self) -> str | None:
        return (self.collections.get(self.namespace) or {}).get("slug")

    def set_collection(self, slug: str, title: str) -> None:
        """Record the study's collection in this namespace of this Hub and save."""
        self.collections[self.namespace] = {"slug": slug, "title": title}
        # Top level: the last published collection, which `render-cards` links (cards.collection_url_from_state).
        self.data["collection_slug"] = slug
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
