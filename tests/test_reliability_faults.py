"""Network faults injected at the local hub, on every route a publish uses, with the real huggingface_hub client.

For each (route, fault) the publish completes without a rerun, except a 412 on a read (``NEEDS_RERUN``), which
stops it with one HubError line naming what failed; at the moment every fault fires, and after the run, each
repo's main head is either the head it had before or a complete new commit (every planned file present with the
right sha256); a rerun without faults reaches exactly the state a clean publish reaches (trees, file hashes,
collection), and a third run changes nothing.

Two scenarios: ``fresh`` publishes into an empty hub (repo and collection creation); ``update`` publishes a
changed study (new weights for level 1, edited card and note templates) over an earlier publish (paths-info,
changed-file uploads, note updates). Client back-off sleeps are recorded instead of slept, so the suite is fast
while the retry logic itself runs unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from fixtures_artifacts import write_fixture_study
from helpers import edited_templates, head_files, hub_state, repos
from hubtools import clients_for, isolated_hf_caches, publish_to
from huggingface_hub import CommitOperationAdd, HfApi

from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import load_config
from eval_artifacts.study.errors import HubError
from hub_tools.local_hub import running_hub
from hub_tools.publishing.commands import Scope

# route name -> (method, path regex, scenario that uses it)
ROUTES = {
    "whoami": ("GET", r"^/api/whoami-v2$", "update"),
    "repo-create": ("POST", r"^/api/repos/create$", "fresh"),
    "repo-info": ("GET", r"^/api/(models|datasets)/[^/]+/[^/]+$", "update"),
    "paths-info": ("POST", r"/paths-info/", "update"),
    "preupload": ("POST", r"/preupload/", "update"),
    "lfs-batch": ("POST", r"\.git/info/lfs/objects/batch$", "update"),
    "lfs-put": ("PUT", r"^/lfs-upload/", "update"),
    "lfs-verify": ("POST", r"^/lfs-verify/", "update"),
    "commit": ("POST", r"/commit/", "update"),
    "collection-create": ("POST", r"^/api/collections$", "fresh"),
    "collection-items": ("*", r"^/api/collections/.+/items", "update"),
}
# fault name -> FaultPlan.add options
FAULTS = {
    "500x2": {"status": 500, "times": 2},
    "503x2": {"status": 503, "times": 2},
    "429-retry-after": {"status": 429, "retry_after": 3, "times": 1},
    "drop": {"drop": True, "times": 1},
    "412": {"status": 412, "times": 1},
    "slow": {"delay": 0.25, "times": 2},
}
# Routes huggingface_hub sends through http_backoff (hub_protocol.md §2.5); publish retries the other reads
# itself (hub_client.reading) and re-sends a write once a read shows it did not land (hub_client.writing).
CLIENT_RETRIED = {"preupload", "lfs-batch", "lfs-put", "lfs-verify"}
# The Hub answers 412 only to a commit whose parent is stale: a write that gets one re-reads the branch and
# goes on, but a read that gets one has nothing to check, so it stops the publish and the rerun finishes.
NEEDS_RERUN = {("whoami", "412"), ("repo-info", "412"), ("paths-info", "412")}


# ---------------------------------------------------------------- the study and its two versions


def new_weights(run_dir: RunDir) -> None:
    """Level 1 retrained: other adapter bytes (same shapes), so the update uploads one new LFS file."""
    from safetensors.torch import load_file, save_file

    path = run_dir.adapter_dir(1) / "adapter_model.safetensors"
    tensors = {name: tensor + 0.25 for name, tensor in load_file(path).items()}
    save_file(tensors, str(path))


def relabel(run_dir: RunDir, endpoint: str) -> None:
    """publish/state.json keys a Hub by its URL; a copied hub listens on another port."""
    if not run_dir.publish_state.is_file():
        return
    state = json.loads(run_dir.publish_state.read_text())
    (hub,) = state["hubs"].values()
    state["hubs"] = {endpoint: hub}
    run_dir.publish_state.write_text(json.dumps(state))


def publish(config, run_dir, hub, **options):
    return publish_to(
        hub.endpoint,
        config,
        run_dir,
        token=hub.default_token,
        scope=Scope.ALL,
        echo=lambda line: None,
        **options,
    )


# ---------------------------------------------------------------- module setup: references, earlier publish


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The v1 study published once (the ``update`` starting point) and the clean v2 end states."""
    root = tmp_path_factory.mktemp("faults")
    config = load_config().with_overrides(run_dir=str(root / "run"), levels=[1, 2])
    v1 = write_fixture_study(root / "v1", config=config, n_problems=20)
    templates = edited_templates(root / "templates")
    with running_hub(root / "hub-v1") as hub, clients_for(hub), isolated_hf_caches(root / "cache"):
        publish(config, v1, hub)
        v1_state = hub_state(hub, config)
    world = {"root": root, "config": config, "templates": templates, "v1_state": v1_state}
    # clean v2 publishes, each from its scenario's starting point: the references a faulty run must reach
    for scenario in ("fresh", "update"):
        run_dir, hub_dir = start(world, scenario, root / f"ref-{scenario}")
        with running_hub(hub_dir) as hub, clients_for(hub), isolated_hf_caches(root / "cache"):
            relabel(run_dir, hub.endpoint)
            publish(config, run_dir, hub, templates_dir=templates)
            world[f"{scenario}_final"] = hub_state(hub, config)
    assert world["fresh_final"] == world["update_final"]  # both roads lead to the same study
    assert world["update_final"] != v1_state
    return world


