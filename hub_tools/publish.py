"""Publishing a study: preflight → plan → diff → apply, exactly one commit per changed repo.

1. Preflight, before any write: the token is valid and may write to the namespace, every level has its
   adapter and metrics, metrics agree with their samples, every card and collection note validates.
2. Plan: the wanted files of each repo come from the run directory (adapter files, card, plot; the eval
   dataset as parquet shards built with ``datasets``); the Hub's side is read with ``repo_info`` and
   ``get_paths_info`` (sha256 of LFS files, git blob sha1 of regular ones).
3. Apply: one ``create_commit`` per changed repo, with ``parent_commit`` = the head read when planning, so a
   concurrent change fails cleanly instead of being overwritten; unchanged repos get no request at all.
   Then the collection. ``publish/state.json`` records what was pushed, so a rerun converges.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.metrics import check_metrics_match_samples
from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, read_json, write_json
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ArtifactError, HubError
from hub_tools import collection as collections
from hub_tools.hub_client import HubTarget, check_write_access, describe, open_hub, reading, status_of

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training.json")
# The study's data stats travel with every adapter: with training.json they are all an adapter card needs
# beyond the eval dataset, so `regenerate-cards --from-hub` can rebuild the cards from the Hub alone.
DATA_STATS = "data_stats.json"
README = "README.md"
PLOT = "pareto.png"
SPLIT = "test"
# Above this size the Hub always stores a file in LFS, so its git blob sha1 is never needed.
LFS_ALWAYS = 10 * 1024 * 1024


# ---------------------------------------------------------------- wanted state


@dataclass(frozen=True)
class LocalFile:
    """One file as it should be in a repo: where its bytes are, its size and the hashes the Hub compares."""

    path: str
    size: int
    sha256: str
    git_sha1: str | None
    data: bytes | None = None
    source: Path | None = None

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> LocalFile:
        return cls(path, len(data), sha_fileobj(io.BytesIO(data)).hex(), git_hash(data), data=data)

    @classmethod
    def from_path(cls, path: str, source: Path) -> LocalFile:
        size = source.stat().st_size
        with source.open("rb") as handle:
            sha256 = sha_fileobj(handle).hex()
        sha1 = git_hash(source.read_bytes()) if size < LFS_ALWAYS else None
        return cls(path, size, sha256, sha1, source=source)

    def content(self) -> bytes | str:
        return self.data if self.data is not None else str(self.source)

    def text(self) -> str:
        raw = self.data if self.data is not None else self.source.read_bytes()
        return raw.decode("utf-8", "replace")

    def matches(self, remote: RepoFile) -> bool:
        if remote.lfs is not None:
            return remote.lfs.sha256 == self.sha256
        return self.git_sha1 is not None and remote.blob_id == self.git_sha1


@dataclass
class RepoSpec:
    """The wanted state of one repo."""

    repo_id: str
    repo_type: str  # "model" | "dataset"
    files: dict[str, LocalFile]
    message: str


def adapter_spec(config: StudyConfig, run_dir: RunDir, level: int, readme: str, plot: LocalFile) -> RepoSpec:
    """Adapter repo: the PEFT adapter, its provenance (training.json, data stats), the card and the plot."""
    files = {name: LocalFile.from_path(name, run_dir.adapter_dir(level) / name) for name in ADAPTER_FILES}
    files[DATA_STATS] = LocalFile.from_path(DATA_STATS, run_dir.data_stats)
    files[README] = LocalFile.from_bytes(README, readme.encode())
    files[PLOT] = plot
    message = f"Publish {config.name} level {level}: adapter, card and plot"
    return RepoSpec(config.adapter_repo_id(level), "model", files, message)


def shard_path(config_name: str) -> str:
    """Where ``DatasetDict.push_to_hub(config_name=...)`` puts a config's only shard (so both agree)."""
    return f"{config_name}/{SPLIT}-00000-of-00001.parquet"


