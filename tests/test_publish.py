"""Publishing a fixture study to the local hub with the real huggingface_hub and datasets clients.

Every count below is taken at the server (its request log and its commit history), not from the publisher's
own report, so a publisher that lies about what it did fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from fixtures_artifacts import write_fixture_study
from hubtools import publish_to
from huggingface_hub import CommitOperationAdd, HfApi

from eval_artifacts.records import read_samples
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import load_config
from eval_artifacts.study.errors import ArtifactError, CardValidationError, HubError
from hub_tools.cards import published_from_state, render_collection_notes
from hub_tools.cli import main
from hub_tools.local_hub import configure_clients, running_hub
from hub_tools.publishing import apply as apply_module
from hub_tools.publishing import commands as publish_module
from hub_tools.publishing.commands import Scope

ADAPTER_FILES = {
    ".gitattributes",
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "training.json",
    "data_stats.json",
    "pareto.png",
    ".eval_results/tiny-cot-eval.yaml",
}
EVAL_CONFIGS = ["base", *(f"level_{n}" for n in range(1, 6)), *(f"prompt_l{n}" for n in range(1, 6)), "summary"]
# Requests that never change anything on the Hub (paths-info and validate-yaml are POSTs that only read).
READ_ONLY = re.compile(r"^(GET|HEAD) |^POST /api/(validate-yaml|(models|datasets)/.+/paths-info/.+)$")


def percent(n_correct: int, n_total: int) -> float:
    """An .eval_results value as a leaderboard shows it: the benchmark's scale (GSM8K: percent), 2 decimals."""
    return round(100 * n_correct / n_total, 2)


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The tiny config (public repos) with a complete fixture run dir, and no token in the environment."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    config = load_config().with_overrides(run_dir=str(tmp_path / "run"))
    run_dir = write_fixture_study(tmp_path / "run", config=config, n_problems=40)
    return config, run_dir


@pytest.fixture
def hub(tmp_path):
    with running_hub(tmp_path / "hub-data") as server:
        configure_clients(server.endpoint)
        yield server


def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.default_token)


def publish(config, run_dir, hub, **options):
    return publish_to(hub.endpoint, config, run_dir, token=hub.default_token, scope=Scope.ALL, **options)


def repos(config) -> list[tuple[str, str]]:
    """Every repo of the study in publishing (and collection) order: the tiny base, the levels, the eval dataset."""
    return (
        [("model", config.base_repo_id)]
        + [("model", config.adapter_repo_id(n)) for n in config.levels]
        + [("dataset", config.eval_repo_id)]
    )


def commit_requests(hub, since: int = 0) -> dict[str, int]:
    """POST .../commit/... requests per repo id, counted from the server's log."""
    counts: dict[str, int] = {}
    for entry in hub.request_log[since:]:
        match = re.match(r"^/api/(?:models|datasets)/([^/]+/[^/]+)/commit/", entry["path"])
        if entry["method"] == "POST" and match and entry["status"] == 200:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def writes(hub, since: int = 0) -> list[str]:
    lines = [f"{e['method']} {e['path']}" for e in hub.request_log[since:]]
    return [line for line in lines if not READ_ONLY.match(line)]


def tree(hub, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, str]:
    """path -> oid of every file at ``revision``."""
    files = api(hub).list_repo_tree(repo_id, repo_type=repo_type, recursive=True, revision=revision)
    return {f.path: f.blob_id for f in files if hasattr(f, "blob_id")}


def edited_templates(tmp_path: Path) -> Path:
    """A copy of the shipped templates with one more (number-free) paragraph in every card."""
    folder = tmp_path / "templates"
    shutil.copytree(Path(str(resources.files("cards_templates"))), folder)
    for name in ("adapter_card.md.j2", "eval_dataset_card.md.j2", "base_card.md.j2"):
        with (folder / name).open("a", encoding="utf-8") as handle:
            handle.write("\nReviewed by the study authors.\n")
    return folder


