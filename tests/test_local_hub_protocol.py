"""Local hub protocol details, each driven by the real huggingface_hub client on a fresh server."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from hubtools import clients_for, make_folder

from hub_tools.local_hub import FaultPlan, configure_clients, running_hub
from hub_tools.local_hub.storage import Storage


@pytest.fixture
def api(local_hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=local_hub.endpoint, token=local_hub.default_token)


def repo_with_file(api, name: str = "cot-compress/demo", content: bytes = b"v1\n") -> str:
    api.create_repo(name)
    api.upload_file(repo_id=name, path_in_repo="a.txt", path_or_fileobj=content)
    return name


def test_create_repo_exist_ok_for_models_and_datasets(local_hub, api):
    from huggingface_hub.errors import HfHubHTTPError

    for repo_type, prefix in (("model", ""), ("dataset", "datasets/")):
        first = api.create_repo("cot-compress/thing", repo_type=repo_type)
        again = api.create_repo("cot-compress/thing", repo_type=repo_type, exist_ok=True)
        assert first == again == f"{local_hub.endpoint}/{prefix}cot-compress/thing"
        assert again.repo_id == "cot-compress/thing" and again.repo_type == repo_type
        with pytest.raises(HfHubHTTPError) as conflict:
            api.create_repo("cot-compress/thing", repo_type=repo_type)
        assert conflict.value.response.status_code == 409
    assert [r["status"] for r in local_hub.requests("POST", "/api/repos/create")] == [
        200,
        409,
        409,
        200,
        409,
        409,
    ]
    # A single-segment id lands in the caller's namespace, as push_to_hub("name") expects.
    assert api.create_repo("solo").repo_id == "cot-compress/solo"


def test_second_identical_upload_folder_creates_no_commit(local_hub, api, tmp_path):
    folder = make_folder(tmp_path / "adapter", big_bytes=10 * 1024 * 1024 + 1)
    api.create_repo("cot-compress/adapter")
    first = api.upload_folder(repo_id="cot-compress/adapter", folder_path=folder)
    commits = local_hub.commit_count("model", "cot-compress/adapter")
    second = api.upload_folder(repo_id="cot-compress/adapter", folder_path=folder)
    assert second.oid == first.oid
    assert local_hub.commit_count("model", "cot-compress/adapter") == commits == 2  # initial + upload
    assert len(local_hub.requests("POST", "/commit/")) == 1
    # The >10 MB file crossed the wire once, through the LFS upload link.
    puts = local_hub.requests("PUT", "/lfs-upload/")
    assert [r["bytes_in"] for r in puts] == [10 * 1024 * 1024 + 1]


def test_create_commit_with_parent_and_stale_parent(local_hub, api):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    repo = repo_with_file(api)
    old = api.model_info(repo).sha
    new = api.create_commit(
        repo_id=repo,
        operations=[CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"b\n")],
        commit_message="b",
        parent_commit=old,
    )
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(
            repo_id=repo,
            operations=[CommitOperationAdd(path_in_repo="c.txt", path_or_fileobj=b"c\n")],
            commit_message="c",
            parent_commit=old,
        )
    assert stale.value.response.status_code == 412
    assert api.model_info(repo).sha == new.oid
    assert "c.txt" not in api.list_repo_files(repo)
    assert [c.title for c in api.list_repo_commits(repo)] == [
        "b",
        "Upload a.txt with huggingface_hub",
        "initial commit",
    ]


def test_delete_files_and_folders(local_hub, api):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import EntryNotFoundError

    repo = repo_with_file(api)
    api.create_commit(
        repo_id=repo,
        operations=[
            CommitOperationAdd(path_in_repo="dir/x.txt", path_or_fileobj=b"x"),
            CommitOperationAdd(path_in_repo="dir/sub/y.txt", path_or_fileobj=b"y"),
        ],
        commit_message="add dir",
    )
    api.delete_file("a.txt", repo_id=repo)
    assert api.list_repo_files(repo) == [".gitattributes", "dir/sub/y.txt", "dir/x.txt"]
    api.create_commit(
        repo_id=repo, operations=[CommitOperationDelete(path_in_repo="dir/")], commit_message="rm"
    )
    assert api.list_repo_files(repo) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("a.txt", repo_id=repo)
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo, path_in_repo="dir"))


def test_branches_tags_and_quoted_paths(local_hub, api, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    repo = repo_with_file(api)
    api.create_branch(repo, branch="feat/x")
    api.create_branch(repo, branch="feat/x", exist_ok=True)
    name = "dir with space/ä #1.txt"
    api.upload_file(repo_id=repo, path_in_repo=name, path_or_fileobj=b"odd\n", revision="feat/x")
    api.create_tag(repo, tag="v1.0", revision="feat/x")
    refs = api.list_repo_refs(repo)
    assert sorted(b.name for b in refs.branches) == ["feat/x", "main"]
    assert [t.name for t in refs.tags] == ["v1.0"]
    path = hf_hub_download(repo, name, revision="v1.0", token=local_hub.default_token, cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"odd\n"
    assert not api.file_exists(repo, name)  # main is untouched
    with pytest.raises(HfHubHTTPError) as main_delete:
        api.delete_branch(repo, branch="main")
    assert main_delete.value.response.status_code == 403
    api.delete_branch(repo, branch="feat/x")
    api.delete_tag(repo, tag="v1.0")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="feat/x")


def test_invalid_card_yaml_is_rejected(local_hub, api):
    api.create_repo("cot-compress/card")
    with pytest.raises(ValueError, match="Invalid metadata in README.md(.|\n)*Invalid YAML"):
        api.upload_file(
            repo_id="cot-compress/card", path_in_repo="README.md", path_or_fileobj=b"---\na: [1\n---\nx\n"
        )
    assert api.list_repo_files("cot-compress/card") == [".gitattributes"]


def test_read_only_token_cannot_publish(tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    users = {"alice": "hf_alice", "reader": "hf_reader"}
    hub_options = {"users": users, "read_only_tokens": {"hf_reader"}, "orgs": {"team": ["alice"]}}
    with running_hub(tmp_path / "hub", **hub_options) as hub, clients_for(hub):
        alice, reader = (
            HfApi(endpoint=hub.endpoint, token="hf_alice"),
            HfApi(endpoint=hub.endpoint, token="hf_reader"),
        )
        repo_with_file(alice, "team/shared")
        assert reader.whoami()["auth"]["accessToken"]["role"] == "read"
        assert alice.whoami()["orgs"][0]["name"] == "team"
        assert reader.list_repo_files("team/shared") == [".gitattributes", "a.txt"]
        for attempt in (
            lambda: reader.create_repo("reader/mine"),
            lambda: reader.upload_file(repo_id="team/shared", path_in_repo="b.txt", path_or_fileobj=b"b"),
            lambda: reader.create_collection("nope"),
        ):
            with pytest.raises(HfHubHTTPError) as refused:
                attempt()
            assert refused.value.response.status_code == 403
        assert hub.commit_count("model", "team/shared") == 2


def test_range_head_and_missing_files(local_hub, api):
    from huggingface_hub import HfFileSystem
    from huggingface_hub.errors import EntryNotFoundError

    repo = repo_with_file(api, content=bytes(range(256)) * 4)
    fs = HfFileSystem(endpoint=local_hub.endpoint, token=local_hub.default_token)
    with fs.open(f"{repo}/a.txt", "rb", block_size=16) as handle:
        handle.seek(300)
        assert handle.read(5) == bytes([44, 45, 46, 47, 48])
    url = f"{local_hub.endpoint}/{repo}/resolve/main/a.txt"
    head = httpx2.head(url)
    sha = api.model_info(repo).sha
    assert head.headers["X-Repo-Commit"] == sha and head.headers["Content-Length"] == "1024"
    # Binary content (NUL bytes in the sample) goes to LFS: ETag and X-Linked-* carry the sha256.
    digest = hashlib.sha256(bytes(range(256)) * 4).hexdigest()
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{digest}"'
    assert head.headers["X-Linked-Size"] == "1024"
    api.upload_file(repo_id=repo, path_in_repo="t.txt", path_or_fileobj=b"hello\n")
    text_head = httpx2.head(f"{local_hub.endpoint}/{repo}/resolve/main/t.txt")
    assert text_head.headers["ETag"] == '"' + hashlib.sha1(b"blob 6\0hello\n").hexdigest() + '"'
    assert "X-Linked-Etag" not in text_head.headers
    sha = api.model_info(repo).sha
    partial = httpx2.get(url, headers={"Range": "bytes=-3"})
    assert (partial.status_code, partial.content, partial.headers["Content-Range"]) == (
        206,
        bytes([253, 254, 255]),
        "bytes 1021-1023/1024",
    )
    assert httpx2.get(url, headers={"Range": "bytes=5000-"}).status_code == 416
    missing = httpx2.head(f"{local_hub.endpoint}/{repo}/resolve/main/nope.py")
    assert (missing.status_code, missing.headers["X-Error-Code"], missing.headers["X-Repo-Commit"]) == (
        404,
        "EntryNotFound",
        sha,
    )
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download(repo, "nope.py")


def test_faults_retry_after_error_and_dropped_connection(local_hub, api, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo = repo_with_file(api)
    # 429 with Retry-After on a retried endpoint: the client waits and the upload goes through.
    rule = local_hub.faults.add("POST", r"/preupload/", status=429, retry_after=0)
    api.upload_file(repo_id=repo, path_in_repo="b.txt", path_or_fileobj=b"b")
    assert rule.hits == 1 and [r["status"] for r in local_hub.requests("POST", "/preupload/")][-2:] == [
        429,
        200,
    ]
    # 503 on the commit (not retried by the client): the error surfaces and the branch does not move.
    head = api.model_info(repo).sha
    local_hub.faults.add("POST", r"/commit/main$", status=503)
    with pytest.raises(HfHubHTTPError) as unavailable:
        api.upload_file(repo_id=repo, path_in_repo="c.txt", path_or_fileobj=b"c")
    assert unavailable.value.response.status_code == 503 and api.model_info(repo).sha == head
    # Connection dropped halfway through a download: the client retries and still gets identical bytes.
    big = os.urandom(300_000)
    api.upload_file(repo_id=repo, path_in_repo="big.bin", path_or_fileobj=big)
    local_hub.faults.add("GET", r"/resolve/main/big\.bin$", drop=True)
    path = hf_hub_download(repo, "big.bin", token=local_hub.default_token, cache_dir=tmp_path)
    assert Path(path).read_bytes() == big
    # (The client buffers 10 MB chunks, so with half of 300 kB received it restarts from byte 0.)
    assert [r["fault"] for r in local_hub.requests("GET", "/resolve/main/big.bin")] == [True, False]
    # Delay.
    local_hub.faults.add("GET", r"/api/whoami-v2$", delay=0.4)
    start = time.monotonic()
    api.whoami()
    assert time.monotonic() - start >= 0.4 and local_hub.faults.pending() == 0


def test_fault_plan_given_at_start(tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    plan = FaultPlan([{"method": "POST", "path": "/api/repos/create", "status": 500, "times": 2}])
    with running_hub(tmp_path / "hub", faults=plan) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.default_token)
        for _ in range(2):
            with pytest.raises(HfHubHTTPError, match="500"):
                api.create_repo("cot-compress/x")
        assert api.create_repo("cot-compress/x").repo_id == "cot-compress/x"


def test_crash_mid_commit_keeps_previous_head(local_hub, api, monkeypatch, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    repo = repo_with_file(api)
    head = api.model_info(repo).sha

    def crash(self, repo_type, repo_id, refs):
        raise OSError("disk full while replacing refs.json")

    monkeypatch.setattr(Storage, "write_refs", crash)
    with pytest.raises(HfHubHTTPError) as failed:
        api.upload_file(repo_id=repo, path_in_repo="b.txt", path_or_fileobj=b"b")
    assert failed.value.response.status_code == 500
    monkeypatch.undo()
    assert api.model_info(repo).sha == head
    with running_hub(local_hub.data_dir) as restarted, clients_for(restarted):
        from huggingface_hub import HfApi

        again = HfApi(endpoint=restarted.endpoint, token=restarted.default_token)
        assert again.model_info(repo).sha == head and again.list_repo_files(repo) == [
            ".gitattributes",
            "a.txt",
        ]
        assert restarted.commit_count("model", repo) == 2


def test_collection_errors_and_item_lifecycle(local_hub, api):
    from huggingface_hub.errors import HfHubHTTPError

    repo = repo_with_file(api)
    first = api.create_collection("Study")
    assert api.create_collection("Study", exists_ok=True).slug == first.slug
    with pytest.raises(HfHubHTTPError) as missing_repo:
        api.add_collection_item(first.slug, "cot-compress/nope", "model")
    assert missing_repo.value.response.status_code == 404
    collection = api.add_collection_item(first.slug, repo, "model", note="n" * 500)
    assert api.add_collection_item(first.slug, repo, "model", exists_ok=True).items[0].note == "n" * 500
    with pytest.raises(HfHubHTTPError):
        api.add_collection_item(first.slug, repo, "model")
    api.update_collection_metadata(first.slug, title="Study renamed", private=True)
    renamed = api.get_collection(first.slug)  # the old slug still resolves
    assert renamed.title == "Study renamed" and renamed.slug.startswith("cot-compress/study-renamed-")
    api.delete_collection_item(first.slug, collection.items[0].item_object_id)
    assert api.get_collection(first.slug).items == []
    api.delete_collection(first.slug)
    api.delete_collection(first.slug, missing_ok=True)


def test_settings_and_delete_repo(local_hub, api):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = repo_with_file(api)
    anonymous = HfApi(endpoint=local_hub.endpoint, token=False)
    assert anonymous.model_info(repo).private is False
    api.update_repo_settings(repo, private=True)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(repo)
    api.delete_repo(repo)
    assert not api.repo_exists(repo)
    api.delete_repo(repo, missing_ok=True)


def test_hub_serve_command(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "cot-compress"), "hub", "serve", "--port", str(port)]
    command += ["--data", str(tmp_path), "--user", "alice:hf_a", "--user", "bob:hf_b"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx2.get(
                    f"http://127.0.0.1:{port}/api/whoami-v2", headers={"authorization": "Bearer hf_b"}
                )
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, server.stdout.read().decode()
                time.sleep(0.1)
        assert answer.json()["name"] == "bob"
        created = httpx2.post(
            f"http://127.0.0.1:{port}/api/repos/create",
            json={"name": "r"},
            headers={"authorization": "Bearer hf_a"},
        )
        assert created.json()["url"] == f"http://127.0.0.1:{port}/alice/r"
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (tmp_path / "repos" / "model" / "alice" / "r" / "refs.json").is_file()


def test_copies_paths_info_and_expanded_tree(local_hub, api):
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, HfFileSystem

    repo = "cot-compress/copies"
    api.create_repo(repo)
    ops = [CommitOperationAdd("w.bin", b"\0" * 100), CommitOperationAdd("d/t.txt", b"t")]
    api.create_commit(repo_id=repo, operations=ops, commit_message="one")
    ops = [CommitOperationCopy("w.bin", "w2.bin"), CommitOperationCopy("d/t.txt", "d/t2.txt")]
    api.create_commit(repo_id=repo, operations=ops, commit_message="copy")
    info = {e.path: e for e in api.get_paths_info(repo, ["w2.bin", "d", "missing.txt"])}
    assert sorted(info) == ["d", "w2.bin"]
    assert info["w2.bin"].lfs.sha256 == hashlib.sha256(b"\0" * 100).hexdigest()
    last = {e.path: e.last_commit.title for e in api.list_repo_tree(repo, expand=True)}
    assert last == {".gitattributes": "initial commit", "d": "copy", "w.bin": "one", "w2.bin": "copy"}
    fs = HfFileSystem(endpoint=local_hub.endpoint, token=local_hub.default_token)
    assert fs.glob(f"{repo}/d/*") == [f"{repo}/d/t.txt", f"{repo}/d/t2.txt"]
    assert fs.cat(f"{repo}/d/t2.txt") == b"t"


def test_configure_clients_patches_and_restores(local_hub):
    import datasets.config
    import huggingface_hub.constants
    from huggingface_hub import hf_api

    before = (huggingface_hub.constants.ENDPOINT, hf_api.api.endpoint, datasets.config.HF_ENDPOINT)
    restore = configure_clients("http://127.0.0.1:9")
    try:
        assert os.environ["HF_ENDPOINT"] == huggingface_hub.constants.ENDPOINT == "http://127.0.0.1:9"
        assert hf_api.api.endpoint == datasets.config.HF_ENDPOINT == "http://127.0.0.1:9"
        assert huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(
            "http://127.0.0.1:9/{repo_id}/"
        )
        assert (
            datasets.config.USE_PARQUET_EXPORT is False
            and huggingface_hub.constants.HF_HUB_DISABLE_XET is True
        )
    finally:
        restore()
    assert before == (huggingface_hub.constants.ENDPOINT, hf_api.api.endpoint, datasets.config.HF_ENDPOINT)
    assert before[0] == local_hub.endpoint == os.environ["HF_ENDPOINT"]


def test_eval_results_files_read_back_as_on_the_hub(local_hub, api):
    """``model_info(expand=["evalResults"])``: one parsed item per entry of a valid ``.eval_results/*.yaml``,
    ``{filename, error}`` for an invalid file (which the client skips); the repo page shows both."""
    import yaml
    from huggingface_hub import CommitOperationAdd, EvalResultEntry, eval_result_entries_to_yaml

    written = [
        EvalResultEntry(
            dataset_id="cot-compress/tiny-cot-eval",
            task_id="level_4",
            value=58.5,
            dataset_revision="0123456789abcdef0123456789abcdef01234567",
            date="2026-11-26",
            source_url=f"{local_hub.endpoint}/datasets/cot-compress/tiny-cot-eval",
            source_name="Eval details",
            notes="Level 4, strict grading, greedy, 1 training seed",
        ),
        EvalResultEntry(dataset_id="openai/gsm8k", task_id="main", value=61),
    ]
    files = {
        ".eval_results/study.yaml": yaml.safe_dump(eval_result_entries_to_yaml(written)),
        # hand-written: an unquoted YAML date is a date too
        ".eval_results/by-hand.yaml": "- dataset: {id: openai/gsm8k, task_id: main}\n  value: 0.5\n"
        "  date: 2026-11-27\n",
        ".eval_results/no-task.yaml": "- dataset: {id: openai/gsm8k}\n  value: 58.0\n",
        ".eval_results/broken.yaml": "- dataset: {id: [unclosed\n",
        ".eval_results/text-value.yaml": "- dataset: {id: openai/gsm8k, task_id: main}\n  value: high\n",
        ".eval_results/not-a-list.yaml": "dataset: {id: openai/gsm8k, task_id: main}\nvalue: 1\n",
        ".eval_results/source-without-url.yaml": (
            "- dataset: {id: openai/gsm8k, task_id: main}\n  value: 1\n  source: {name: x}\n"
        ),
        "notes/not-eval-results.yaml": "- not: read\n",
    }
    repo_id = "cot-compress/evals"
    api.create_repo(repo_id)
    api.create_commit(
        repo_id,
        [CommitOperationAdd(path_in_repo=p, path_or_fileobj=t.encode()) for p, t in files.items()],
        commit_message="Eval results",
    )
    assert api.model_info(repo_id).eval_results is None  # only when asked for
    by_hand = EvalResultEntry(dataset_id="openai/gsm8k", task_id="main", value=0.5, date="2026-11-27")
    assert api.model_info(repo_id, expand=["evalResults"]).eval_results == [by_hand, *written]

    raw = httpx2.get(f"{local_hub.endpoint}/api/models/{repo_id}?expand=evalResults").json()["evalResults"]
    invalid = {item["filename"]: item["error"] for item in raw if "error" in item}
    assert set(invalid) == {
        ".eval_results/no-task.yaml",
        ".eval_results/broken.yaml",
        ".eval_results/text-value.yaml",
        ".eval_results/not-a-list.yaml",
        ".eval_results/source-without-url.yaml",
    }
    assert "task_id" in invalid[".eval_results/no-task.yaml"]
    assert "'value'" in invalid[".eval_results/text-value.yaml"]
    valid = [item for item in raw if "error" not in item]
    assert [item["filename"] for item in valid] == [".eval_results/by-hand.yaml"] + [
        ".eval_results/study.yaml"
    ] * 2
    assert all(item["verified"] is False and item["pullRequest"] is None for item in valid)
    assert valid[1]["data"] == eval_result_entries_to_yaml(written)[0]

    page = httpx2.get(local_hub.url_for("model", repo_id)).text
    section = page.split('id="eval-results"', 1)[1].split("</table>", 1)[0]
    assert section.count("<tr") == 1 + len(raw)  # the header, then one row per item
    assert ">58.5<" in section and "Level 4, strict grading" in section and section.count("invalid:") == 5