def start(world: dict, scenario: str, dest: Path) -> tuple[RunDir, Path]:
    """A fresh copy of the scenario's starting run dir and hub storage under ``dest``."""
    root = world["root"]
    run_dir = RunDir(dest / "run")
    shutil.copytree(root / "v1", run_dir.root)
    hub_dir = dest / "hub"
    if scenario == "update":
        shutil.copytree(root / "hub-v1", hub_dir)
    else:
        run_dir.publish_state.unlink(missing_ok=True)
        shutil.rmtree(run_dir.cards_dir, ignore_errors=True)
    new_weights(run_dir)
    return run_dir, hub_dir


@pytest.fixture
def no_backoff(monkeypatch):
    """Retry sleeps (huggingface_hub's 1, 2, 4, 8 s and Retry-After + 1 s; publish's own) are recorded, not slept."""
    from huggingface_hub.utils import _http

    from hub_tools import hub_client

    slept: list[float] = []

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            slept.append(seconds)

    monkeypatch.setattr(_http, "time", Clock())
    monkeypatch.setattr(hub_client, "time", Clock())
    return slept


def watch_heads(hub, config, allowed: dict[str, list]) -> list[str]:
    """Check every repo head each time a fault fires; returns the list of violations it saw."""
    violations: list[str] = []
    take = hub.faults.take

    def take_and_check(method: str, path: str):
        fault = take(method, path)
        if fault is not None:
            for repo_type, repo_id in repos(config):
                files = head_files(hub, repo_type, repo_id)
                if files is not None and files not in allowed[repo_id]:
                    violations.append(f"{method} {path}: {repo_id} head is partial: {sorted(files)}")
        return fault

    hub.faults.take = take_and_check
    return violations


def commit_counts(hub, config) -> dict[str, int]:
    """Commits on each repo's main (0 for a repo not created yet): a recognised lost commit is not made twice."""
    return {
        repo_id: hub.commit_count(repo_type, repo_id) if hub.storage.get_repo(repo_type, repo_id) else 0
        for repo_type, repo_id in repos(config)
    }


# ---------------------------------------------------------------- the matrix


CASES = [(route, fault) for route in ROUTES for fault in FAULTS]


class _AnySha(str):
    """Equal to any sha256: the bare repo's .gitattributes, whatever the server puts in it."""

    def __eq__(self, other) -> bool:
        return isinstance(other, str) and len(other) == 64

    def __hash__(self) -> int:
        return 0


ANY_SHA = _AnySha("any")


@pytest.fixture(scope="module")
def outcomes(request):
    """Each case's outcome; the module ends with the figure docs/reliability.md quotes."""
    seen: dict[tuple[str, str], tuple[bool, int]] = {}  # (route, fault) -> (completed, faulty responses)
    yield seen
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and seen:
        survived = sum(completed for completed, _ in seen.values())
        responses = sum(hits for _, hits in seen.values())
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line(
                f"\nfault scenarios finished without a rerun: {survived} of {len(seen)} "
                f"({responses} faulty responses)"
            )