def test_full_publish_then_unchanged_republish(study, hub, tmp_path):
    config, run_dir = study
    report = publish(config, run_dir, hub)

    # one commit per repo, counted at the server; the repo history is the initial commit plus ours
    assert commit_requests(hub) == {repo_id: 1 for _, repo_id in repos(config)}
    for repo_type, repo_id in repos(config):
        assert hub.commit_count(repo_type, repo_id) == 2
        assert api(hub).repo_info(repo_id, repo_type=repo_type).private is False  # tiny.yaml says public
    assert report.commits == 7

    for level in config.levels:
        repo_id = config.adapter_repo_id(level)
        assert set(tree(hub, "model", repo_id)) == ADAPTER_FILES
        metrics = json.loads(run_dir.metrics(f"level_{level}").read_text())
        results = api(hub).model_info(repo_id).card_data.eval_results
        assert [r.metric_value for r in results if r.metric_type == "accuracy"] == [metrics["accuracy"]]
        weights = api(hub).hf_hub_download(repo_id, "adapter_model.safetensors", cache_dir=tmp_path / "dl")
        assert (
            Path(weights).read_bytes()
            == (run_dir.adapter_dir(level) / "adapter_model.safetensors").read_bytes()
        )
        card = api(hub).hf_hub_download(repo_id, "README.md", cache_dir=tmp_path / "dl")
        assert Path(card).read_text() == run_dir.card(repo_id.split("/")[1]).read_text()

    import datasets

    assert datasets.get_dataset_config_names(config.eval_repo_id) == EVAL_CONFIGS
    loaded = datasets.load_dataset(config.eval_repo_id, "level_4", cache_dir=str(tmp_path / "ds"))
    rows = [json.loads(line) for line in run_dir.samples("level_4").read_text().splitlines()]
    assert list(loaded) == ["test"] and loaded["test"].to_list() == rows

    slug = json.loads(run_dir.publish_state.read_text())["collection_slug"]
    collection = api(hub).get_collection(slug)
    assert collection.title == config.hub.collection_title
    assert [(i.item_type, i.item_id) for i in collection.items] == [
        (t if t == "dataset" else "model", r) for t, r in repos(config)
    ]
    notes = render_collection_notes(config, run_dir)
    assert [i.note for i in collection.items] == [notes[r] for _, r in repos(config)]
    assert report.collection_url == f"{hub.endpoint}/collections/{slug}"
    # the cards link the collection itself from their first commit
    assert f"collections/{slug}" in run_dir.card(config.adapter_repo_id(4).split("/")[1]).read_text()

    state = json.loads(run_dir.publish_state.read_text())["hubs"][hub.endpoint]
    for repo_type, repo_id in repos(config):
        assert state["repos"][repo_id]["commit"] == api(hub).repo_info(repo_id, repo_type=repo_type).sha
    # the token is never written anywhere, nor printed
    token = hub.default_token.encode()
    assert not [p for p in run_dir.root.rglob("*") if p.is_file() and token in p.read_bytes()]
    assert hub.default_token not in report.text()

    # unchanged republish: no commit, no upload, no write of any kind
    mark = len(hub.request_log)
    again = publish(config, run_dir, hub)
    assert again.commits == 0 and commit_requests(hub, mark) == {}
    assert writes(hub, mark) == []
    assert sum(e["bytes_in"] for e in hub.request_log[mark:] if e["method"] == "PUT") == 0
    assert all(r.status == "unchanged" for r in again.repos)


def test_one_run_dir_publishes_to_two_namespaces_of_one_hub(study, tmp_path):
    """State is kept per (Hub, namespace): each namespace gets its own repos and collection, and converges."""
    config, run_dir = study
    lab = config.with_overrides(**{"hub.namespace": "cot-lab"})
    with running_hub(tmp_path / "hub-data", orgs={"cot-lab": [config.hub.namespace]}) as hub:
        configure_clients(hub.endpoint)
        assert publish(config, run_dir, hub).commits == len(repos(config))
        assert publish(lab, run_dir, hub).commits == len(repos(lab))
        state = json.loads(run_dir.publish_state.read_text())["hubs"][hub.endpoint]
        slugs = {ns: entry["slug"] for ns, entry in state["collections"].items()}
        assert set(slugs) == {"cot-compress", "cot-lab"} and slugs["cot-lab"].startswith("cot-lab/")
        for study_config in (config, lab):
            collection = api(hub).get_collection(slugs[study_config.hub.namespace])
            assert [i.item_id for i in collection.items] == [r for _, r in repos(study_config)]
            for repo_type, repo_id in repos(study_config):
                assert hub.commit_count(repo_type, repo_id) == 2
                readme = api(hub).hf_hub_download(
                    repo_id, "README.md", repo_type=repo_type, cache_dir=tmp_path / "dl"
                )
                assert f"collections/{slugs[study_config.hub.namespace]}" in Path(readme).read_text()
        for study_config in (config, lab):  # render-cards links the collection of the config's namespace
            on_hub = study_config.with_overrides(**{"hub.endpoint": hub.endpoint})
            recorded = published_from_state(on_hub, run_dir)
            assert (recorded.hub_url, recorded.collection_slug) == (hub.endpoint, slugs[study_config.hub.namespace])
        # each converges on its own: a republish to either namespace writes nothing
        for study_config in (config, lab, config):
            mark = len(hub.request_log)
            assert publish(study_config, run_dir, hub).commits == 0
            assert commit_requests(hub, mark) == {}
        assert len(list(api(hub).list_collections(owner="cot-lab"))) == 1
        assert len(list(api(hub).list_collections(owner="cot-compress"))) == 1


def test_a_state_file_with_one_collection_per_hub_is_still_read(study, hub):
    """publish/state.json written before namespaces (``hubs.<hub>.collection``): the rerun finds that collection."""
    config, run_dir = study
    publish(config, run_dir, hub)
    state = json.loads(run_dir.publish_state.read_text())
    entry = state["hubs"][hub.endpoint]
    entry["collection"] = entry.pop("collections")[config.hub.namespace]
    run_dir.publish_state.write_text(json.dumps(state))
    api(hub).update_collection_metadata(entry["collection"]["slug"], title="Renamed by hand")
    publish(config, run_dir, hub)  # the cards link the retitled collection's new slug
    (collection,) = api(hub).list_collections(owner=config.hub.namespace)
    assert collection.slug.endswith(entry["collection"]["slug"].rsplit("-", 1)[1])  # found by slug, retitled
    assert collection.title == config.hub.collection_title
    assert json.loads(run_dir.publish_state.read_text())["hubs"][hub.endpoint]["collections"] == {
        config.hub.namespace: {"slug": collection.slug, "title": collection.title}
    }
    assert publish(config, run_dir, hub).commits == 0


