"""The local hub driven by the real huggingface_hub and datasets clients: publish once, read back twice.

Everything is published on one server; every read-back test then runs against that server ("live") and
against a fresh server started on the same data directory after the first one stopped ("restarted").
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hubtools import card_text, clients_for, folder_files, front_matter, isolated_hf_caches, make_folder

from hub_tools.local_hub import LocalHub, running_hub

USERS = {"alice": "hf_alice_token", "bob": "hf_bob_token"}
MODEL, DATASET, PRIVATE = "alice/cot-l4", "alice/cot-eval", "alice/secret-adapter"
ROWS = {
    "base": [
        {"id": "q1", "correct": True, "think_tokens": 120},
        {"id": "q2", "correct": False, "think_tokens": 98},
    ],
    "level_4": [
        {"id": "q1", "correct": True, "think_tokens": 12},
        {"id": "q2", "correct": True, "think_tokens": 9},
    ],
}


@dataclass
class Published:
    data_dir: Path
    folder: Path
    first_sha: str
    pr_num: int
    collection_slug: str
    item_ids: dict[str, str] = field(default_factory=dict)
    stack: ExitStack = field(default_factory=ExitStack)
    hub: LocalHub | None = None


def api_for(hub: LocalHub, token: str | bool | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=token)


def publish_everything(hub: LocalHub, tmp: Path) -> Published:
    from datasets import Dataset, DatasetDict
    from huggingface_hub import CommitOperationAdd

    api = api_for(hub, USERS["alice"])
    api.create_repo(MODEL)
    folder = make_folder(tmp / "adapter")
    first = api.upload_folder(repo_id=MODEL, folder_path=folder, commit_message="Add adapter")
    pr = api.create_commit(
        repo_id=MODEL,
        operations=[CommitOperationAdd(path_in_repo="pr.txt", path_or_fileobj=b"proposed change\n")],
        commit_message="Propose",
        create_pr=True,
    )
    for config, rows in ROWS.items():
        DatasetDict({"test": Dataset.from_list(rows)}).push_to_hub(
            DATASET, config_name=config, token=USERS["alice"]
        )
    api.create_repo(PRIVATE, private=True)
    api.upload_file(repo_id=PRIVATE, path_in_repo="secret.txt", path_or_fileobj=b"top secret\n")

    collection = api.create_collection("CoT compression study", description="Five levels")
    collection = api.add_collection_item(collection.slug, MODEL, "model", note="L4: draft note")
    collection = api.add_collection_item(collection.slug, DATASET, "dataset", note="Per-sample eval records")
    ids = {item.item_id: item.item_object_id for item in collection.items}
    api.update_collection_item(collection.slug, ids[MODEL], note="L4: 73.6% accuracy at 11 think tokens")
    api.update_collection_item(collection.slug, ids[DATASET], position=0)
    return Published(hub.data_dir, folder, first.oid, pr.pr_num, collection.slug, ids)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("published")
    facts = None
    with isolated_hf_caches(tmp / "hf-cache"):
        with ExitStack() as stack:
            hub = stack.enter_context(running_hub(tmp / "hub", users=USERS))
            stack.enter_context(clients_for(hub))
            facts = publish_everything(hub, tmp)
            facts.hub, facts.stack = hub, stack.pop_all()  # the hub outlives this block
        yield facts
        facts.stack.close()


@pytest.fixture(scope="module", params=["live", "restarted"])
def hub(request, published):
    """The publishing server itself, then (once it has stopped) a new one on the same data directory."""
    if request.param == "live":
        yield published.hub
        return
    published.stack.close()  # stop the first server: a real restart, not two servers side by side
    with running_hub(published.data_dir, users=USERS) as restarted, clients_for(restarted):
        yield restarted


def test_repos_exist_for_models_and_datasets(hub):
    api = api_for(hub, USERS["alice"])
    assert api.repo_exists(MODEL) and api.repo_exists(DATASET, repo_type="dataset")
    assert not api.repo_exists(MODEL, repo_type="dataset")
    assert api.whoami()["name"] == "alice"
    assert api_for(hub, USERS["bob"]).whoami()["name"] == "bob"


def test_upload_folder_stored_lfs_and_regular_files(hub, published):
    api = api_for(hub, USERS["alice"])
    expected = {".gitattributes", *folder_files(published.folder)}
    assert set(api.list_repo_files(MODEL)) == expected
    entries = {e.path: e for e in api.list_repo_tree(MODEL, recursive=True) if hasattr(e, "size")}
    big = (published.folder / "adapter_model.safetensors").read_bytes()
    assert len(big) > 10 * 1024 * 1024
    assert entries["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert entries["adapter_model.safetensors"].size == len(big)
    assert entries["adapter_config.json"].lfs is None and entries["logs/training.json"].lfs is None
    siblings = {s.rfilename: s for s in api.model_info(MODEL, files_metadata=True).siblings}
    assert siblings["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert siblings["adapter_config.json"].size == len(
        (published.folder / "adapter_config.json").read_bytes()
    )


def test_downloads_are_byte_identical(hub, published, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    source = folder_files(published.folder)
    for name in ("adapter_model.safetensors", "logs/training.json"):
        path = hf_hub_download(MODEL, name, token=USERS["alice"], cache_dir=tmp_path / "single")
        assert Path(path).read_bytes() == source[name]
    snapshot = Path(snapshot_download(MODEL, token=USERS["alice"], cache_dir=tmp_path / "snap"))
    assert {k: v for k, v in folder_files(snapshot).items() if k != ".gitattributes"} == source


def test_card_data_equals_the_pushed_yaml(hub, published):
    info = api_for(hub, USERS["alice"]).model_info(MODEL)
    expected = front_matter(card_text())
    assert info.card_data.to_dict() == expected
    assert (
        info.card_data.eval_results[0].metric_value
        == expected["model-index"][0]["results"][0]["metrics"][0]["value"]
    )


def test_pull_request_lives_on_its_own_ref(hub, published, tmp_path):
    from huggingface_hub import hf_hub_download

    api = api_for(hub, USERS["alice"])
    assert published.pr_num == 1
    refs = api.list_repo_refs(MODEL, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    assert "pr.txt" not in api.list_repo_files(MODEL)
    assert "pr.txt" in api.list_repo_files(MODEL, revision="refs/pr/1")
    path = hf_hub_download(MODEL, "pr.txt", revision="refs/pr/1", token=USERS["alice"], cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"proposed change\n"
    # The PR starts from main's head, and main still points at the upload_folder commit.
    assert api.model_info(MODEL).sha == published.first_sha
    assert [c.commit_id for c in api.list_repo_commits(MODEL, revision="refs/pr/1")][1] == published.first_sha


def test_dataset_configs_load_back_equal(hub, tmp_path):
    from datasets import load_dataset

    for config, rows in ROWS.items():
        loaded = load_dataset(
            DATASET, config, split="test", cache_dir=str(tmp_path / config), token=USERS["alice"]
        )
        assert loaded.to_list() == rows
    card = api_for(hub, USERS["alice"]).dataset_info(DATASET).card_data.to_dict()
    assert sorted(c["config_name"] for c in card["configs"]) == sorted(ROWS)


def test_collection_reads_back_with_notes_and_positions(hub, published):
    api = api_for(hub, USERS["alice"])
    collection = api.get_collection(published.collection_slug)
    assert collection.title == "CoT compression study" and collection.description == "Five levels"
    assert [(i.item_id, i.item_type, i.position) for i in collection.items] == [
        (DATASET, "dataset", 0),
        (MODEL, "model", 1),
    ]
    assert [i.note for i in collection.items] == [
        "Per-sample eval records",
        "L4: 73.6% accuracy at 11 think tokens",
    ]
    listed = list(api.list_collections(owner="alice"))
    assert [c.slug for c in listed] == [published.collection_slug]
    assert collection.url == f"{hub.endpoint}/collections/{published.collection_slug}"


def test_private_repo_visibility(hub):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    assert api_for(hub, USERS["alice"]).model_info(PRIVATE).private is True
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        api_for(hub, False).model_info(PRIVATE)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as other_user:
        api_for(hub, USERS["bob"]).model_info(PRIVATE)
    assert other_user.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError) as wrong_token:
        api_for(hub, "hf_not_a_token").model_info(PRIVATE)
    assert wrong_token.value.response.status_code == 401
    assert not isinstance(wrong_token.value, RepositoryNotFoundError)
    assert not api_for(hub, False).file_exists(PRIVATE, "secret.txt")
    assert api_for(hub, USERS["alice"]).file_exists(PRIVATE, "secret.txt")