@pytest.mark.parametrize(("route", "fault"), CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_fault_then_rerun_converges(world, tmp_path, no_backoff, outcomes, route, fault):
    method, path, scenario = ROUTES[route]
    config, final = world["config"], world[f"{scenario}_final"]
    run_dir, hub_dir = start(world, scenario, tmp_path)
    with running_hub(hub_dir) as hub, clients_for(hub), isolated_hf_caches(tmp_path / "cache"):
        relabel(run_dir, hub.endpoint)
        before = hub_state(hub, config)
        # a head may only ever be: no repo, the bare repo just created, what it held before, or the full new one
        allowed = {
            repo_id: [before["repos"][repo_id], {".gitattributes": ANY_SHA}, final["repos"][repo_id]]
            for _, repo_id in repos(config)
        }
        commits_before = commit_counts(hub, config)
        violations = watch_heads(hub, config, allowed)
        rule = hub.faults.add(method, path, **FAULTS[fault])

        started = time.perf_counter()
        try:
            publish(config, run_dir, hub, templates_dir=world["templates"])
            outcome = "completed"
        except HubError as error:
            outcome = str(error)
        elapsed = time.perf_counter() - started
        outcomes[route, fault] = (outcome == "completed", rule.hits)
        assert rule.hits >= 1, f"the {route} fault never fired: the route regex is stale"
        assert violations == []
        hub.faults.clear()
        after = hub_state(hub, config)
        for repo_id, files in after["repos"].items():
            assert files in allowed[repo_id], f"{repo_id} head is partial after the run"

        assert (outcome == "completed") == ((route, fault) not in NEEDS_RERUN), outcome
        if outcome == "completed":
            assert after == final
            assert commit_counts(hub, config) == {r: max(n, 1) + 1 for r, n in commits_before.items()}
        else:
            # one line naming what failed (a repo, the collection, the token check, the unreachable hub)
            assert "\n" not in outcome and hub.default_token not in outcome
            names = [repo_id for _, repo_id in repos(config)] + ["collection", "token", hub.endpoint]
            assert any(name in outcome for name in names), outcome
        if fault == "429-retry-after":
            # Retry-After: 3 honoured (huggingface_hub sleeps N + 1 s, publish's reads and writes N s)
            assert (4 if route in CLIENT_RETRIED else 3) in no_backoff
        if fault == "slow":
            assert elapsed >= 0.25 * rule.hits

        publish(config, run_dir, hub, templates_dir=world["templates"])
        assert hub_state(hub, config) == final
        mark = len(hub.request_log)
        again = publish(config, run_dir, hub, templates_dir=world["templates"])
        assert again.commits == 0
        assert [e for e in hub.request_log[mark:] if e["method"] in ("PUT", "PATCH", "DELETE")] == []


WRITES = ["repo-create", "commit", "collection-create", "collection-items"]


@pytest.mark.parametrize("route", WRITES)
def test_a_write_that_fails_after_landing_is_recognised(world, tmp_path, no_backoff, route):
    """The Hub writes, then answers 500: publish reads that the write landed and does not make it twice."""
    method, path, scenario = ROUTES[route]
    config = world["config"]
    run_dir, hub_dir = start(world, scenario, tmp_path)
    with running_hub(hub_dir) as hub, clients_for(hub), isolated_hf_caches(tmp_path / "cache"):
        relabel(run_dir, hub.endpoint)
        commits_before = commit_counts(hub, config)
        rule = hub.faults.add(method, path, status=500, served=True)
        publish(config, run_dir, hub, templates_dir=world["templates"])
        assert rule.hits == 1
        assert hub_state(hub, config) == world[f"{scenario}_final"]
        assert commit_counts(hub, config) == {r: max(n, 1) + 1 for r, n in commits_before.items()}
        assert publish(config, run_dir, hub, templates_dir=world["templates"]).commits == 0


def test_a_real_concurrent_commit_on_every_repo_fails_cleanly_then_converges(world, tmp_path, monkeypatch):
    """Someone commits to each repo between our planning and our commit: 412, nothing of ours lands there."""
    from hub_tools.publishing import commands as publish_module

    config = world["config"]
    run_dir, hub_dir = start(world, "update", tmp_path)
    plan_repo = publish_module.plan_repo
    with running_hub(hub_dir) as hub, clients_for(hub), isolated_hf_caches(tmp_path / "cache"):
        relabel(run_dir, hub.endpoint)
        api = HfApi(endpoint=hub.endpoint, token=hub.default_token)
        for repo_type, repo_id in repos(config):

            def plan_then_collaborator(target, spec, _repo=repo_id, _type=repo_type, **options):
                plan = plan_repo(target, spec, **options)
                if spec.repo_id == _repo:
                    api.create_commit(
                        _repo,
                        [
                            CommitOperationAdd(
                                path_in_repo=f"notes-{_repo.split('/')[1]}.md", path_or_fileobj=b"x\n"
                            )
                        ],
                        commit_message="A collaborator's note",
                        repo_type=_type,
                    )
                return plan

            monkeypatch.setattr(publish_module, "plan_repo", plan_then_collaborator)
            with pytest.raises(HubError, match=f"{re.escape(repo_id)} changed on the Hub since planning"):
                publish(config, run_dir, hub, templates_dir=world["templates"])
            files = head_files(hub, repo_type, repo_id)
            assert f"notes-{repo_id.split('/')[1]}.md" in files
            assert {k: v for k, v in files.items() if not k.startswith("notes-")} in (
                world["v1_state"]["repos"][repo_id],
                world["update_final"]["repos"][repo_id],
            )
        monkeypatch.setattr(publish_module, "plan_repo", plan_repo)
        publish(config, run_dir, hub, templates_dir=world["templates"])
        state = hub_state(hub, config)
        for repo_id, files in state["repos"].items():
            mine = {k: v for k, v in files.items() if not k.startswith("notes-")}
            assert mine == world["update_final"]["repos"][repo_id]
            assert f"notes-{repo_id.split('/')[1]}.md" in files  # the collaborators' files are kept
        assert state["collections"] == world["update_final"]["collections"]
