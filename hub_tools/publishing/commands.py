"""The publishing commands (publish, push-eval, regenerate-cards): one entry point, told what by a ``Scope``."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.levels import LEVELS
from hub_tools import cards
from hub_tools import collection as collections
from hub_tools.hub_client import HubTarget, check_write_access, open_hub
from hub_tools.publishing.apply import RepoResult, apply_repo, branch_url, finish_collection, record
from hub_tools.publishing.plan import RepoPlan, plan_repo
from hub_tools.publishing.restore import restore_run_dir_from_hub
from hub_tools.publishing.spec import (
    MAIN,
    RepoSpec,
    adapter_branches,
    check_artifacts,
    readme_specs,
    render_cards,
    repo_specs,
    write_pushed_cards,
)
from hub_tools.publishing.state import PublishState


class Scope(enum.Enum):
    """What a publishing command pushes."""

    ALL = "all"  # `publish`: every adapter repo, the eval dataset and the collection
    EVAL = "eval"  # `push-eval`: the eval dataset alone, with its card and the plot
    CARDS = "cards"  # `regenerate-cards`: every README and collection note, never a weight byte

    @property
    def adapters(self) -> bool:
        """The adapter repos' files are pushed, so they must all be in the run directory."""
        return self is Scope.ALL

    @property
    def readmes_only(self) -> bool:
        """Only READMEs and notes change: no repo is created, no file deleted, no collection item moved."""
        return self is Scope.CARDS

    @property
    def collection(self) -> bool:
        """The collection is part of the publish."""
        return self is not Scope.EVAL


@dataclass(frozen=True)
class PublishOptions:
    """
    How a publishing command runs; what it pushes is its ``Scope``. One field per command-line flag.

    Args:
        dry_run (`bool`, *optional*):
            Print the plan and the README diffs; push nothing.
        create_pr (`bool`, *optional*):
            Open (or update) one PR per changed repo instead of committing to ``main``.
        templates_dir (`Path`, *optional*):
            A folder of the user's own card and note templates.
        from_hub (`bool`, *optional*):
            ``Scope.CARDS`` only: first restore an empty run directory from the published eval dataset.
    """

    dry_run: bool = False
    create_pr: bool = False
    templates_dir: Path | None = None
    from_hub: bool = False


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


@contextmanager
def open_target(config: StudyConfig, run_dir: RunDir, *, token: str | None = None) -> Iterator[HubTarget]:
    """
    Open the study's Hub (``hub.endpoint``) and check that the token may write to ``hub.namespace``.

    ``train-and-publish`` holds one target from before its first stage to the end of its publish, so a bad
    token fails in seconds, not after hours of training.

    Args:
        config (`StudyConfig`):
            The study, with ``--endpoint`` and ``--namespace`` already folded in.
        run_dir (`RunDir`):
            The run directory; the embedded local hub keeps its storage there.
        token (`str`, *optional*):
            A token for a remote Hub; defaults to ``HF_TOKEN`` or the login cache.

    Returns:
        `Iterator[HubTarget]`: the checked Hub, for the duration of the block.

    Raises:
        [`HubError`]:
            No token, or the token is rejected, read-only, or cannot write to the namespace; or the Hub
            cannot be reached.
    """
    with open_hub(config, run_dir, token=token) as target:
        with target.clients():
            check_write_access(target, config.hub.namespace)
        yield target


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


