"""Repo endpoints: create/delete/settings, info, tree, paths-info, refs, commits, branches and tags.

Writes of content (preupload, LFS, the NDJSON commit, downloads) live in ``content.py``.
"""

from __future__ import annotations

import hashlib
import html
from urllib.parse import parse_qs

from starlette.responses import Response

from hub_tools.local_hub import eval_results
from hub_tools.local_hub.context import Call, json_response
from hub_tools.local_hub.protocol import (
    RESERVED_NAMESPACES,
    ApiError,
    lfs_pointer,
    parse_card_data,
    validate_repo_name,
)


# -- helpers used by several endpoints -----------------------------------------------------------------------
def resolve_commit(call: Call, repo_type: str, repo_id: str, revision: str) -> dict:
    """The commit object a revision names, or 404 RevisionNotFound."""
    sha, _ = call.storage.resolve(repo_type, repo_id, revision)
    commit = call.storage.get_commit(repo_type, repo_id, sha) if sha else None
    if commit is None:
        raise ApiError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    return commit


def card_data(call: Call, tree: dict) -> dict | None:
    """README.md front matter as a dict (None without a README or with invalid YAML, as the Hub does)."""
    entry = tree.get("README.md")
    if entry is None:
        return None
    try:
        return parse_card_data(call.storage.read_blob(entry["sha256"]).decode("utf-8", "replace"))
    except ValueError:
        return None


def eval_result_items(call: Call, tree: dict) -> list[dict]:
    """The repo's ``.eval_results/*.yaml`` files as the Hub's ``evalResults`` items (see ``eval_results.py``)."""
    files = {
        path: call.storage.read_blob(entry["sha256"]).decode("utf-8", "replace")
        for path, entry in tree.items()
        if eval_results.is_eval_results_file(path)
    }
    return eval_results.eval_result_items(files)


def tree_entry(path: str, entry: dict) -> dict:
    """A tree/paths-info file entry as the client's RepoFile reads it."""
    out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size(entry)}
    return out


def pointer_size(entry: dict) -> int:
    return len(lfs_pointer(entry["sha256"], entry["size"]))


def folder_entry(path: str, tree: dict) -> dict:
    """A directory entry; its oid hashes the oids below it, so it changes whenever its content does."""
    below = sorted(f"{p}:{e['oid']}" for p, e in tree.items() if p.startswith(path + "/"))
    return {
        "type": "directory",
        "oid": hashlib.sha1("\n".join(below).encode()).hexdigest(),
        "size": 0,
        "path": path,
    }


def folders_of(tree: dict) -> set[str]:
    """Every directory path implied by the file paths of a tree."""
    folders = set()
    for path in tree:
        parts = path.split("/")[:-1]
        folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return folders


def last_commits(call: Call, repo_type: str, repo_id: str, head: dict, paths: list[str]) -> dict[str, dict]:
    """For each path, the newest commit (first-parent chain) that changed it or anything below it."""
    history = call.storage.history(repo_type, repo_id, head["sha"])
    found: dict[str, dict] = {}
    for commit, parent in zip(history, history[1:] + [None], strict=True):
        old = parent["tree"] if parent else {}
        changed = {p for p in set(commit["tree"]) | set(old) if commit["tree"].get(p) != old.get(p)}
        for path in paths:
            if path not in found and any(c == path or c.startswith(path + "/") for c in changed):
                found[path] = {"id": commit["sha"], "title": commit["title"], "date": commit["date"]}
    return found


# -- account -------------------------------------------------------------------------------------------------
def whoami(call: Call) -> Response:
    user = call.require_user()
    orgs = [
        {
            "type": "org",
            "name": org,
            "fullname": org,
            "id": hashlib.sha1(org.encode()).hexdigest()[:24],
            "roleInOrg": "admin",
        }
        for org, members in sorted(call.hub.orgs.items())
        if user in members
    ]
    return json_response(
        {
            "type": "user",
            "id": hashlib.sha1(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user,
            "email": f"{user}@localhost",
            "emailVerified": True,
            "isPro": False,
            "orgs": orgs,
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "local", "role": "read" if call.read_only else "write"},
            },
        }
    )


def validate_yaml(call: Call) -> Response:
    """Check a README's metadata; the client parses the answer as JSON even on success."""
    content = call.json().get("content", "")
    try:
        parse_card_data(content)
    except ValueError as error:
        return json_response({"errors": [{"message": str(error)}], "warnings": []}, 400)
    return json_response({"errors": [], "warnings": []})