def test_dry_run_prints_the_plan_and_writes_nothing(study, hub, tmp_path):
    config, run_dir = study
    lines: list[str] = []
    report = publish(config, run_dir, hub, dry_run=True, echo=lines.append)
    assert writes(hub) == []
    assert not api(hub).repo_exists(config.adapter_repo_id(1))
    size = (run_dir.adapter_dir(1) / "adapter_model.safetensors").stat().st_size
    assert f"  + adapter_model.safetensors ({size / 1024:.1f} KB)" in lines
    assert any(line.startswith(f'collection "{config.hub.collection_title}": create') for line in lines)
    assert [r.status for r in report.repos] == ["would create"] * 7
    assert lines[-1] == "7 of 7 repo(s) would get a commit."

    publish(config, run_dir, hub, echo=lambda line: None)
    mark = len(hub.request_log)
    lines.clear()
    publish(config, run_dir, hub, dry_run=True, echo=lines.append, templates_dir=edited_templates(tmp_path))
    assert writes(hub, mark) == []
    assert "  ~ README.md" in "\n".join(lines)
    assert "    +Reviewed by the study authors." in lines
    assert lines.count("    +Reviewed by the study authors.") == 7
    assert not any(line.startswith("  + ") or line.startswith("  - ") for line in lines)


def test_changed_template_regenerates_readmes_only(study, hub, tmp_path):
    config, run_dir = study
    publish(config, run_dir, hub)
    before = {repo_id: tree(hub, t, repo_id) for t, repo_id in repos(config)}
    slug = json.loads(run_dir.publish_state.read_text())["collection_slug"]
    notes_before = [i.note for i in api(hub).get_collection(slug).items]

    mark = len(hub.request_log)
    report = publish_to(
        hub.endpoint,
        config,
        run_dir,
        token=hub.default_token,
        scope=Scope.CARDS,
        templates_dir=edited_templates(tmp_path),
    )
    assert commit_requests(hub, mark) == {repo_id: 1 for _, repo_id in repos(config)}
    assert report.commits == 7
    assert not [e for e in hub.request_log[mark:] if e["method"] == "PUT"]  # no weight (LFS) bytes
    for repo_type, repo_id in repos(config):
        after = tree(hub, repo_type, repo_id)
        changed = {p for p in after if after[p] != before[repo_id].get(p)} | (
            set(before[repo_id]) - set(after)
        )
        assert changed == {"README.md"}
        readme = api(hub).hf_hub_download(
            repo_id, "README.md", repo_type=repo_type, cache_dir=tmp_path / "dl"
        )
        assert "Reviewed by the study authors." in Path(readme).read_text()
    assert [i.note for i in api(hub).get_collection(slug).items] == notes_before

    mark = len(hub.request_log)
    publish_to(
        hub.endpoint,
        config,
        run_dir,
        token=hub.default_token,
        scope=Scope.CARDS,
        templates_dir=edited_templates(tmp_path / "x"),
    )
    assert writes(hub, mark) == []


def test_regenerate_cards_from_hub_rebuilds_the_same_cards(study, hub, tmp_path):
    config, run_dir = study
    publish(config, run_dir, hub)
    fresh = RunDir(tmp_path / "fresh")
    mark = len(hub.request_log)
    report = publish_to(
        hub.endpoint, config, fresh, token=hub.default_token, scope=Scope.CARDS, from_hub=True
    )
    for model in config.model_keys:
        assert fresh.samples(model).read_text() == run_dir.samples(model).read_text()
        assert json.loads(fresh.metrics(model).read_text()) == json.loads(run_dir.metrics(model).read_text())
    for _, repo_id in repos(config):
        name = repo_id.split("/")[1]
        assert fresh.card(name).read_text() == run_dir.card(name).read_text()
    assert report.commits == 0 and writes(hub, mark) == []

    with pytest.raises(Exception, match="already holds eval results"):
        publish_to(hub.endpoint, config, run_dir, token=hub.default_token, scope=Scope.CARDS, from_hub=True)