def dataset_readme(card_text: str, config_names: list[str]) -> str:
    """The card with ``configs:`` metadata naming each config's shards, which ``load_dataset`` reads."""
    card = DatasetCard(card_text)
    wanted = [
        {"config_name": name, "data_files": [{"split": SPLIT, "path": f"{name}/{SPLIT}-*"}]}
        for name in config_names
    ]
    if card.data.to_dict().get("configs") == wanted:
        return card_text
    card.data.configs = wanted
    return str(card)


def eval_spec(config: StudyConfig, run_dir: RunDir, readme: str, plot: LocalFile) -> RepoSpec:
    """Eval dataset repo: one parquet shard per model config plus ``summary``, built with ``datasets``.

    The shards go into the same single commit as the card (``push_to_hub`` would make one per config),
    where ``DatasetDict.push_to_hub(config_name=...)`` would put them, so either can update the other's.
    """
    from eval_artifacts.hub_dataset import build_eval_dataset

    files = {}
    for name, dataset_dict in build_eval_dataset(run_dir, models=config.model_keys).items():
        buffer = io.BytesIO()
        dataset_dict[SPLIT].to_parquet(buffer)
        files[shard_path(name)] = LocalFile.from_bytes(shard_path(name), buffer.getvalue())
    files[README] = LocalFile.from_bytes(README, readme.encode())
    files[PLOT] = plot
    return RepoSpec(
        config.eval_repo_id, "dataset", files, f"Publish {config.name} eval dataset, card and plot"
    )


# ---------------------------------------------------------------- publish/state.json


class PublishState:
    """``publish/state.json``: per Hub (``local`` or its URL), what each repo last received and the collection."""

    def __init__(self, run_dir: RunDir, label: str):
        self.path = run_dir.publish_state
        self.label = label
        self.data = (
            read_json(self.path, what="publish state", hint="delete it; the next publish rebuilds it")
            if self.path.is_file()
            else {"schema_version": SCHEMA_VERSION, "hubs": {}}
        )
        hub = self.data.setdefault("hubs", {}).setdefault(label, {})
        self.repos: dict[str, dict] = hub.setdefault("repos", {})
        self.hub = hub

    def repo(self, repo_id: str) -> dict:
        return self.repos.setdefault(repo_id, {"files": {}})

    def owned(self, repo_id: str) -> set[str]:
        """Files we pushed to this repo before: the only files a publish may delete."""
        return set(self.repos.get(repo_id, {}).get("files", {}))

    @property
    def collection_slug(self) -> str | None:
        return (self.hub.get("collection") or {}).get("slug")

    def set_collection(self, slug: str, title: str) -> None:
        self.hub["collection"] = {"slug": slug, "title": title}
        # Top level: the last published collection, which `render-cards` links (cards.collection_url_from_state).
        self.data["collection_slug"] = slug
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


# ---------------------------------------------------------------- plan and diff


@dataclass
class RepoPlan:
    spec: RepoSpec
    private: bool  # visibility for a repo we create
    exists: bool
    head: str | None  # the commit the diff was computed against (None: repo not created yet)
    revision: str = "main"  # "refs/pr/N" when committing onto a PR we opened earlier
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
        kind = "dataset" if self.spec.repo_type == "dataset" else "model"
        where = f" on PR #{self.pr_num}" if self.pr_num else ""
        if not self.exists:
            state = f"new, {'private' if self.private else 'public'}"
        else:
            state = "changed" if self.changed else "unchanged"
        lines = [f"{kind} {self.spec.repo_id} ({state}{where}) {url}"]
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


def _size(n: int) -> str:
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
        lambda: api.list_repo_refs(spec.repo_id, repo_type=spec.repo_type, include_pull_requests=True, token=token)
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


