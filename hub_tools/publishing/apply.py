"""Applying plans: one atomic ``create_commit`` (or PR) per changed repo, then the collection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile

from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.study.errors import HubError
from hub_tools import collection as collections
from hub_tools.hub_client import HubTarget, describe, reading, status_of, unwrapped, writing
from hub_tools.publishing.plan import RepoPlan
from hub_tools.publishing.spec import MAIN, RepoSpec
from hub_tools.publishing.state import PublishState


@dataclass
class RepoResult:
    """What happened to one repo (or, in a dry run, would happen)."""

    repo_id: str
    repo_type: str
    url: str
    status: str  # created | committed | pull request | unchanged | would create | would change
    files: list[str] = field(default_factory=list)
    commit: str | None = None
    pr_url: str | None = None
    branch: str = MAIN

    def line(self) -> str:
        """The report line: repo (and branch off main), status, files touched, the PR, then the URL."""
        files = f" ({', '.join(self.files)})" if self.files else ""
        extra = f" -> {self.pr_url}" if self.pr_url else ""
        branch = "" if self.branch == MAIN else f"@{self.branch}"
        return f"{self.repo_id}{branch}: {self.status}{files}{extra}\n  {self.url}"


def branch_url(target: HubTarget, spec: RepoSpec) -> str:
    """The repo's page, or its branch's (``…/tree/seed-43``) off main."""
    url = target.repo_url(spec.repo_type, spec.repo_id)
    return url if spec.branch == MAIN else f"{url}/tree/{spec.branch}"


def apply_repo(target: HubTarget, plan: RepoPlan, *, create_pr: bool) -> RepoResult:
    """
    Create the repo (or the branch, from ``main``) if needed, then one commit (or one PR) holding every change
    of the plan.

    The commit names ``parent_commit`` = the head read when planning, so a concurrent change fails cleanly
    instead of being overwritten; an unchanged repo gets no request at all. When a write's answer is lost (a
    dropped connection, a 5xx or 429, a 412), the Hub is read to see whether it landed (``hub_client.writing``):
    a bare repo is the one we created, and a head whose parent is the planned head and whose files are the
    plan's is our commit; otherwise, with the branch still at the planned head, the write is sent again.

    Args:
        target (`HubTarget`):
            The opened Hub.
        plan (`RepoPlan`):
            The plan of the repo (``plan_repo``).
        create_pr (`bool`):
            Open a PR (or add a commit to the one the plan found) instead of committing to ``main``.

    Returns:
        [`RepoResult`]: the status, the files touched, the new commit and the PR's URL.

    Raises:
        [`HubError`]:
            The repo or the commit could not be created, or the repo changed since planning; the message says
            which repo, and rerunning converges.
    """
    spec, api, token = plan.spec, target.api, target.token
    url = branch_url(target, spec)
    if not plan.changed:
        return RepoResult(spec.repo_id, spec.repo_type, url, "unchanged", commit=plan.head, branch=spec.branch)
    new_pr = create_pr and not plan.pr_num
    try:
        if not plan.branch_exists:  # the repo exists by now: its main was applied first
            api.create_branch(spec.repo_id, branch=spec.branch, repo_type=spec.repo_type, token=token, exist_ok=True)
            maybe_crash("publish.branch_created", spec.repo_id.split("/")[1])
            plan.head = reading(
                lambda: api.repo_info(spec.repo_id, repo_type=spec.repo_type, revision=spec.branch, token=token)
            ).sha
        elif not plan.exists:
            _create_repo(target, plan)
            maybe_crash("publish.repo_created", spec.repo_id.split("/")[1])
            plan.head = reading(
                lambda: api.repo_info(spec.repo_id, repo_type=spec.repo_type, token=token)
            ).sha
        operations = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=spec.files[p].content())
            for p in plan.add + plan.change
        ] + [CommitOperationDelete(path_in_repo=p) for p in plan.delete]
        maybe_crash("publish.before_commit", spec.repo_id.split("/")[1])

        def commit() -> tuple[str, str | None]:
            info = api.create_commit(
                spec.repo_id,
                operations,
                commit_message=spec.message,
                repo_type=spec.repo_type,
                revision=None if plan.revision == MAIN else plan.revision,
                create_pr=new_pr,
                parent_commit=plan.head,
                token=token,
            )
            return info.oid, info.pr_url

        if new_pr:  # a lost answer may have opened the PR, and a new PR has no parent to check: no retry
            oid, pr_url = commit()
        else:
            oid, pr_url = writing(commit, landed=lambda: _own_commit(target, plan))
    except HubError:
        raise
    except (HfHubHTTPError, httpx2.TransportError, RuntimeError) as raised:
        error = unwrapped(raised)
        if not isinstance(error, HfHubHTTPError | httpx2.TransportError):
            raise
        if status_of(error) == 409 and not plan.exists:
            raise HubError(f"{spec.repo_id} was created on the Hub since planning: rerun publish") from None
        if _commit_conflict(error):
            raise _changed_since_planning(plan) from None
        raise HubError(f"pushing {spec.repo_id} failed: {describe(error, token)}; rerun publish") from None
    if create_pr:
        pr_url = pr_url or f"{url}/discussions/{plan.pr_num}"
        return RepoResult(
            spec.repo_id, spec.repo_type, url, "pull request", plan.touched, oid, pr_url, spec.branch
        )
    status = "committed" if plan.exists and plan.branch_exists else "created"
    return RepoResult(spec.repo_id, spec.repo_type, url, status, plan.touched, oid, branch=spec.branch)


def _create_repo(target: HubTarget, plan: RepoPlan) -> None:
    """Create the planned repo; after a lost answer, a bare repo (only ``.gitattributes``) is the one we made."""
    spec, api, token = plan.spec, target.api, target.token

    def create() -> bool:
        api.create_repo(spec.repo_id, repo_type=spec.repo_type, private=plan.private, token=token)
        return True

    def landed() -> bool | None:
        try:
            info = reading(lambda: api.repo_info(spec.repo_id, repo_type=spec.repo_type, token=token))
        except RepositoryNotFoundError:
            return None
        if {s.rfilename for s in info.siblings or []} - {".gitattributes"}:
            raise HubError(f"{spec.repo_id} was created on the Hub since planning: rerun publish")
        return True

    writing(create, landed=landed)


def _own_commit(target: HubTarget, plan: RepoPlan) -> tuple[str, None] | None:
    """
    After a commit whose answer was lost: whether it landed, read from the branch head.

    Returns:
        `tuple[str, None] | None`: (the commit's id, no PR URL) when the head is our commit: its parent is the
        planned head, its title our message, and it holds every file of the plan with the planned content and
        none of the deleted ones; None when the branch is still at the planned head (nothing landed).

    Raises:
        [`HubError`]:
            The branch moved to a commit that is not ours: someone else changed the repo.
    """
    spec, api, token = plan.spec, target.api, target.token
    repo = {"repo_type": spec.repo_type, "token": token}
    head = reading(lambda: api.repo_info(spec.repo_id, revision=plan.revision, **repo)).sha
    if head == plan.head:
        return None
    history = reading(lambda: api.list_repo_commits(spec.repo_id, revision=head, **repo))
    entries = reading(lambda: api.get_paths_info(spec.repo_id, plan.touched, revision=head, **repo))
    found = {e.path: e for e in entries if isinstance(e, RepoFile)}
    ours = (
        len(history) >= 2
        and history[1].commit_id == plan.head
        and history[0].title == spec.message
        and all(p in found and spec.files[p].matches(found[p]) for p in plan.add + plan.change)
        and not any(p in found for p in plan.delete)
    )
    if not ours:
        raise _changed_since_planning(plan)
    return head, None


def _changed_since_planning(plan: RepoPlan) -> HubError:
    return HubError(
        f"{plan.spec.repo_id} changed on the Hub since planning (its head is no longer {plan.head[:10]}): "
        "nothing was committed to it; rerun publish"
    )


def _commit_conflict(error: BaseException) -> bool:
    """A 412 on the commit itself: the branch moved since planning (``parent_commit`` no longer its head)."""
    response = getattr(error, "response", None)
    return status_of(error) == 412 and response is not None and "/commit/" in str(response.request.url)


def record(state: PublishState, plan: RepoPlan, result: RepoResult, *, readme_only: bool) -> None:
    """
    Remember in ``state`` what the repo now holds from us: its files by sha256, the commit, our PR.

    Args:
        state (`PublishState`):
            The state to update (the caller saves it).
        plan (`RepoPlan`):
            The applied plan.
        result (`RepoResult`):
            What ``apply_repo`` did.
        readme_only (`bool`):
            The plan held only the README: the other files recorded before are still ours.
    """
    entry = state.repo(plan.spec.key)
    entry["repo_type"] = plan.spec.repo_type
    hashes = {path: f.sha256 for path, f in plan.spec.files.items()}
    entry["files"] = {**entry.get("files", {}), **hashes} if readme_only else hashes
    if result.status == "pull request":
        num = plan.pr_num or int(result.pr_url.rstrip("/").rsplit("/", 1)[1])
        entry["pr"] = {"num": num, "ref": f"refs/pr/{num}", "commit": result.commit, "url": result.pr_url}
    elif result.commit and not plan.pr_num:
        entry["commit"] = result.commit


def finish_collection(
    target: HubTarget,
    plan: collections.CollectionPlan,
    *,
    state: PublishState,
    create_pr: bool,
    say: Callable[[str], None],
) -> None:
    """
    Bring an existing collection to its plan and record it, after every repo was committed.

    Args:
        target (`HubTarget`):
            The opened Hub.
        plan (`CollectionPlan`):
            The collection's plan; a collection still missing here is left to ``publish`` to create.
        state (`PublishState`):
            Where the collection's slug and title are recorded.
        create_pr (`bool`):
            The repos got PRs: a collection has none, so it is left as it is until they are merged.
        say (`Callable[[str], None]`):
            Where the report lines go.

    Raises:
        [`HubError`]:
            Updating the collection failed; rerunning finishes it.
    """
    if create_pr and plan.changed:
        # A collection has no PRs: its notes would show numbers that are not merged yet.
        say("Collection left as it is with --create-pr: rerun publish without it after merging the PRs.")
    elif plan.current is None:
        say("No collection on the Hub: run `cot-compress publish` to create it.")
    else:
        result = collections.apply_collection(target, plan) if plan.changed else plan.current
        state.set_collection(result.slug, result.title)
        say(f"collection {result.slug}: {'updated' if plan.changed else 'unchanged'}")