def publish(
    config: StudyConfig,
    run_dir: RunDir,
    *,
    target: HubTarget,
    scope: Scope,
    options: PublishOptions,
    echo: Callable[[str], None] = print,
) -> PublishReport:
    """
    Run one publishing command: preflight, plan, then (unless a dry run) apply.

    1. Preflight, before any write (``open_target`` checked the token): every artifact the scope pushes is
       there, metrics agree with their samples, every card and collection note validates.
    2. Plan, reading only: each repo's spec is diffed with the Hub's side, and the collection with its own.
    3. Apply: one commit (or PR) per changed repo, then the collection; ``publish/state.json`` records what
       was pushed, so a rerun converges.

    Args:
        config (`StudyConfig`):
            The study, with ``--endpoint`` and ``--namespace`` already folded in.
        run_dir (`RunDir`):
            The run directory to publish from.
        target (`HubTarget`):
            The Hub opened and checked by ``open_target``.
        scope (`Scope`):
            What to push: everything (``publish``), the eval dataset (``push-eval``) or the cards
            (``regenerate-cards``).
        options (`PublishOptions`):
            Dry run, PRs, templates, restoring from the Hub.
        echo (`Callable[[str], None]`, *optional*):
            Where each line of the plan or the report goes; stdout by default.

    Returns:
        [`PublishReport`]: each repo's status, the collection, the lines echoed and the warnings.

    Raises:
        [`ArtifactError`], [`CardValidationError`], [`HubError`]:
            A preflight check failed (nothing was written), or a write failed (the message says which repo;
            rerunning converges).
        [`ValueError`]:
            ``options.from_hub`` with a scope other than ``Scope.CARDS``.
    """
    if options.from_hub and scope is not Scope.CARDS:
        raise ValueError(f"from_hub restores the run directory for Scope.CARDS only, not {scope}")
    report = PublishReport(endpoint=target.endpoint, dry_run=options.dry_run)

    def say(line: str) -> None:
        report.lines.append(line)
        echo(line)

    with _no_progress_bars(), target.clients():
        # -- preflight (reads only): artifacts, cards and notes; open_target checked the token
        if options.from_hub:
            restore_run_dir_from_hub(target, config, run_dir, echo=echo)
        check_artifacts(config, run_dir, adapters=scope.adapters)
        state = PublishState(run_dir, label=target.label, namespace=config.hub.namespace)
        current = collections.find_collection(
            target,
            namespace=config.hub.namespace,
            title=config.hub.collection_title,
            slug=state.collection_slug,
        )
        recorded = cards.published_from_state(config, run_dir)  # what the last publish here named
        published = cards.Published(
            hub_url=target.endpoint,
            collection_slug=current.slug if current else None,
            base_commit=recorded.base_commit if recorded.hub_url == target.endpoint else None,
            adapter_commits=recorded.adapter_commits if recorded.hub_url == target.endpoint else {},
        )
        rendered, notes, art = render_cards(
            config, run_dir, templates_dir=options.templates_dir, published=published
        )
        specs = _specs(config, run_dir, rendered, art, scope)

        # -- plan (reads only)
        owned = {spec.key: set() if scope.readmes_only else state.owned(spec.key) for spec in specs}
        plans = [
            plan_repo(
                target,
                spec,
                private=config.hub.private,
                owned=owned[spec.key],
                pr=state.pr(spec.key),
                create_pr=options.create_pr,
                may_create=not scope.readmes_only,
                fetch_readme=options.dry_run,
            )
            for spec in specs
        ]
        # The cards pin the base's commit and name the adapters' commits: those the Hub holds now, until this
        # publish makes new ones.
        heads = _heads(config, plans, published)
        if heads != published:
            rendered, published = _rerender(config, run_dir, plans, heads, scope=scope, owned=owned, options=options)
        collection_plan = (
            collections.plan_collection(config, notes, current=current, notes_only=scope.readmes_only)
            if scope.collection
            else None
        )
        for plan in plans:
            report.warnings += [w.strip() for w in plan.warnings]
        if options.dry_run:
            _describe_dry_run(report, target, plans, collection_plan, create_pr=options.create_pr, say=say)
            return report

        # -- apply. A new or retitled collection comes first (a title makes the slug), so that the cards
        # link its final URL from their first commit.
        if (
            collection_plan is not None
            and (collection_plan.current is None or collection_plan.title_change)
            and not collection_plan.notes_only
            and not options.create_pr
        ):
            if collection_plan.current is None:
                collection_plan.current = collections.create_collection(target, collection_plan)
                maybe_crash("publish.collection_created")  # on the Hub, not yet in state.json
            else:
                collection_plan.current = collections.retitle_collection(target, collection_plan)
            state.set_collection(collection_plan.slug, collection_plan.title)
            published = dataclasses.replace(published, collection_slug=collection_plan.slug)
            rendered, published = _rerender(
                config, run_dir, plans, published, scope=scope, owned=owned, options=options
            )
        write_pushed_cards(run_dir, rendered, specs)
        for index, plan in enumerate(plans):  # one commit (or PR) per changed repo, in order
            result = apply_repo(target, plan, create_pr=options.create_pr)
            maybe_crash("publish.after_commit", plan.spec.repo_id.split("/")[1])  # state.json not updated yet
            record(state, plan, result, readme_only=scope.readmes_only)
            state.save()
            report.repos.append(result)
            say(result.line())
            if result.commit:  # later cards name this commit (on a PR, the PR's head)
                plan.head = result.commit
                later = _heads(config, plans, published)
                if later != published:
                    rendered, published = _rerender(
                        config, run_dir, plans[index + 1 :], later, scope=scope, owned=owned, options=options
                    )
                    write_pushed_cards(run_dir, rendered, specs)
        state.set_published(published.to_json())
        if collection_plan is not None:
            finish_collection(target, collection_plan, state=state, create_pr=options.create_pr, say=say)
            report.collection_slug = collection_plan.slug
            report.warnings += collection_plan.warnings
            if report.collection_slug:
                report.collection_url = target.collection_url(report.collection_slug)
                say(f"  {report.collection_url}")
        for warning in report.warnings:
            say(warning)
        if target.local_hub is not None:
            say(
                f"Published to the embedded local hub (data in {run_dir.hub_data_dir}); browse it with "
                f"`cot-compress hub serve --data {run_dir.hub_data_dir}`"
            )
        return report