def test_create_pr_twice_reuses_one_pr_per_repo(study, hub, tmp_path):
    config, run_dir = study
    first = publish(config, run_dir, hub, create_pr=True)
    assert [r.status for r in first.repos] == ["pull request"] * 7
    for repo_type, repo_id in repos(config):
        refs = api(hub).list_repo_refs(repo_id, repo_type=repo_type, include_pull_requests=True)
        assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
        assert set(tree(hub, repo_type, repo_id)) == {".gitattributes"}  # main untouched
    assert not list(api(hub).list_collections(owner=config.hub.namespace))

    mark = len(hub.request_log)
    second = publish(config, run_dir, hub, create_pr=True, templates_dir=edited_templates(tmp_path))
    assert commit_requests(hub, mark) == {repo_id: 1 for _, repo_id in repos(config)}
    assert [r.pr_url for r in second.repos] == [r.pr_url for r in first.repos]
    for repo_type, repo_id in repos(config):
        refs = api(hub).list_repo_refs(repo_id, repo_type=repo_type, include_pull_requests=True)
        assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
        assert hub.commit_count(repo_type, repo_id, "refs/pr/1") == 3
        changed = tree(hub, repo_type, repo_id, "refs/pr/1")
        assert (
            "README.md" in changed
            and "Reviewed"
            in Path(
                api(hub).hf_hub_download(
                    repo_id, "README.md", repo_type=repo_type, revision="refs/pr/1", cache_dir=tmp_path / "dl"
                )
            ).read_text()
        )

    mark = len(hub.request_log)
    publish(config, run_dir, hub, create_pr=True, templates_dir=edited_templates(tmp_path / "x"))
    assert writes(hub, mark) == []


@pytest.mark.parametrize("case", ["missing", "bad", "read-only", "other namespace"])
def test_token_problems_stop_before_any_write(study, tmp_path, case):
    config, run_dir = study
    users = {"cot-compress": "hf_writer_token", "stranger": "hf_stranger_token", "reader": "hf_reader_token"}
    token = {"missing": None, "bad": "hf_not_a_real_token", "read-only": "hf_reader_token"}.get(
        case, "hf_stranger_token"
    )
    with running_hub(tmp_path / "hub-data", users=users, read_only_tokens={"hf_reader_token"}) as server:
        configure_clients(server.endpoint)
        with pytest.raises(HubError) as raised:
            publish_to(server.endpoint, config, run_dir, token=token, scope=Scope.ALL)
        assert writes(server) == []
    message = str(raised.value)
    assert "\n" not in message and (token or "hf_") not in message
    expected = {
        "missing": "no Hugging Face token",
        "bad": "was rejected",
        "read-only": "is read-only",
        "other namespace": "cannot write to namespace 'cot-compress'",
    }[case]
    assert expected in message
    assert not run_dir.publish_state.exists()


def test_cli_bad_token_is_one_line_exit_2(study, tmp_path):
    config, run_dir = study
    with running_hub(tmp_path / "hub-data") as server:
        result = CliRunner().invoke(
            main,
            ["publish", "--run-dir", str(run_dir.root), "--endpoint", server.endpoint],
            env={"HF_TOKEN": "hf_secret_but_wrong"},
        )
        assert writes(server) == []
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "error: the Hugging Face token was rejected"
    )
    assert "hf_secret_but_wrong" not in result.output + result.stderr


def test_concurrent_change_fails_cleanly_and_a_rerun_converges(study, hub, monkeypatch):
    config, run_dir = study
    target_repo = config.adapter_repo_id(3)
    plan_repo = publish_module.plan_repo

    def plan_then_someone_commits(target, spec, **options):
        plan = plan_repo(target, spec, **options)
        if spec.repo_id == target_repo:  # a collaborator pushes between our planning and our commit
            api(hub).create_commit(
                target_repo,
                [CommitOperationAdd(path_in_repo="NOTES.md", path_or_fileobj=b"mine\n")],
                commit_message="A collaborator's note",
            )
        return plan

    publish(config, run_dir, hub)
    (run_dir.adapter_dir(3) / "adapter_config.json").write_text('{"changed": true}\n')
    changed = {"changed": True, "base_model_name_or_path": config.base_repo_id}
    monkeypatch.setattr(publish_module, "plan_repo", plan_then_someone_commits)
    with pytest.raises(HubError, match="changed on the Hub since planning"):
        publish(config, run_dir, hub)
    monkeypatch.setattr(publish_module, "plan_repo", plan_repo)
    files = tree(hub, "model", target_repo)
    assert "NOTES.md" in files  # nothing of ours landed, the collaborator's commit is intact
    raw = api(hub).hf_hub_download(target_repo, "adapter_config.json", force_download=True)
    assert not json.loads(Path(raw).read_text()).get("changed")

    publish(config, run_dir, hub)
    raw = api(hub).hf_hub_download(target_repo, "adapter_config.json", force_download=True)
    assert changed.items() <= json.loads(Path(raw).read_text()).items()  # rewritten to name the Hub base
    assert "NOTES.md" in tree(hub, "model", target_repo)  # never delete files we did not push


def test_existing_visibility_is_kept_with_a_warning(study, hub):
    config, run_dir = study
    config = config.with_overrides(**{"hub.private": True})
    api(hub).create_repo(config.adapter_repo_id(2), private=False)
    report = publish(config, run_dir, hub)
    assert api(hub).repo_info(config.adapter_repo_id(2)).private is False
    assert api(hub).repo_info(config.adapter_repo_id(1)).private is True
    assert api(hub).repo_info(config.eval_repo_id, repo_type="dataset").private is True
    assert any(config.adapter_repo_id(2) in w and "left as it is" in w for w in report.warnings)


