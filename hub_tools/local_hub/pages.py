"""Read-only HTML pages, so a user can look at what they are about to publish.

The URLs the Hub uses: ``/{repo}``, ``/datasets/{repo}`` (also ``/tree/{rev}[/{folder}]`` and the commit and
pull-request URLs the API returns): card metadata, the eval results (``.eval_results/*.yaml``) and the
model-index results as tables, the card body rendered from markdown, the file list. ``/{repo}/blob/{rev}/{path}``:
one file. ``/collections/{owner}/{slug}``: items with their notes. ``/``: an index; ``/{owner}`` and
``/collections/{owner}``: an owner's repos and collections. As on the Hub, a card's relative images resolve
to ``/{repo}/resolve/{rev}/…`` and its relative links to ``/{repo}/blob/{rev}/…``.
Pages are anonymous (a browser sends no token), so private repos and collections do not show.
"""

from __future__ import annotations

import html
import posixpath
from urllib.parse import quote, urlsplit

import jinja2
import yaml
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.responses import HTMLResponse

from hub_tools.local_hub.context import Call
from hub_tools.local_hub.hub_collections import find, slug_of
from hub_tools.local_hub.protocol import ApiError, image_media_type, parse_card_data, split_front_matter
from hub_tools.local_hub.repos import eval_result_items, folders_of, resolve_commit

