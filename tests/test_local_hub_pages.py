"""The local hub's read-only HTML pages: what a user looks at before publishing."""

from __future__ import annotations

import re
import shutil

import httpx2
import pytest
from hubtools import ACCURACY, CARD_TITLE, CHROMIUM, card_text, chromium

MODEL = "cot-compress/cot-l4"


@pytest.fixture
def site(local_hub):
    """A model repo with a card holding a model-index accuracy, and a collection holding the repo with a note."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.default_token)
    api.create_repo(MODEL)
    api.upload_file(repo_id=MODEL, path_in_repo="README.md", path_or_fileobj=card_text().encode())
    api.upload_file(repo_id=MODEL, path_in_repo="adapter_model.safetensors", path_or_fileobj=b"\0" * 2048)
    collection = api.create_collection("CoT compression study", description="One adapter per level")
    api.add_collection_item(
        collection.slug, MODEL, "model", note="Level 4: 73.6% accuracy at 11 think tokens"
    )
    return local_hub, collection.slug


def cell_texts(html: str, table_id: str) -> list[list[str]]:
    """Rows of cell texts of the table inside the element with this id (a small, independent HTML read)."""
    section = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section, re.S)
    return [
        [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r, re.S)]
        for r in rows
    ]


def test_repo_page_shows_metadata_results_card_and_files(site):
    hub, _ = site
    page = httpx2.get(hub.url_for("model", MODEL))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert cell_texts(html, "model-index")[1] == [
        "cot-compress-l4",
        "Math reasoning",
        "GSM8K",
        "test",
        "Accuracy",
        str(ACCURACY),
    ]
    assert f"<h1>{CARD_TITLE}</h1>" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html  # card HTML stays text
    metadata = dict(row for row in cell_texts(html, "metadata") if len(row) == 2)
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "peft"
    assert metadata["tags"] == "lora, chain-of-thought"
    files = [row[0] for row in cell_texts(html, "files")[1:]]
    assert files == [".gitattributes", "README.md", "adapter_model.safetensors"]


def test_collection_page_lists_items_with_notes(site):
    hub, slug = site
    html = httpx2.get(hub.collection_url(slug)).text
    assert "CoT compression study" in html and "One adapter per level" in html
    assert f'href="{hub.url_for("model", MODEL)}">{MODEL}</a>' in html
    assert "Level 4: 73.6% accuracy at 11 think tokens" in html


def test_commit_and_pull_request_urls_open_pages(local_hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.default_token)
    api.create_repo("cot-compress/pr")
    pr = api.create_commit(
        repo_id="cot-compress/pr",
        operations=[CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=b"# Proposed card\n")],
        commit_message="Propose",
        create_pr=True,
    )
    for url in (pr.pr_url, pr.commit_url):
        page = httpx2.get(url)
        assert page.status_code == 200 and "<h1>Proposed card</h1>" in page.text
    assert "Proposed card" not in httpx2.get(local_hub.url_for("model", "cot-compress/pr")).text


def test_dataset_page(local_hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.default_token)
    api.create_repo("cot-compress/eval", repo_type="dataset")
    readme = b"---\nlicense: mit\nconfigs:\n- config_name: base\n---\n# Eval records\n"
    api.upload_file(
        repo_id="cot-compress/eval", repo_type="dataset", path_in_repo="README.md", path_or_fileobj=readme
    )
    page = httpx2.get(local_hub.url_for("dataset", "cot-compress/eval"))
    assert page.url.path == "/datasets/cot-compress/eval" and "<h1>Eval records</h1>" in page.text
    assert "config_name: base" in page.text and 'id="model-index"' not in page.text


def test_private_repo_page_is_not_shown_to_a_browser(local_hub):
    from huggingface_hub import HfApi

    HfApi(endpoint=local_hub.endpoint, token=local_hub.default_token).create_repo(
        "cot-compress/hidden", private=True
    )
    page = httpx2.get(local_hub.url_for("model", "cot-compress/hidden"))
    assert page.status_code == 401 and "cot-compress/hidden" not in httpx2.get(local_hub.endpoint + "/").text


@pytest.mark.skipif(
    not CHROMIUM.exists() and shutil.which("chromium") is None,
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; CI installs it)",
)
def test_pages_in_headless_chromium(site, tmp_path):
    hub, slug = site
    shot = tmp_path / "repo.png"
    dom = chromium(hub.url_for("model", MODEL), tmp_path, screenshot=shot)
    assert f"<h1>{CARD_TITLE}</h1>" in dom
    assert cell_texts(dom, "model-index")[1][-1] == str(ACCURACY)
    # A real screenshot: a PNG of the requested window size, not an empty file.
    data = shot.read_bytes()
    assert (
        data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") == 1200 and len(data) > 20_000
    )
    collection_shot = tmp_path / "collection.png"
    collection_dom = chromium(hub.collection_url(slug), tmp_path, screenshot=collection_shot)
    assert "Level 4: 73.6% accuracy at 11 think tokens" in collection_dom
    assert collection_shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