def test_push_eval_pushes_only_the_dataset(study, hub, tmp_path):
    config, run_dir = study
    report = publish_to(hub.endpoint, config, run_dir, token=hub.default_token, scope=Scope.EVAL)
    assert commit_requests(hub) == {config.eval_repo_id: 1}
    assert [r.repo_id for r in report.repos] == [config.eval_repo_id]
    assert not api(hub).repo_exists(config.adapter_repo_id(1))
    import datasets

    summary = datasets.load_dataset(config.eval_repo_id, "summary", cache_dir=str(tmp_path / "ds"))["test"]
    assert summary["model"] == config.model_keys
    assert summary["n_correct"] == [
        json.loads(run_dir.metrics(m).read_text())["n_correct"] for m in config.model_keys
    ]


def test_cli_publish_to_the_embedded_hub(study, tmp_path):
    from huggingface_hub import constants

    config, run_dir = study
    before = (os.environ.get("HF_ENDPOINT"), constants.ENDPOINT)
    runner = CliRunner()
    first = runner.invoke(main, ["publish", "--run-dir", str(run_dir.root), "--endpoint", "local"])
    # The clients point back where they pointed: a later download must not go to the stopped hub.
    assert (os.environ.get("HF_ENDPOINT"), constants.ENDPOINT) == before
    assert first.exit_code == 0, first.output
    assert "cot-compress/tiny-cot-l4: created" in first.output
    assert f"cot-compress hub serve --data {run_dir.hub_data_dir}" in first.output
    assert re.search(r"http://127\.0\.0\.1:\d+/collections/cot-compress/", first.output)
    second = runner.invoke(main, ["publish", "--run-dir", str(run_dir.root), "--endpoint", "local"])
    assert second.exit_code == 0, second.output
    assert second.output.count(": unchanged") == 8  # seven repos and the collection
    dry = runner.invoke(main, ["publish", "--run-dir", str(run_dir.root), "--endpoint", "local", "--dry-run"])
    assert dry.exit_code == 0 and "0 of 7 repo(s) would get a commit." in dry.output


@pytest.mark.parametrize("case", ["missing adapter", "stale metrics", "bad card"])
def test_preflight_failures_write_nothing(study, hub, tmp_path, case):
    config, run_dir = study
    options = {}
    if case == "missing adapter":
        (run_dir.adapter_dir(3) / "adapter_model.safetensors").unlink()
        expected = (ArtifactError, "level_3 has no adapter_model.safetensors")
    elif case == "stale metrics":
        metrics = json.loads(run_dir.metrics("level_2").read_text())
        metrics["accuracy"] += 0.01
        run_dir.metrics("level_2").write_text(json.dumps(metrics))
        expected = (ArtifactError, "disagree with their samples at field 'accuracy'")
    else:
        options["templates_dir"] = edited_templates(tmp_path)
        with (options["templates_dir"] / "adapter_card.md.j2").open("a") as handle:
            handle.write("\nIt reaches 0.999 accuracy.\n")  # a number no artifact holds
        expected = (CardValidationError, "number 0.999")
    with pytest.raises(expected[0], match=re.escape(expected[1])) as raised:
        publish(config, run_dir, hub, **options)
    assert "\n" not in str(raised.value)
    assert writes(hub) == []
    assert not run_dir.publish_state.exists()


def test_dropped_level_deletes_only_what_the_study_pushed(study, hub):
    config, run_dir = study
    publish(config, run_dir, hub)
    slug = json.loads(run_dir.publish_state.read_text())["collection_slug"]
    # a user's own file in the eval repo and a user's own item in the collection, put first
    api(hub).create_commit(
        config.eval_repo_id,
        [CommitOperationAdd(path_in_repo="NOTES.md", path_or_fileobj=b"mine\n")],
        commit_message="notes",
        repo_type="dataset",
    )
    api(hub).create_repo("cot-compress/my-other-model")
    api(hub).add_collection_item(slug, "cot-compress/my-other-model", "model", note="mine")
    user_item = api(hub).get_collection(slug).items[-1]
    api(hub).update_collection_item(slug, user_item.item_object_id, position=0)

    fewer = config.with_overrides(levels=[1, 2, 4])
    mark = len(hub.request_log)
    publish(fewer, run_dir, hub)
    files = tree(hub, "dataset", fewer.eval_repo_id)
    assert (
        "level_5/test-00000-of-00001.parquet" not in files
        and "level_3/test-00000-of-00001.parquet" not in files
    )
    assert "level_4/test-00000-of-00001.parquet" in files and "NOTES.md" in files
    assert set(commit_requests(hub, mark)) == {
        fewer.base_repo_id,  # its card lists the adapters
        *(fewer.adapter_repo_id(n) for n in (1, 2, 4)),
        fewer.eval_repo_id,
    }
    items = [(i.item_type, i.item_id) for i in api(hub).get_collection(slug).items]
    assert items == [
        ("model", fewer.base_repo_id),
        ("model", fewer.adapter_repo_id(1)),
        ("model", fewer.adapter_repo_id(2)),
        ("model", fewer.adapter_repo_id(4)),
        ("dataset", fewer.eval_repo_id),
        ("model", "cot-compress/my-other-model"),
    ]
    assert api(hub).repo_exists(config.adapter_repo_id(5))  # repos are never deleted