def _heads(config: StudyConfig, plans: list[RepoPlan], published: cards.Published) -> cards.Published:
    """``published`` with the tiny base's and every adapter's commit (each seed's on its own branch) as the
    plans last saw them."""
    heads = {(plan.spec.repo_id, plan.spec.branch): plan.head for plan in plans if plan.head}
    commits = {
        model: heads[(config.adapter_repo_id(level), branch)]
        for level in config.levels
        for (model, _), branch in zip(config.adapter_models(level), adapter_branches(config, level), strict=True)
        if (config.adapter_repo_id(level), branch) in heads
    }
    commits |= {
        LEVELS[level].rl_key: heads[(config.rl_repo_id(level), MAIN)]
        for level in config.rl.levels
        if (config.rl_repo_id(level), MAIN) in heads
    }
    base = heads.get((config.base_repo_id, MAIN)) if config.tiny_base else None
    return dataclasses.replace(
        published,
        base_commit=base or published.base_commit,
        adapter_commits={**published.adapter_commits, **commits},
    )


def _rerender(
    config: StudyConfig,
    run_dir: RunDir,
    plans: list[RepoPlan],
    published: cards.Published,
    *,
    scope: Scope,
    owned: dict[str, set[str]],
    options: PublishOptions,
) -> tuple[dict[str, cards.RenderedCard], cards.Published]:
    """Render the cards again with what publishing learnt (the collection's slug, new commits) and re-diff
    ``plans`` (those not applied yet) against the new files. Returns the cards and ``published``."""
    rendered, _, art = render_cards(config, run_dir, templates_dir=options.templates_dir, published=published)
    wanted = {spec.key: spec for spec in _specs(config, run_dir, rendered, art, scope)}
    for plan in plans:
        plan.spec.files = wanted[plan.spec.key].files
        if plan.branch_exists:  # a branch still to create adds every file anyway
            plan.diff(owned[plan.spec.key])
    return rendered, published


def _specs(
    config: StudyConfig,
    run_dir: RunDir,
    rendered: dict[str, cards.RenderedCard],
    art: cards.StudyArtifacts,
    scope: Scope,
) -> list[RepoSpec]:
    if scope.readmes_only:
        return readme_specs(config, rendered=rendered)
    return repo_specs(config, run_dir, rendered=rendered, artifacts=art, adapters=scope.adapters)


def _describe_dry_run(
    report: PublishReport,
    target: HubTarget,
    plans: list[RepoPlan],
    collection_plan: collections.CollectionPlan | None,
    *,
    create_pr: bool,
    say: Callable[[str], None],
) -> None:
    say(f"Dry run against {target.endpoint}: nothing will be pushed.")
    for plan in plans:
        url = branch_url(target, plan.spec)
        for line in plan.describe(url):
            say(line)
        new = not plan.exists or not plan.branch_exists
        status = "would create" if new else ("would change" if plan.changed else "unchanged")
        report.repos.append(
            RepoResult(plan.spec.repo_id, plan.spec.repo_type, url, status, plan.touched, branch=plan.spec.branch)
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
