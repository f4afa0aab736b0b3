"""Reading each repo on the Hub and diffing it with its spec into a plan of files to add, change and delete."""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile

from eval_artifacts.study.errors import HubError
from hub_tools.hub_client import HubTarget, describe, reading
from hub_tools.publishing.spec import MAIN, README, RepoSpec


@dataclass
class RepoPlan:
    """What one branch of one repo needs to reach its spec, and the head the diff was computed against."""

    spec: RepoSpec
    private: bool  # visibility for a repo we create
    exists: bool
    head: str | None  # the commit the diff was computed against (None: repo or branch not created yet)
    revision: str = MAIN  # the spec's branch, or "refs/pr/N" when committing onto a PR we opened earlier
    branch_exists: bool = True  # False: the spec's branch is created (from main) before its commit
    pr_num: int | None = None
    add: list[str] = field(default_factory=list)
    change: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    remote: dict[str, RepoFile] = field(default_factory=dict)
    remote_readme: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.add or self.change or self.delete)

    @property
    def touched(self) -> list[str]:
        """Every path the commit writes or deletes."""
        return self.add + self.change + self.delete

    def diff(self, owned: set[str]) -> None:
        """Sort every wanted file into add / change (by hash) / unchanged; owned files no longer wanted: delete."""
        self.add, self.change = [], []
        for path, local in sorted(self.spec.files.items()):
            remote = self.remote.get(path)
            if remote is None:
                self.add.append(path)
            elif not local.matches(remote):
                self.change.append(path)
        self.delete = sorted(p for p in owned - set(self.spec.files) if p in self.remote)

    def describe(self, url: str) -> list[str]:
        """Files to add / change / delete with sizes, and a unified diff of the README."""
        where = f" on PR #{self.pr_num}" if self.pr_num else ""
        if not self.exists:
            state = f"new, {'private' if self.private else 'public'}"
        elif not self.branch_exists:
            state = f"new branch from {MAIN}"
        else:
            state = "changed" if self.changed else "unchanged"
        branch = "" if self.spec.branch == MAIN else f" branch {self.spec.branch}"
        lines = [f"{self.spec.repo_type} {self.spec.repo_id}{branch} ({state}{where}) {url}"]
        for path in self.add:
            lines.append(f"  + {path} ({_size(self.spec.files[path].size)})")
        for path in self.change:
            old, new = self.remote[path].size, self.spec.files[path].size
            lines.append(f"  ~ {path} ({_size(old)} -> {_size(new)})")
        for path in self.delete:
            lines.append(f"  - {path} ({_size(self.remote[path].size)})")
        if README in self.add or README in self.change:
            new = self.spec.files[README].text().splitlines(keepends=True)
            old = (self.remote_readme or "").splitlines(keepends=True)
            diff = difflib.unified_diff(old, new, f"hub/{self.spec.repo_id}/README.md", "local/README.md")
            lines += ["    " + line.rstrip("\n") for line in diff]
        return lines + self.warnings


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _open_pr(target: HubTarget, spec: RepoSpec, recorded: dict | None) -> tuple[int, str] | None:
    """A PR we opened before that is still open: (number, head commit); None when there is none."""
    if not recorded:
        return None
    api, token = target.api, target.token
    refs = reading(
        lambda: api.list_repo_refs(
            spec.repo_id, repo_type=spec.repo_type, include_pull_requests=True, token=token
        )
    )
    head = next((ref.target_commit for ref in refs.pull_requests or [] if ref.ref == recorded["ref"]), None)
    if head is None:
        return None
    try:
        details = api.get_discussion_details(
            spec.repo_id, recorded["num"], repo_type=spec.repo_type, token=token
        )
        if details.status != "open":
            return None  # merged or closed: open a new one
    except HfHubHTTPError:
        pass  # a Hub without the discussions API (the local hub): the ref alone says it is there
    return recorded["num"], head