# -- repo lifecycle ------------------------------------------------------------------------------------------
def create_repo(call: Call) -> Response:
    body = call.json()
    user = call.require_user()
    repo_type = body.get("type") or "model"
    if repo_type not in ("model", "dataset", "space"):
        raise ApiError(400, f"Unknown repo type {repo_type!r}: use model, dataset or space")
    name = str(body.get("name", ""))
    namespace = body.get("organization") or user
    if "/" in name:  # old clients send the full id as the name
        namespace, name = name.split("/", 1)
    validate_repo_name(name)
    if namespace in RESERVED_NAMESPACES:
        raise ApiError(400, f"{namespace!r} is reserved and cannot be a namespace")
    call.require_write(namespace)
    repo_id = f"{namespace}/{name}"
    url = call.repo_url(repo_type, repo_id)
    private = body.get("visibility") == "private" or body.get("private") is True
    with call.storage.lock:
        if call.storage.get_repo(repo_type, repo_id) is not None:
            raise ApiError(409, f"You already created this {repo_type} repo", extra={"url": url})
        call.storage.create_repo(
            repo_type=repo_type, repo_id=repo_id, owner=namespace, private=private, author=user
        )
    return json_response({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(call: Call) -> Response:
    body = call.json()
    call.require_user()
    repo_type = body.get("type") or "model"
    namespace = body.get("organization") or call.user
    repo_id = f"{namespace}/{body.get('name', '')}" if "/" not in str(body.get("name")) else body["name"]
    call.writable_repo(repo_type, repo_id)
    call.storage.delete_repo(repo_type, repo_id)
    return json_response({})


def update_settings(call: Call, repo_type: str, repo_id: str) -> Response:
    body = call.json()
    with call.storage.lock:
        repo = call.writable_repo(repo_type, repo_id)
        if "visibility" in body:
            repo["private"] = body["visibility"] == "private"
        elif "private" in body:
            repo["private"] = bool(body["private"])
        if "gated" in body:
            repo["gated"] = body["gated"]
        call.storage.put_repo(repo)
    return json_response({"private": repo["private"], "gated": repo.get("gated", False)})


# -- reading -------------------------------------------------------------------------------------------------
def repo_info(call: Call, repo_type: str, repo_id: str, revision: str = "main") -> Response:
    repo = call.readable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    tree = commit["tree"]
    data = card_data(call, tree)
    blobs = call.flag("blobs")
    siblings = []
    for path, entry in sorted(tree.items()):
        sibling = {"rfilename": path}
        if blobs:
            sibling.update({"size": entry["size"], "blobId": entry["oid"]})
            if entry["lfs"]:
                sibling["lfs"] = {
                    "size": entry["size"],
                    "sha256": entry["sha256"],
                    "pointerSize": pointer_size(entry),
                }
        siblings.append(sibling)
    info = {
        "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
        "id": repo_id,
        "author": repo["owner"],
        "sha": commit["sha"],
        "lastModified": commit["date"],
        "createdAt": repo["created"],
        "private": repo["private"],
        "gated": repo.get("gated", False),
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": list((data or {}).get("tags") or []),
        "siblings": siblings,
        "usedStorage": sum(e["size"] for e in tree.values()),
    }
    if data is not None:
        info["cardData"] = data
    if repo_type == "model":
        info["modelId"] = repo_id
        if "evalResults" in call.query.get("expand", []):
            info["evalResults"] = eval_result_items(call, tree)
        for key in ("library_name", "pipeline_tag"):
            if data and isinstance(data.get(key), str):
                info[key] = data[key]
    return json_response(info)


def list_tree(call: Call, repo_type: str, repo_id: str, revision: str, folder: str) -> Response:
    call.readable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    tree, folder = commit["tree"], folder.strip("/")
    folders = folders_of(tree)
    if folder and folder not in folders:
        # datasets' push_to_hub globs data/ before it exists and needs exactly this code.
        raise ApiError(
            404, f"Entry not found: {folder!r} is not a folder at {revision}", code="EntryNotFound"
        )
    prefix = folder + "/" if folder else ""
    recursive = call.flag("recursive")

    def wanted(path: str) -> bool:
        return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

    entries = [folder_entry(p, tree) for p in sorted(folders) if wanted(p)]
    entries += [tree_entry(p, e) for p, e in sorted(tree.items()) if wanted(p)]
    if call.flag("expand"):
        lasts = last_commits(call, repo_type, repo_id, commit, [e["path"] for e in entries])
        for entry in entries:
            entry["lastCommit"] = lasts.get(entry["path"])
    return json_response(entries)


def paths_info(call: Call, repo_type: str, repo_id: str, revision: str) -> Response:
    """Entries for the existing paths among those asked (missing ones are left out, not errors)."""
    call.readable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    tree, folders = commit["tree"], folders_of(commit["tree"])
    form = parse_qs(call.body.decode(), keep_blank_values=True)
    out = []
    for path in form.get("paths", []):
        path = path.strip("/")
        if path in tree:
            out.append(tree_entry(path, tree[path]))
        elif path in folders:
            out.append(folder_entry(path, tree))
    if (form.get("expand") or ["false"])[0] == "true":
        lasts = last_commits(call, repo_type, repo_id, commit, [e["path"] for e in out])
        for entry in out:
            entry["lastCommit"] = lasts.get(entry["path"])
    return json_response(out)


def list_refs(call: Call, repo_type: str, repo_id: str) -> Response:
    call.readable_repo(repo_type, repo_id)
    refs = call.storage.refs(repo_type, repo_id)

    def group(prefix: str) -> list[dict]:
        return [
            {"name": ref[len(prefix) :] if prefix != "refs/pr/" else ref, "ref": ref, "targetCommit": sha}
            for ref, sha in sorted(refs.items())
            if ref.startswith(prefix)
        ]

    out = {"branches": group("refs/heads/"), "tags": group("refs/tags/"), "converts": []}
    if call.flag("include_prs"):
        out["pullRequests"] = group("refs/pr/")
    return json_response(out)


def list_commits(call: Call, repo_type: str, repo_id: str, revision: str) -> Response:
    call.readable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    formatted = "formatted" in call.query.get("expand[]", []) + call.query.get("expand", [])
    out = []
    for item in call.storage.history(repo_type, repo_id, commit["sha"]):
        row = {
            "id": item["sha"],
            "title": item["title"],
            "message": item["message"],
            "date": item["date"],
            "authors": [{"user": item["author"], "avatar": ""}],
        }
        if formatted:
            row["formatted"] = {"title": html.escape(item["title"]), "message": html.escape(item["message"])}
        out.append(row)
    return json_response(out)


# -- branches and tags ---------------------------------------------------------------------------------------
def create_branch(call: Call, repo_type: str, repo_id: str, branch: str) -> Response:
    body = call.json()
    call.writable_repo(repo_type, repo_id)
    with call.storage.lock:
        refs = call.storage.refs(repo_type, repo_id)
        ref = f"refs/heads/{branch}"
        if ref in refs:
            raise ApiError(409, f"Reference {ref} already exists")
        start = body.get("startingPoint") or "main"
        refs[ref] = resolve_commit(call, repo_type, repo_id, start)["sha"]
        call.storage.write_refs(repo_type, repo_id, refs)
    return json_response({})


def delete_branch(call: Call, repo_type: str, repo_id: str, branch: str) -> Response:
    call.writable_repo(repo_type, repo_id)
    ref = f"refs/heads/{branch}"
    if branch == "main":
        raise ApiError(403, f"Cannot delete {ref}")
    with call.storage.lock:
        refs = call.storage.refs(repo_type, repo_id)
        if refs.pop(ref, None) is None:
            raise ApiError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        call.storage.write_refs(repo_type, repo_id, refs)
    return json_response({})


def create_tag(call: Call, repo_type: str, repo_id: str, revision: str) -> Response:
    body = call.json()
    call.writable_repo(repo_type, repo_id)
    tag = str(body.get("tag", ""))
    if not tag:
        raise ApiError(400, "Missing 'tag' in the request body")
    with call.storage.lock:
        refs = call.storage.refs(repo_type, repo_id)
        ref = f"refs/tags/{tag}"
        if ref in refs:
            raise ApiError(409, f"Tag {tag} already exists")
        refs[ref] = resolve_commit(call, repo_type, repo_id, revision)["sha"]
        call.storage.write_refs(repo_type, repo_id, refs)
    return json_response({})


def delete_tag(call: Call, repo_type: str, repo_id: str, tag: str) -> Response:
    call.writable_repo(repo_type, repo_id)
    with call.storage.lock:
        refs = call.storage.refs(repo_type, repo_id)
        if refs.pop(f"refs/tags/{tag}", None) is None:
            raise ApiError(404, f"Invalid rev id: {tag}", code="RevisionNotFound")
        call.storage.write_refs(repo_type, repo_id, refs)
    return json_response({})