# Raw HTML in a card is shown as text: these pages render untrusted content on the user's machine.
MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f7f7f8;color:#1f2328}
header{background:#fff;border-bottom:1px solid #e5e7eb;padding:18px 32px}
header h1{margin:0;font-size:22px} header .sub{color:#6b7280;font-size:13px;margin-top:4px}
.badge{display:inline-block;border:1px solid #d1d5db;border-radius:6px;padding:1px 7px;font-size:12px;
 margin-left:6px;color:#374151;background:#f9fafb}
main{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,1fr);gap:24px;padding:24px 32px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:16px 20px;margin-bottom:20px}
section h2{font-size:15px;margin:0 0 10px;color:#374151}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #eef0f2;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f9fafb;color:#4b5563;font-weight:600}
td.num{font-variant-numeric:tabular-nums;font-weight:600}
pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow:auto;font-size:12px}
code{font-size:12px} a{color:#2563eb;text-decoration:none}
.card h1{font-size:24px;border-bottom:1px solid #eee;padding-bottom:6px}
.note{color:#374151;font-size:14px;margin-top:4px} li.item{margin-bottom:14px}
"""

PAGE = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>{{ style }}</style></head><body>{{ body }}</body></html>"""
)

ENV = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)

REPO = ENV.from_string(
    """<header><h1>{{ repo_id }}<span class="badge">{{ repo_type }}</span>
{% if private %}<span class="badge">private</span>{% endif %}</h1>
<div class="sub">commit <code>{{ sha[:10] }}</code> · {{ date }} · {{ commits }} commit(s)</div></header>
<main><div>
{% if evals %}<section id="eval-results"><h2>Evaluation results (.eval_results)</h2><table>
<tr><th>File</th><th>Dataset</th><th>Task</th><th>Value</th><th>Date</th><th>Source</th><th>Notes</th></tr>
{% for e in evals %}{% if e.error %}<tr class="invalid"><td>{{ e.filename }}</td><td colspan="6">invalid: {{ e.error }}</td></tr>
{% else %}<tr><td>{{ e.filename }}</td><td>{{ e.data.dataset.id }}</td><td>{{ e.data.dataset.task_id }}</td>
<td class="num">{{ e.data.value }}</td><td>{{ e.data.date or "" }}</td><td>{% if e.source_href %}<a href="{{ e.source_href }}">{{ e.data.source.name or e.source_href }}</a>{% endif %}</td>
<td>{{ e.data.notes or "" }}</td></tr>{% endif %}{% endfor %}</table></section>{% endif %}
{% if results %}<section id="model-index"><h2>Evaluation results (model-index)</h2><table>
<tr><th>Model</th><th>Task</th><th>Dataset</th><th>Split</th><th>Metric</th><th>Value</th></tr>
{% for r in results %}<tr><td>{{ r.model }}</td><td>{{ r.task }}</td><td>{{ r.dataset }}</td><td>{{ r.split }}</td>
<td>{{ r.metric }}</td><td class="num">{{ r.value }}</td></tr>{% endfor %}</table></section>{% endif %}
<section class="card" id="card">{% if card_html %}{{ card_html }}{% else %}<p>No README.md in this repo.</p>{% endif %}
</section></div><div>
<section id="metadata"><h2>Card metadata</h2>{% if metadata %}<table>
{% for key, text, block in metadata %}<tr><th>{{ key }}</th><td>{% if block %}<pre>{{ text }}</pre>{% else %}{{ text }}{% endif %}</td></tr>{% endfor %}</table>
{% else %}<p>No metadata.</p>{% endif %}</section>
<section id="files"><h2>Files ({{ files | length }}){% if folder %} in {{ folder }}/{% endif %}</h2><table><tr><th>Path</th><th>Size</th><th></th></tr>
{% for f in files %}<tr><td><a href="{{ f.href }}">{{ f.path }}</a></td><td>{{ f.size }}</td>
<td>{% if f.lfs %}<span class="badge">LFS</span>{% endif %}</td></tr>{% endfor %}</table></section>
</div></main>"""
)

BLOB = ENV.from_string(
    """<header><h1>{{ path }}<span class="badge">{{ repo_type }} file</span></h1>
<div class="sub"><a href="{{ repo_href }}">{{ repo_id }}</a> · commit <code>{{ sha[:10] }}</code> · {{ size }}
{% if lfs %}<span class="badge">LFS</span>{% endif %} · <a href="{{ raw_href }}">download</a></div></header>
<main><div><section id="blob">{% if image %}<img src="{{ raw_href }}" alt="{{ path }}" style="max-width:100%">
{% elif text is not none %}<pre>{{ text }}</pre>{% else %}<p>Binary file, not shown.</p>{% endif %}</section></div></main>"""
)

COLLECTION = ENV.from_string(
    """<header><h1>{{ title }}<span class="badge">collection</span>
{% if private %}<span class="badge">private</span>{% endif %}</h1>
<div class="sub">by {{ owner }} · updated {{ updated }} · {{ items | length }} item(s)</div></header>
<main><div><section>{% if description %}<p>{{ description }}</p>{% endif %}<ol id="items">
{% for item in items %}<li class="item"><a href="{{ item.href }}">{{ item.id }}</a> <span class="badge">{{ item.type }}</span>
{% if item.note %}<div class="note">{{ item.note }}</div>{% endif %}</li>{% endfor %}</ol></section></div></main>"""
)

INDEX = ENV.from_string(
    """<header><h1>{{ title }}</h1><div class="sub">{{ repos | length }} public repo(s)</div></header><main><div>
<section><h2>Repositories</h2><ul>{% for r in repos %}<li><a href="{{ r.href }}">{{ r.id }}</a>
<span class="badge">{{ r.type }}</span></li>{% endfor %}</ul></section>
<section><h2>Collections</h2><ul>{% for c in collections %}<li><a href="/collections/{{ c.slug }}">{{ c.title }}</a>
</li>{% endfor %}</ul></section></div></main>"""
)


def page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(PAGE.render(title=title, style=STYLE, body=Markup(body)))


def human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


def metadata_rows(metadata: dict) -> list[tuple[str, str, bool]]:
    """(key, text, shown as a block) per metadata key; lists of plain values read as one comma-separated line."""
    rows = []
    for key, value in metadata.items():
        if key == "model-index":
            continue  # shown as its own table
        if isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
            rows.append((key, ", ".join(str(v) for v in value), False))
        elif isinstance(value, dict | list):
            rows.append((key, yaml.safe_dump(value, sort_keys=False, allow_unicode=True).strip(), True))
        else:
            rows.append((key, str(value), False))
    return rows


def model_index_rows(metadata: dict) -> list[dict]:
    """One row per metric of every model-index result, whatever optional fields are missing."""
    rows = []
    for model in metadata.get("model-index") or []:
        for result in (model or {}).get("results") or []:
            task, dataset = result.get("task") or {}, result.get("dataset") or {}
            for metric in result.get("metrics") or []:
                rows.append(
                    {
                        "model": model.get("name", ""),
                        "task": task.get("name") or task.get("type", ""),
                        "dataset": dataset.get("name") or dataset.get("type", ""),
                        "split": dataset.get("split", ""),
                        "metric": metric.get("name") or metric.get("type", ""),
                        "value": metric.get("value", ""),
                    }
                )
    return rows


def in_repo(url: str | None, base: str) -> str | None:
    """A relative URL of a card resolved against ``base`` (a repo's ``resolve/{rev}`` or ``blob/{rev}``) as the
    Hub resolves it; absolute URLs, site paths, anchors and paths above the repo's root stay as they are."""
    if not url or urlsplit(url).scheme or url.startswith(("/", "#")):
        return url
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
    path = posixpath.normpath(url[:cut])
    if path == "." or path.startswith("../") or path == "..":
        return url
    return f"{base}/{quote(path, safe='/%')}{url[cut:]}"  # markdown-it has percent-encoded it already


def render_card(text: str, repo_href: str, revision: str) -> str:
    """The card body as HTML, with relative images and links resolved in the repo at ``revision``."""
    tokens = MARKDOWN.parse(split_front_matter(text)[1])
    revision = quote(revision, safe="")
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                child.attrSet("src", in_repo(child.attrGet("src"), f"{repo_href}/resolve/{revision}"))
            elif child.type == "link_open":
                child.attrSet("href", in_repo(child.attrGet("href"), f"{repo_href}/blob/{revision}"))
    return MARKDOWN.renderer.render(tokens, MARKDOWN.options, {})


def eval_rows(items: list[dict]) -> list[dict]:
    """The eval-results items, each with its source as a link only if it is a web URL."""
    rows = []
    for item in items:
        url = ((item.get("data") or {}).get("source") or {}).get("url", "")
        rows.append({**item, "source_href": url if url.startswith(("https://", "http://")) else None})
    return rows


def repo_page(
    call: Call, repo_type: str, repo_id: str, revision: str = "main", folder: str = ""
) -> HTMLResponse:
    """The repo at ``revision`` (also what commit and pull-request URLs returned by the API open), its file
    list limited to ``folder`` for a ``/tree/{rev}/{folder}`` URL."""
    repo = call.readable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    tree, folder = commit["tree"], folder.strip("/")
    if folder and folder not in folders_of(tree):
        raise ApiError(404, f"{folder!r} is not a folder of {repo_id} at {revision}", code="EntryNotFound")
    prefix = call.repo_url(repo_type, repo_id)
    metadata, card_html = {}, ""
    if "README.md" in tree:
        text = call.storage.read_blob(tree["README.md"]["sha256"]).decode("utf-8", "replace")
        try:
            metadata = parse_card_data(text)
        except ValueError as error:
            metadata = {"error": str(error)}
        card_html = render_card(text, prefix, revision)
    files = [
        {
            "path": p,
            "size": human_size(e["size"]),
            "lfs": e["lfs"],
            "href": f"{prefix}/blob/{commit['sha']}/{quote(p)}",
        }
        for p, e in sorted(tree.items())
        if not folder or p.startswith(folder + "/")
    ]
    body = REPO.render(
        repo_id=repo_id,
        repo_type=repo_type,
        private=repo["private"],
        sha=commit["sha"],
        date=commit["date"],
        commits=len(call.storage.history(repo_type, repo_id, commit["sha"])),
        evals=eval_rows(eval_result_items(call, tree)) if repo_type == "model" else [],
        results=model_index_rows(metadata),
        card_html=Markup(card_html),
        metadata=metadata_rows(metadata),
        files=files,
        folder=folder,
    )
    return page(repo_id, body)


TEXT_SHOWN_BYTES = 1_000_000


def blob_page(call: Call, repo_type: str, repo_id: str, revision: str, path: str) -> HTMLResponse:
    """One file at ``revision``: an image shown, text shown as text, anything else a download link."""
    call.readable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    entry = commit["tree"].get(path)
    if entry is None:
        raise ApiError(404, f"Entry not found: {path!r} at {revision}", code="EntryNotFound")
    repo_href = call.repo_url(repo_type, repo_id)
    text = None
    if not entry["lfs"] and entry["size"] <= TEXT_SHOWN_BYTES:
        try:
            text = call.storage.read_blob(entry["sha256"]).decode("utf-8")
        except UnicodeDecodeError:
            text = None
    body = BLOB.render(
        path=path,
        repo_type=repo_type,
        repo_id=repo_id,
        repo_href=repo_href,
        sha=commit["sha"],
        size=human_size(entry["size"]),
        lfs=entry["lfs"],
        raw_href=f"{repo_href}/resolve/{commit['sha']}/{quote(path)}",
        image=image_media_type(path) is not None,
        text=text,
    )
    return page(f"{path} · {repo_id}", body)


def collection_page(call: Call, namespace: str, slug: str) -> HTMLResponse:
    collection = find(call, namespace, slug)
    items = []
    for item in collection["items"]:
        if item["type"] in ("model", "dataset", "space"):
            href = call.repo_url(item["type"], item["id"])
        elif item["type"] == "collection":
            href = f"{call.base}/collections/{item['slug']}"
        else:
            href = f"{call.base}/papers/{item['id']}"
        items.append({**item, "id": item.get("slug", item["id"]), "href": href})
    body = COLLECTION.render(
        title=collection["title"],
        private=collection["private"],
        owner=collection["owner"],
        updated=collection["lastUpdated"],
        description=collection.get("description"),
        items=items,
    )
    return page(collection["title"], body)


def index_page(call: Call, owner: str | None = None) -> HTMLResponse:
    """Every visible repo and collection (``/``), or those of one owner (``/{owner}``, ``/collections/{owner}``:
    the Hub's profile and collections pages; 404 for an owner with nothing to show)."""
    repos = [
        {"id": r["id"], "type": r["type"], "href": call.repo_url(r["type"], r["id"])}
        for r in call.storage.list_repos()
        if (not r["private"] or call.hub.is_member(call.user, r["owner"])) and owner in (None, r["owner"])
    ]
    collections = [
        {"slug": slug_of(c), "title": c["title"]}
        for c in call.storage.list_collections()
        if (not c["private"] or call.hub.is_member(call.user, c["owner"])) and owner in (None, c["owner"])
    ]
    if owner is not None and not repos and not collections:
        raise ApiError(404, f"{owner!r} has no public repo or collection on this hub", code="RepoNotFound")
    title = owner or "Local Hub"
    return page(title, INDEX.render(title=title, repos=repos, collections=collections))


def error_page(error: ApiError) -> HTMLResponse:
    text = f"<header><h1>{error.status}</h1><div class='sub'>{html.escape(error.message)}</div></header>"
    response = page(f"{error.status}", text)
    response.status_code = error.status
    if error.code:
        response.headers["X-Error-Code"] = error.code
    return response