def test_a_failed_push_stops_and_a_rerun_converges(study, hub, monkeypatch):
    from hub_tools import hub_client

    config, run_dir = study
    monkeypatch.setattr(hub_client, "time", SimpleNamespace(sleep=lambda seconds: None))
    hub.faults.add("POST", r"/tiny-cot-l3/commit/", status=500, times=hub_client.WRITE_ATTEMPTS)
    with pytest.raises(HubError, match=r"pushing cot-compress/tiny-cot-l3 failed: HTTP 500") as raised:
        publish(config, run_dir, hub)
    assert "\n" not in str(raised.value)
    assert set(commit_requests(hub)) == {config.base_repo_id, config.adapter_repo_id(1), config.adapter_repo_id(2)}

    mark = len(hub.request_log)
    report = publish(config, run_dir, hub)
    assert set(commit_requests(hub, mark)) == {
        *(config.adapter_repo_id(n) for n in (3, 4, 5)),
        config.eval_repo_id,
    }
    assert [r.status for r in report.repos] == ["unchanged"] * 3 + ["committed"] + ["created"] * 3
    slug = json.loads(run_dir.publish_state.read_text())["collection_slug"]
    assert [i.item_id for i in api(hub).get_collection(slug).items] == [r for _, r in repos(config)]
    assert publish(config, run_dir, hub).commits == 0


