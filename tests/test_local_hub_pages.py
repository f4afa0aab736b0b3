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


def test_card_relative_links_and_images_resolve_in_the_repo_as_on_the_hub(local_hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.default_token)
    card = (
        b"# Links\n![plot](pareto.png) ![sub](./img/a%20b.png) [config](adapter_config.json#L2) "
        b"[site](/cot-compress) [web](https://example.com/x.png) [anchor](#links) [above](../other/x)\n"
    )
    for repo_type, prefix in (("model", ""), ("dataset", "datasets/")):
        repo_id = f"cot-compress/links-{repo_type}"
        api.create_repo(repo_id, repo_type=repo_type)
        api.upload_file(repo_id=repo_id, repo_type=repo_type, path_in_repo="README.md", path_or_fileobj=card)
        html = httpx2.get(local_hub.url_for(repo_type, repo_id)).text
        repo = f"{local_hub.endpoint}/{prefix}{repo_id}"
        assert f'<img src="{repo}/resolve/main/pareto.png" alt="plot"' in html
        assert f'<img src="{repo}/resolve/main/img/a%20b.png" alt="sub"' in html
        assert f'href="{repo}/blob/main/adapter_config.json#L2"' in html
        for kept in ("/cot-compress", "https://example.com/x.png", "#links", "../other/x"):
            assert f'href="{kept}"' in html


@pytest.fixture
def published_study(local_hub, fixture_run, tmp_path):
    """The fixture study (levels 1-2) published to the local hub with the real clients."""
    from helpers import repos
    from hubtools import publish_to

    from eval_artifacts.rundir import RunDir
    from eval_artifacts.study.config import load_config
    from hub_tools.publishing.commands import Scope

    run_dir = RunDir(tmp_path / "run")
    shutil.copytree(fixture_run, run_dir.root)
    config = load_config().with_overrides(run_dir=str(run_dir.root), levels=[1, 2])
    report = publish_to(
        local_hub.endpoint,
        config,
        run_dir,
        token=local_hub.default_token,
        scope=Scope.ALL,
        echo=lambda line: None,
    )
    return local_hub, run_dir, repos(config), report.collection_url


def test_the_hubs_page_urls_answer_200(published_study):
    """/{repo}, /datasets/{repo}, /collections/{slug}, /{repo}/blob|tree|resolve/...: the URLs the Hub uses."""
    hub, run_dir, repos, collection_url = published_study
    assert httpx2.get(collection_url).status_code == 200
    namespace = repos[0][1].split("/")[0]
    for owner_page in (f"{hub.endpoint}/{namespace}", f"{hub.endpoint}/collections/{namespace}"):
        listing = httpx2.get(owner_page)  # the Hub's profile and collections-of-a-user pages
        assert listing.status_code == 200 and collection_url.split("/collections/")[1] in listing.text
    assert httpx2.get(f"{hub.endpoint}/collections/nobody").status_code == 404
    for repo_type, repo_id in repos:
        repo = hub.url_for(repo_type, repo_id)
        for url in (repo, f"{repo}/tree/main", f"{repo}/blob/main/README.md", f"{repo}/blob/main/pareto.png"):
            page = httpx2.get(url)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), url
        plot = httpx2.get(f"{repo}/resolve/main/pareto.png")
        assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
        assert plot.content == run_dir.pareto_png.read_bytes()
        assert "# " in httpx2.get(f"{repo}/blob/main/README.md").text  # the card's text, shown as text
        assert httpx2.get(f"{repo}/blob/main/missing.txt").status_code == 404
    model = hub.url_for(*repos[0])
    assert httpx2.get(f"{model}/resolve/main/adapter_config.json").headers["content-type"] == (
        "application/octet-stream"  # only images get their type: no repo file runs in the pages' origin
    )


@pytest.mark.skipif(
    not CHROMIUM.exists() and shutil.which("chromium") is None,
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; CI installs it)",
)
def test_pareto_plot_loads_on_every_page_in_headless_chromium(published_study, tmp_path):
    from hubtools import DevTools

    hub, run_dir, repos, collection_url = published_study
    png = run_dir.pareto_png.read_bytes()
    width = int.from_bytes(png[16:20], "big")  # the IHDR width of the plot the study made
    browser = DevTools(tmp_path)
    try:
        for repo_type, repo_id in repos:
            repo = hub.url_for(repo_type, repo_id)
            for url in (repo, f"{repo}/blob/main/pareto.png"):
                report = browser.page_report(url)
                assert report["status"] == 200, url
                plots = [i for i in report["images"] if i["src"].endswith("/pareto.png")]
                assert plots and all(i["naturalWidth"] == width for i in plots), (url, report)
                assert all(i["naturalWidth"] > 0 for i in report["images"]), (url, report)  # nothing broken
        for url in (collection_url, hub.endpoint + "/"):  # pages without the plot: nothing broken either
            report = browser.page_report(url)
            assert report["status"] == 200 and all(i["naturalWidth"] > 0 for i in report["images"])
    finally:
        browser.close()