def _download_text(target: HubTarget, spec: RepoSpec, revision: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = target.api.hf_hub_download(
            spec.repo_id,
            README,
            repo_type=spec.repo_type,
            revision=revision,
            cache_dir=tmp,
            token=target.token,
        )
        return Path(path).read_text(encoding="utf-8", errors="replace")


def plan_repo(
    target: HubTarget,
    spec: RepoSpec,
    *,
    private: bool,
    owned: set[str],
    pr: dict | None,
    create_pr: bool,
    may_create: bool,
    fetch_readme: bool,
) -> RepoPlan:
    """
    Compare ``spec`` with its branch of the repo on the Hub; reads only (repo info, refs, paths-info, README).

    A branch other than ``main`` that does not exist yet is planned with every file added: it is created from
    ``main`` when applied (after ``main``'s own commit), then gets one commit.

    Args:
        target (`HubTarget`):
            The opened Hub.
        spec (`RepoSpec`):
            The wanted state of the repo.
        private (`bool`):
            The visibility of the repo if it has to be created; an existing repo keeps its own (with a warning).
        owned (`set[str]`):
            Files the study pushed before (``PublishState.owned``): the only ones the plan may delete.
        pr (`dict`, *optional*):
            The PR recorded in ``publish/state.json``, onto which ``create_pr`` commits while it is open.
        create_pr (`bool`):
            Whether the changes go to a PR rather than to ``main``.
        may_create (`bool`):
            Whether a missing repo (or seed branch) is planned for creation rather than an error.
        fetch_readme (`bool`):
            Download the Hub's README when it differs, for the dry run's diff.

    Returns:
        [`RepoPlan`]: the files to add, change and delete, against the head read here.

    Raises:
        [`HubError`]:
            The repo cannot be read, or is missing while ``may_create`` is False.
    """
    api, token = target.api, target.token
    try:
        try:
            info = reading(lambda: api.repo_info(spec.repo_id, repo_type=spec.repo_type, token=token))
        except RepositoryNotFoundError:
            if not may_create:
                raise HubError(
                    f"{spec.repo_type} repo {spec.repo_id} does not exist on {target.endpoint}: "
                    "run `cot-compress publish` first"
                ) from None
            return RepoPlan(
                spec,
                private,
                exists=False,
                head=None,
                revision=spec.branch,
                branch_exists=spec.branch == MAIN,
                add=sorted(spec.files),
            )
        plan = RepoPlan(spec, private, exists=True, head=info.sha, revision=spec.branch)
        if bool(info.private) != private and spec.branch == MAIN:
            plan.warnings.append(
                f"  warning: {spec.repo_id} is {'private' if info.private else 'public'} but the config says "
                f"{'private' if private else 'public'}: visibility left as it is; change it on the Hub if you mean it"
            )
        if spec.branch != MAIN:
            try:
                plan.head = reading(
                    lambda: api.repo_info(
                        spec.repo_id, repo_type=spec.repo_type, revision=spec.branch, token=token
                    )
                ).sha
            except RevisionNotFoundError:
                if not may_create:
                    raise HubError(
                        f"{spec.repo_id} has no branch {spec.branch} on {target.endpoint}: "
                        "run `cot-compress publish` first"
                    ) from None
                plan.branch_exists, plan.head, plan.add = False, None, sorted(spec.files)
                return plan
        found = _open_pr(target, spec, pr) if create_pr else None
        if found is not None:
            plan.pr_num, plan.head = found
            plan.revision = f"refs/pr/{plan.pr_num}"
        paths = sorted(set(spec.files) | owned)
        entries = reading(
            lambda: api.get_paths_info(
                spec.repo_id, paths, revision=plan.head, repo_type=spec.repo_type, token=token
            )
        )
        plan.remote = {e.path: e for e in entries if isinstance(e, RepoFile)}
        plan.diff(owned)
        if README in plan.change and fetch_readme:
            plan.remote_readme = _download_text(target, spec, plan.head)
        return plan
    except (HfHubHTTPError, httpx2.TransportError) as error:  # a dropped connection too: one line
        raise HubError(f"cannot read {spec.repo_id} on {target.endpoint}: {describe(error, token)}") from None