def test_other_training_seeds_go_to_branches_one_commit_each_and_converge(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = load_config().with_overrides(
        run_dir=str(tmp_path / "run"), levels=[2, 4], **{"training.seeds": [42, 43]}
    )
    run_dir = write_fixture_study(tmp_path / "run", config=config, n_problems=40)
    real_crash = apply_module.maybe_crash

    def interrupted(point, detail=None, **kwargs):  # killed once L4's branch exists, before its commit
        if (point, detail) == ("publish.branch_created", "tiny-cot-l4"):
            raise KeyboardInterrupt
        real_crash(point, detail, **kwargs)

    monkeypatch.setattr(apply_module, "maybe_crash", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publish(config, run_dir, hub)
    monkeypatch.setattr(apply_module, "maybe_crash", real_crash)
    lines: list[str] = []
    dry = publish(config, run_dir, hub, dry_run=True, echo=lines.append)
    assert [(r.repo_id, r.branch, r.status) for r in dry.repos if r.status != "unchanged"] == [
        ("cot-compress/tiny-cot-l4", "seed-43", "would change"),
        ("cot-compress/tiny-cot-eval", "main", "would create"),
    ]
    report = publish(config, run_dir, hub)
    assert report.commits == 2

    for level in (2, 4):
        repo_id = config.adapter_repo_id(level)
        refs = api(hub).list_repo_refs(repo_id)
        assert sorted(branch.name for branch in refs.branches) == ["main", "seed-43"]
        # the initial commit, main's, then the branch's one commit (after the interruption too)
        assert hub.commit_count("model", repo_id, "seed-43") == 3 and hub.commit_count("model", repo_id) == 2
        for branch, model in (("main", f"level_{level}"), ("seed-43", f"level_{level}_seed43")):
            weights = api(hub).hf_hub_download(
                repo_id, "adapter_model.safetensors", revision=branch, cache_dir=tmp_path / "dl"
            )
            assert Path(weights).read_bytes() == (run_dir.adapter_dir(model) / "adapter_model.safetensors").read_bytes()
            trained = api(hub).hf_hub_download(repo_id, "training.json", revision=branch, cache_dir=tmp_path / "dl")
            assert json.loads(Path(trained).read_text())["seed"] == (42 if branch == "main" else 43)
            card = api(hub).hf_hub_download(repo_id, "README.md", revision=branch, cache_dir=tmp_path / "dl")
            assert "- `seed-43`: training seed 43, accuracy" in Path(card).read_text()

    mark = len(hub.request_log)
    again = publish(config, run_dir, hub)
    assert again.commits == 0 and writes(hub, mark) == []
    # the tiny base, two branches of each of the two adapter repos, the eval dataset
    assert len(again.repos) == 6 and all(r.status == "unchanged" for r in again.repos)
    # the eval dataset card names the commit of every adapter that produced its rows, seed branches included
    text = Path(
        api(hub).hf_hub_download(config.eval_repo_id, "README.md", repo_type="dataset", cache_dir=tmp_path / "dl")
    ).read_text()
    for level in (2, 4):
        branch_head = api(hub).repo_info(config.adapter_repo_id(level), revision="seed-43").sha
        assert f"`{config.adapter_repo_id(level)}@{branch_head}`" in text


def test_rl_adapters_get_their_own_repos_after_their_sft_siblings_and_converge(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = load_config(Path(__file__).parents[1] / "configs" / "tiny-rl.yaml").with_overrides(
        run_dir=str(tmp_path / "run"), levels=[2, 3, 4]
    )
    assert config.rl.levels == [3, 4]
    run_dir = write_fixture_study(tmp_path / "run", config=config, n_problems=40)
    report = publish(config, run_dir, hub)
    order = [config.base_repo_id, config.adapter_repo_id(2)]
    order += [config.adapter_repo_id(3), "cot-compress/tiny-cot-l3-rl", config.adapter_repo_id(4), "cot-compress/tiny-cot-l4-rl"]
    assert [r.repo_id for r in report.repos] == [*order, config.eval_repo_id]
    slug = json.loads(run_dir.publish_state.read_text())["collection_slug"]
    assert [i.item_id for i in api(hub).get_collection(slug).items] == [*order, config.eval_repo_id]

    for level in (3, 4):
        repo_id = config.rl_repo_id(level)
        assert set(tree(hub, "model", repo_id)) == ADAPTER_FILES

        def download(name: str, repo_id: str = repo_id) -> Path:
            return Path(api(hub).hf_hub_download(repo_id, name, cache_dir=tmp_path / "dl"))

        rl_dir = run_dir.rl_adapter_dir(level)
        assert download("adapter_model.safetensors").read_bytes() == (rl_dir / "adapter_model.safetensors").read_bytes()
        assert download("training.json").read_bytes() == run_dir.rl_training_json(level).read_bytes()
        adapter_config = json.loads(download("adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == config.base_repo_id
        assert adapter_config["revision"] == api(hub).repo_info(config.base_repo_id).sha
        metrics = json.loads(run_dir.metrics(f"rl_l{level}").read_text())
        info = api(hub).model_info(repo_id, expand=["evalResults"])
        assert [entry.value for entry in info.eval_results or []] == [percent(metrics["n_correct"], metrics["n_total"])]
        for card_repo in (repo_id, config.adapter_repo_id(level)):
            card = api(hub).hf_hub_download(card_repo, "README.md", cache_dir=tmp_path / "dl")
            assert f"differs from SFT's by {metrics['vs_sft']['delta']:+.3f}" in Path(card).read_text()
    # the eval dataset card names the commit of the RL adapter that produced rl_l4's rows
    text = Path(
        api(hub).hf_hub_download(config.eval_repo_id, "README.md", repo_type="dataset", cache_dir=tmp_path / "dl")
    ).read_text()
    assert f"`cot-compress/tiny-cot-l4-rl@{api(hub).repo_info('cot-compress/tiny-cot-l4-rl').sha}`" in text

    mark = len(hub.request_log)
    again = publish(config, run_dir, hub)
    assert again.commits == 0 and writes(hub, mark) == []
    # The Hub alone rebuilds the same cards, the RL ones (and their training.json) included.
    fresh = RunDir(tmp_path / "fresh")
    publish_to(hub.endpoint, config, fresh, token=hub.default_token, scope=Scope.CARDS, from_hub=True)
    assert json.loads(fresh.metrics("rl_l4").read_text()) == json.loads(run_dir.metrics("rl_l4").read_text())
    for name in ("tiny-cot-l4", "tiny-cot-l4-rl"):
        assert fresh.card(name).read_text() == run_dir.card(name).read_text()
    assert writes(hub, mark) == []


# ---------------------------------------------------------------- what the Hub shows is true (issue 17)


def _card_links(text: str) -> list[str]:
    from markdown_it import MarkdownIt

    links = []
    for token in MarkdownIt("commonmark").enable(["table"]).parse(text):
        for child in token.children or []:
            if child.type == "link_open":
                links.append(child.attrs["href"])
            elif child.type == "image":
                links.append(child.attrs["src"])
    return links


def test_published_metadata_names_what_the_study_is(study, hub, tmp_path):
    """Synthetic problems: no metadata names GSM8K; the adapters name and pin the published tiny base; the eval
    dataset names the adapter commits that produced it, rows sorted by id; every card link answers 200."""
    import urllib.request

    import yaml
    from huggingface_hub import ModelCard, parse_eval_result_entries

    config, run_dir = study
    publish(config, run_dir, hub)
    base_commit = api(hub).repo_info(config.base_repo_id).sha
    slug = json.loads(run_dir.publish_state.read_text())["collection_slug"]
    assert api(hub).get_collection(slug).items[0].item_id == config.base_repo_id  # the base first
    for repo_type, repo_id in repos(config):
        readme = api(hub).hf_hub_download(repo_id, "README.md", repo_type=repo_type, cache_dir=tmp_path / "dl")
        text = Path(readme).read_text()
        front = text.split("---\n")[1]
        assert "gsm8k" not in front.lower(), f"{repo_id}'s metadata names GSM8K"
        for link in _card_links(text):
            # Absolute links point at the hub published to; a relative one (the plot) resolves in its repo.
            assert link.startswith(hub.endpoint) or "://" not in link, link
            prefix = "datasets/" if repo_type == "dataset" else ""
            url = link if "://" in link else f"{hub.endpoint}/{prefix}{repo_id}/resolve/main/{link}"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
            assert opener.open(url).status == 200, url
        assert f"collections/{slug}" in text
    for level in config.levels:
        repo_id = config.adapter_repo_id(level)
        card = ModelCard(Path(api(hub).hf_hub_download(repo_id, "README.md", cache_dir=tmp_path / "dl")).read_text())
        assert card.data.base_model == "cot-compress/tiny-cot-base" and not card.data.datasets
        assert f"revision `{base_commit}`" in card.text
        adapter_config = json.loads(
            Path(api(hub).hf_hub_download(repo_id, "adapter_config.json", cache_dir=tmp_path / "dl")).read_text()
        )
        assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == (
            config.base_repo_id,
            base_commit,
        )
        # The eval-results file, read back with huggingface_hub's own parser.
        path = api(hub).hf_hub_download(repo_id, ".eval_results/tiny-cot-eval.yaml", cache_dir=tmp_path / "dl")
        [entry] = parse_eval_result_entries(yaml.safe_load(Path(path).read_text()))
        metrics = json.loads(run_dir.metrics(f"level_{level}").read_text())
        assert (entry.dataset_id, entry.task_id, entry.value) == (
            config.eval_repo_id,
            f"level_{level}",
            percent(metrics["n_correct"], metrics["n_total"]),
        )
        assert "value = accuracy in percent" in entry.notes
        assert entry.source_url == f"{hub.endpoint}/datasets/{config.eval_repo_id}"
        assert f"Level {level}" in entry.notes and "training seed 42" in entry.notes

    eval_card = Path(
        api(hub).hf_hub_download(config.eval_repo_id, "README.md", repo_type="dataset", cache_dir=tmp_path / "dl")
    ).read_text()
    for level in config.levels:
        commit = api(hub).repo_info(config.adapter_repo_id(level)).sha
        assert f"`{config.adapter_repo_id(level)}@{commit}`" in eval_card
    assert f"`{config.base_repo_id}@{base_commit}`" in eval_card
    import datasets

    ids = datasets.load_dataset(config.eval_repo_id, "level_2", split="test", cache_dir=str(tmp_path / "ds"))["id"]
    assert ids == sorted(ids)
    # Once more: the pinned commits are the ones on the Hub, so nothing changes.
    assert publish(config, run_dir, hub).commits == 0


def test_eval_dataset_card_snippet_pairs_an_adapter_with_the_stock_model(study, hub, tmp_path, capsys):
    """The dataset card's code, run as a reader would against the Hub, prints what the samples say."""
    config, run_dir = study
    publish(config, run_dir, hub)
    card = Path(
        api(hub).hf_hub_download(config.eval_repo_id, "README.md", repo_type="dataset", cache_dir=tmp_path / "dl")
    ).read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    capsys.readouterr()  # what publishing printed
    exec(compile(snippet, "eval-dataset-card", "exec"), {})  # noqa: S102 - the card's own code is under test
    adapter = f"level_{config.levels[-1]}"
    base = {(r["id"], r["seed"], r["sample"]): r["correct"] for r in read_samples(run_dir.samples("base"))}
    level = {(r["id"], r["seed"], r["sample"]): r["correct"] for r in read_samples(run_dir.samples(adapter))}
    only_adapter = sum(level[key] and not base[key] for key in base)
    assert f"load_dataset(repo, '{adapter}'" in snippet
    assert capsys.readouterr().out == f"{len(base)} paired answers; {only_adapter} right only with the adapter\n"


def test_model_info_eval_results_equal_metrics(study, hub):
    config, run_dir = study
    publish(config, run_dir, hub)
    for level in config.levels:
        info = api(hub).model_info(config.adapter_repo_id(level), expand=["evalResults"])
        metrics = json.loads(run_dir.metrics(f"level_{level}").read_text())
        assert [entry.value for entry in info.eval_results or []] == [percent(metrics["n_correct"], metrics["n_total"])]


def test_study_lock_records_the_commits_the_stages_read(tmp_path):
    """study.lock.json pins what training and prepare-data resolved: the base's Hub id and commit, the dataset's."""
    from fixtures_artifacts import FIXTURE_BASE_SHA

    from eval_artifacts.rundir import write_json
    from hub_tools.pipeline import write_lock

    qwen = load_config(Path(__file__).parents[1] / "configs" / "qwen3-4b-gsm8k.yaml").with_overrides(
        run_dir=str(tmp_path / "run")
    )
    run_dir = write_fixture_study(tmp_path / "run", config=qwen, n_problems=20)
    stats = json.loads(run_dir.data_stats.read_text())
    stats["source"] = {"kind": "hub", "dataset_id": "openai/gsm8k", "sha": "f" * 40, "train_rows": 2000}
    write_json(run_dir.data_stats, stats)
    write_lock(qwen, run_dir, {})
    lock = json.loads(run_dir.lock.read_text())
    assert lock["resolved"] == {
        "base_model": {"id": "Qwen/Qwen3-4B-Instruct-2507", "sha": FIXTURE_BASE_SHA},
        "dataset": {"id": "openai/gsm8k", "sha": "f" * 40},
    }