def plan_repo(
    target: HubTarget,
    spec: RepoSpec,
    *,
    private: bool,
    owned: set[str],
    pr: dict | None,
    create_pr: bool,
    may_create: bool = True,
    fetch_readme: bool,
) -> RepoPlan:
    """Compare ``spec`` with the repo on the Hub; reads only (repo_info, refs, paths-info, README).

    ``fetch_readme`` downloads the Hub's README when it differs, for the dry run's diff.
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
            return RepoPlan(spec, private, exists=False, head=None, add=sorted(spec.files))
        plan = RepoPlan(spec, private, exists=True, head=info.sha)
        if bool(info.private) != private:
            plan.warnings.append(
                f"  warning: {spec.repo_id} is {'private' if info.private else 'public'} but the config says "
                f"{'private' if private else 'public'}: visibility left as it is; change it on the Hub if you mean it"
            )
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


# ---------------------------------------------------------------- apply


@dataclass
class RepoResult:
    repo_id: str
    repo_type: str
    url: str
    status: str  # created | committed | pull request | unchanged | would create | would change
    files: list[str] = field(default_factory=list)
    commit: str | None = None
    pr_url: str | None = None


def apply_repo(target: HubTarget, plan: RepoPlan, *, create_pr: bool) -> RepoResult:
    """Create the repo if needed, then one commit (or one PR) holding every change of the plan."""
    spec, api, token = plan.spec, target.api, target.token
    url = target.repo_url(spec.repo_type, spec.repo_id)
    touched = plan.add + plan.change + plan.delete
    if not plan.changed:
        return RepoResult(spec.repo_id, spec.repo_type, url, "unchanged", commit=plan.head)
    try:
        if not plan.exists:
            try:
                api.create_repo(spec.repo_id, repo_type=spec.repo_type, private=plan.private, token=token)
            except HfHubHTTPError as error:
                if status_of(error) == 409:
                    raise HubError(
                        f"{spec.repo_id} was created on the Hub since planning: rerun publish"
                    ) from None
                raise
            maybe_crash("publish.repo_created", spec.repo_id.split("/")[1])
            plan.head = reading(lambda: api.repo_info(spec.repo_id, repo_type=spec.repo_type, token=token)).sha
        operations = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=spec.files[p].content())
            for p in plan.add + plan.change
        ] + [CommitOperationDelete(path_in_repo=p) for p in plan.delete]
        maybe_crash("publish.before_commit", spec.repo_id.split("/")[1])
        info = api.create_commit(
            spec.repo_id,
            operations,
            commit_message=spec.message,
            repo_type=spec.repo_type,
            revision=plan.revision if plan.pr_num else None,
            create_pr=create_pr and not plan.pr_num,
            parent_commit=plan.head,
            token=token,
        )
    except HubError:
        raise
    except (HfHubHTTPError, httpx2.TransportError, RuntimeError) as error:
        # huggingface_hub wraps LFS upload errors in RuntimeError("Error while uploading ...")
        if type(error) is RuntimeError:
            error = error.__cause__ or error
        if _commit_conflict(error):
            raise HubError(
                f"{spec.repo_id} changed on the Hub since planning (its head is no longer {plan.head[:10]}): "
                "nothing was committed to it; rerun publish"
            ) from None
        raise HubError(f"pushing {spec.repo_id} failed: {describe(error, token)}; rerun publish") from None
    if create_pr:
        pr_url = info.pr_url or f"{url}/discussions/{plan.pr_num}"
        return RepoResult(spec.repo_id, spec.repo_type, url, "pull request", touched, info.oid, pr_url)
    status = "committed" if plan.exists else "created"
    return RepoResult(spec.repo_id, spec.repo_type, url, status, touched, info.oid)


def _commit_conflict(error: BaseException) -> bool:
    """A 412 on the commit itself: the branch moved since planning (``parent_commit`` no longer its head)."""
    response = getattr(error, "response", None)
    return status_of(error) == 412 and response is not None and "/commit/" in str(response.request.url)


def record(state: PublishState, plan: RepoPlan, result: RepoResult, *, readme_only: bool) -> None:
    """Remember what this repo now holds from us (files by sha256, the commit, our PR)."""
    entry = state.repo(plan.spec.repo_id)
    entry["repo_type"] = plan.spec.repo_type
    hashes = {path: f.sha256 for path, f in plan.spec.files.items()}
    entry["files"] = {**entry.get("files", {}), **hashes} if readme_only else hashes
    if result.status == "pull request":
        num = plan.pr_num or int(result.pr_url.rstrip("/").rsplit("/", 1)[1])
        entry["pr"] = {"num": num, "ref": f"refs/pr/{num}", "commit": result.commit, "url": result.pr_url}
    elif result.commit and not plan.pr_num:
        entry["commit"] = result.commit


# ---------------------------------------------------------------- preflight


def check_artifacts(config: StudyConfig, run_dir: RunDir, *, adapters: bool = True) -> None:
    """Every level has its adapter and metrics, metrics agree with samples, summary and plot exist.

    Raises:
        ArtifactError: naming the first missing or inconsistent artifact and the command that makes it.
    """
    if adapters:
        for level in config.levels:
            for name in ADAPTER_FILES:
                if not (run_dir.adapter_dir(level) / name).is_file():
                    raise ArtifactError(
                        f"level {level} has no {name} in {run_dir.adapter_dir(level)}: "
                        f"run `cot-compress train --levels {level}` before publishing"
                    )
    for model in config.model_keys:
        if not run_dir.samples(model).is_file():
            raise ArtifactError(
                f"{model} has no samples at {run_dir.samples(model)}: run `cot-compress evaluate` before publishing"
            )
        check_metrics_match_samples(run_dir, model)
    for path in (run_dir.summary, run_dir.pareto_png):
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: run `cot-compress evaluate` before publishing")


def render_cards(
    config: StudyConfig, run_dir: RunDir, templates_dir: Path | None, collection_url: str | None
):
    """Render and validate every card and collection note from the run directory's artifacts."""
    from hub_tools import cards

    rendered = cards.render_study_cards(
        config, run_dir, templates_dir=templates_dir, collection_url=collection_url
    )
    notes = cards.render_collection_notes(config, run_dir, templates_dir=templates_dir)
    cards.validate_all(rendered, config=config, run_dir=run_dir, notes=notes)
    collections.wanted_items(config, notes)
    return rendered, notes


def card_collection_url(config: StudyConfig, slug: str | None) -> str | None:
    """The collection link cards carry, on the Hub the cards name (huggingface.co for the local hub)."""
    from hub_tools import cards

    return f"{cards.hub_url(config)}/collections/{slug}" if slug else None


# ---------------------------------------------------------------- the commands


@dataclass
class PublishReport:
    """What a publishing command did (or, with dry_run, would do)."""

    endpoint: str
    dry_run: bool
    repos: list[RepoResult] = field(default_factory=list)
    collection_slug: str | None = None
    collection_url: str | None = None
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def commits(self) -> int:
        return sum(r.status in ("created", "committed", "pull request") for r in self.repos)

    def text(self) -> str:
        return "\n".join(self.lines)


def publish_study(
    config: StudyConfig,
    run_dir: RunDir | Path,
    *,
    endpoint: str | None = None,
    namespace: str | None = None,
    dry_run: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    templates_dir: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> PublishReport:
    """Publish every adapter repo, the eval dataset and the collection; see the module docstring.

    Raises:
        HubError, ArtifactError, CardValidationError: a preflight check failed (nothing was written), or a
            write failed (the message says which repo; rerunning converges).
    """
    return _run(
        config, run_dir, scope="all", endpoint=endpoint, namespace=namespace, dry_run=dry_run,
        create_pr=create_pr, token=token, templates_dir=templates_dir, echo=echo,
    )  # fmt: skip


def push_eval(
    config: StudyConfig,
    run_dir: RunDir | Path,
    *,
    endpoint: str | None = None,
    namespace: str | None = None,
    dry_run: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    templates_dir: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> PublishReport:
    """Push the eval dataset alone (one config per model plus ``summary``), its card and the plot."""
    return _run(
        config, run_dir, scope="eval", endpoint=endpoint, namespace=namespace, dry_run=dry_run,
        create_pr=create_pr, token=token, templates_dir=templates_dir, echo=echo,
    )  # fmt: skip


def regenerate_cards(
    config: StudyConfig,
    run_dir: RunDir | Path,
    *,
    from_hub: bool = False,
    endpoint: str | None = None,
    namespace: str | None = None,
    dry_run: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    templates_dir: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> PublishReport:
    """Re-render every card and note; push only READMEs and notes that changed, never weight bytes.

    With ``from_hub`` the run directory (which must hold no eval results) is first restored from the Hub:
    samples from the eval dataset's configs (metrics recomputed), training.json from each adapter repo.
    """
    return _run(
        config, run_dir, scope="cards", endpoint=endpoint, namespace=namespace, dry_run=dry_run,
        create_pr=create_pr, token=token, templates_dir=templates_dir, echo=echo, from_hub=from_hub,
    )  # fmt: skip


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Progress bars of huggingface_hub and datasets (one per file and config) would bury the plan."""
    import datasets
    from huggingface_hub import utils

    libraries = [m for m in (utils, datasets.utils) if not m.are_progress_bars_disabled()]
    for module in libraries:
        module.disable_progress_bars()
    try:
        yield
    finally:
        for module in libraries:
            module.enable_progress_bars()


def check_hub(
    config: StudyConfig,
    run_dir: RunDir | Path,
    *,
    endpoint: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
) -> None:
    """The Hub half of the publish preflight on its own: the endpoint answers and the token may write to the
    namespace. ``train-and-publish`` runs it before the stages, so a bad token fails in seconds, not hours.

    Raises:
        HubError: as ``check_write_access``; ConfigError: a malformed namespace or endpoint.
    """
    config = config.with_overrides(**{"hub.namespace": namespace, "hub.endpoint": endpoint})
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    with _no_progress_bars(), open_hub(config, run_dir, endpoint=endpoint, token=token) as target:
        check_write_access(target, config.hub.namespace)


def _run(
    config: StudyConfig,
    run_dir: RunDir | Path,
    *,
    scope: str,  # "all" (publish), "eval" (push-eval), "cards" (regenerate-cards: READMEs and notes only)
    endpoint: str | None,
    namespace: str | None,
    dry_run: bool,
    create_pr: bool,
    token: str | None,
    templates_dir: Path | None,
    echo: Callable[[str], None] | None,
    from_hub: bool = False,
) -> PublishReport:
    echo = echo or click.echo
    # Cards link the Hub they are published to, so an --endpoint override is an override of the config.
    config = config.with_overrides(**{"hub.namespace": namespace, "hub.endpoint": endpoint})
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    with _no_progress_bars(), open_hub(config, run_dir, endpoint=endpoint, token=token) as target:
        # -- preflight (reads only): token, artifacts, cards and notes
        check_write_access(target, config.hub.namespace)
        if from_hub:
            restore_run_dir_from_hub(target, config, run_dir, echo=echo)
        check_artifacts(config, run_dir, adapters=scope == "all")
        state = PublishState(run_dir, target.label)
        current = collections.find_collection(
            target,
            namespace=config.hub.namespace,
            title=config.hub.collection_title,
            slug=state.collection_slug,
        )
        slug = current.slug if current else None
        rendered, notes = render_cards(config, run_dir, templates_dir, card_collection_url(config, slug))
        specs = _specs(config, run_dir, rendered, scope)

        # -- plan (reads only)
        owned = {spec.repo_id: set() if scope == "cards" else state.owned(spec.repo_id) for spec in specs}
        plans = [
            plan_repo(
                target,
                spec,
                private=config.hub.private,
                owned=owned[spec.repo_id],
                pr=state.repos.get(spec.repo_id, {}).get("pr"),
                create_pr=create_pr,
                may_create=scope != "cards",
                fetch_readme=dry_run,
            )
            for spec in specs
        ]
        collection_plan = None
        if scope != "eval":
            collection_plan = collections.plan_collection(
                config, notes, current=current, notes_only=scope == "cards"
            )
        report = PublishReport(endpoint=target.endpoint, dry_run=dry_run)

        def say(line: str) -> None:
            report.lines.append(line)
            echo(line)

        for plan in plans:
            report.warnings += [w.strip() for w in plan.warnings]
        if dry_run:
            _describe_dry_run(report, target, plans, collection_plan, create_pr, say)
            return report

        # -- apply. A new collection comes first, so that the cards can link it from their first commit.
        if (
            collection_plan is not None
            and collection_plan.current is None
            and scope == "all"
            and not create_pr
        ):
            collection_plan.current = collections.create_collection(target, collection_plan)
            maybe_crash("publish.collection_created")  # on the Hub, not yet in state.json
            state.set_collection(collection_plan.slug, collection_plan.title)
            url = card_collection_url(config, collection_plan.slug)
            rendered, notes = render_cards(config, run_dir, templates_dir, url)
            for plan, spec in zip(plans, _specs(config, run_dir, rendered, scope), strict=True):
                plan.spec.files[README] = spec.files[README]
                plan.diff(owned[spec.repo_id])
        _write_cards(run_dir, rendered, specs)
        for plan in plans:  # one commit (or PR) per changed repo
            result = apply_repo(target, plan, create_pr=create_pr)
            maybe_crash("publish.after_commit", plan.spec.repo_id.split("/")[1])  # state.json not updated yet
            record(state, plan, result, readme_only=scope == "cards")
            state.save()
            report.repos.append(result)
            say(_result_line(result))
        if collection_plan is not None:
            _finish_collection(report, target, state, collection_plan, create_pr, say)
        for warning in report.warnings:
            say(warning)
        if target.local_hub is not None:
            say(
                f"Published to the embedded local hub (data in {run_dir.hub_data_dir}); browse it with "
                f"`cot-compress hub serve --data {run_dir.hub_data_dir}`"
            )
        return report


def _specs(config: StudyConfig, run_dir: RunDir, rendered: dict, scope: str) -> list[RepoSpec]:
    text = {card.repo_id: card.text for card in rendered.values()}
    eval_readme = dataset_readme(text[config.eval_repo_id], [*config.model_keys, "summary"])
    if scope == "cards":  # READMEs only: weights, shards and plots are never read nor touched
        message = f"Regenerate the {config.name} card"
        ids = [(config.adapter_repo_id(n), "model", text[config.adapter_repo_id(n)]) for n in config.levels]
        ids.append((config.eval_repo_id, "dataset", eval_readme))
        return [
            RepoSpec(repo_id, repo_type, {README: LocalFile.from_bytes(README, readme.encode())}, message)
            for repo_id, repo_type, readme in ids
        ]
    plot = LocalFile.from_path(PLOT, run_dir.pareto_png)
    specs = []
    if scope == "all":
        specs += [
            adapter_spec(config, run_dir, level, text[config.adapter_repo_id(level)], plot)
            for level in config.levels
        ]
    specs.append(eval_spec(config, run_dir, eval_readme, plot))
    return specs


def _write_cards(run_dir: RunDir, rendered: dict, specs: list[RepoSpec]) -> None:
    """Keep ``cards/<repo>/README.md`` equal to exactly what is pushed."""
    from hub_tools import cards

    pushed = {spec.repo_id: spec.files[README].text() for spec in specs}
    cards.write_cards(
        run_dir,
        {
            name: dataclasses.replace(card, text=pushed.get(card.repo_id, card.text))
            for name, card in rendered.items()
        },
    )


def _describe_dry_run(report, target, plans, collection_plan, create_pr, say) -> None:
    say(f"Dry run against {target.endpoint}: nothing will be pushed.")
    for plan in plans:
        for line in plan.describe(target.repo_url(plan.spec.repo_type, plan.spec.repo_id)):
            say(line)
        status = "would create" if not plan.exists else ("would change" if plan.changed else "unchanged")
        url = target.repo_url(plan.spec.repo_type, plan.spec.repo_id)
        report.repos.append(
            RepoResult(
                plan.spec.repo_id, plan.spec.repo_type, url, status, plan.add + plan.change + plan.delete
            )
        )
    if collection_plan is not None:
        for line in collection_plan.describe():
            say(line)
        if create_pr and collection_plan.changed:
            say("  (with --create-pr the collection is left as it is until a publish without it)")
        elif collection_plan.current is None and not collection_plan.notes_only:
            say("  (created first: every card will then link it, so every README changes)")
        report.collection_slug = collection_plan.slug
    changed = sum(p.changed for p in plans)
    say(f"{changed} of {len(plans)} repo(s) would get a {'PR' if create_pr else 'commit'}.")


def _result_line(result: RepoResult) -> str:
    files = f" ({', '.join(result.files)})" if result.files else ""
    extra = f" -> {result.pr_url}" if result.pr_url else ""
    return f"{result.repo_id}: {result.status}{files}{extra}\n  {result.url}"


def _finish_collection(report, target, state, plan, create_pr, say) -> None:
    if create_pr and plan.changed:
        # A collection has no PRs: its notes would show numbers that are not merged yet.
        say("Collection left as it is with --create-pr: rerun publish without it after merging the PRs.")
    elif plan.current is None:
        say("No collection on the Hub: run `cot-compress publish` to create it.")
    else:
        result = collections.apply_collection(target, plan) if plan.changed else plan.current
        state.set_collection(result.slug, result.title)
        say(f"collection {result.slug}: {'updated' if plan.changed else 'unchanged'}")
    report.collection_slug = plan.slug
    report.warnings += plan.warnings
    if report.collection_slug:
        report.collection_url = target.collection_url(report.collection_slug)
        say(f"  {report.collection_url}")


# ---------------------------------------------------------------- regenerate-cards --from-hub


def restore_run_dir_from_hub(
    target: HubTarget, config: StudyConfig, run_dir: RunDir, *, echo: Callable[[str], None]
) -> None:
    """Rebuild the eval results of an empty run directory from what the study published.

    Samples come from the eval dataset's configs (metrics, summary and plot are recomputed from them, never
    trusted from the Hub); training.json, which the dataset cannot hold, comes from each adapter repo.
    """
    import datasets

    from eval_artifacts.hub_dataset import restore_run_dir_from_eval_dataset
    from eval_artifacts.plots import plot_pareto
    from eval_artifacts.summary import write_summary

    if any(run_dir.eval_dir.glob("*/samples.jsonl")):
        raise ArtifactError(
            f"{run_dir.eval_dir} already holds eval results: drop --from-hub to render from them, "
            "or pass an empty --run-dir"
        )
    repo_id, token = config.eval_repo_id, target.token
    cache = run_dir.cache_dir / "from_hub"
    try:
        names = datasets.get_dataset_config_names(repo_id, token=token)
        configs = {
            name: datasets.load_dataset(repo_id, name, token=token, cache_dir=str(cache)) for name in names
        }
    except (HfHubHTTPError, FileNotFoundError, ValueError) as error:
        raise HubError(
            f"cannot load the eval dataset {repo_id} from {target.endpoint}: {describe(error, token)}; "
            "push it with `cot-compress push-eval`"
        ) from None
    models = restore_run_dir_from_eval_dataset(run_dir, configs)
    missing = [model for model in config.model_keys if model not in models]
    if missing:
        raise ArtifactError(
            f"the eval dataset {repo_id} has no config for {', '.join(missing)}: run push-eval"
        )
    plot_pareto(write_summary(run_dir, study=config.name, models=config.model_keys), run_dir.pareto_png)
    downloads = [
        (config.adapter_repo_id(n), "training.json", run_dir.training_json(n)) for n in config.levels
    ]
    downloads.append((config.adapter_repo_id(config.levels[0]), DATA_STATS, run_dir.data_stats))
    for adapter_repo, name, destination in downloads:
        try:
            path = target.api.hf_hub_download(adapter_repo, name, cache_dir=cache, token=token)
        except HfHubHTTPError as error:
            raise HubError(
                f"cannot download {name} of {adapter_repo}: {describe(error, token)}; run `cot-compress publish`"
            ) from None
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(Path(path).read_bytes())
    echo(f"Restored {len(models)} model(s), training.json and data stats from {target.endpoint}")
