"""Content endpoints: preupload, LFS batch/upload/verify, the NDJSON commit, and file downloads (resolve).

Upload flow of the real client (Xet off): preupload decides regular vs LFS per file; LFS files go through the
batch endpoint, which hands out an upload link signed for that one object (the client sends the PUT without
its token), then verify; finally one commit names every file by content (regular) or sha256 (LFS).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re

from starlette.responses import Response

from hub_tools.local_hub.context import Call, json_response
from hub_tools.local_hub.protocol import (
    DEFAULT_GITATTRIBUTES,
    LFS_SIZE_THRESHOLD,
    ApiError,
    image_media_type,
    lfs_patterns,
    matches_any,
)
from hub_tools.local_hub.repos import resolve_commit
from hub_tools.local_hub.storage import file_entry

LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"
PARENT_MISMATCH = "The branch was updated since you opened this page. Please refresh and try again."


def upload_token(call: Call, oid: str, size: int) -> str:
    """A signature that lets the unauthenticated LFS PUT store exactly this object."""
    return hmac.new(call.storage.secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()


# -- preupload -----------------------------------------------------------------------------------------------
def preupload(call: Call, repo_type: str, repo_id: str, revision: str) -> Response:
    body = call.json()
    call.writable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    tree = commit["tree"]
    attributes = tree.get(".gitattributes")
    text = call.storage.read_blob(attributes["sha256"]).decode() if attributes else DEFAULT_GITATTRIBUTES
    lfs_globs = lfs_patterns(text)
    ignore_globs = (body.get("gitIgnore") or "").splitlines()
    files = []
    for item in body.get("files", []):
        path, size = item["path"], int(item.get("size", 0))
        sample = base64.b64decode(item.get("sample") or "")
        lfs = size >= LFS_SIZE_THRESHOLD or matches_any(path, lfs_globs) or b"\0" in sample
        answer = {"path": path, "uploadMode": "lfs" if lfs else "regular"}
        answer["shouldIgnore"] = path.startswith(".git/") or matches_any(path, ignore_globs)
        existing = tree.get(path)
        if existing is not None:
            # The client drops files whose oid equals its local one: sha256 for LFS, git sha1 for regular.
            answer["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
        files.append(answer)
    return json_response({"files": files, "commitOid": commit["sha"]})


# -- LFS -----------------------------------------------------------------------------------------------------
def lfs_batch(call: Call, repo_type: str, repo_id: str) -> Response:
    body = call.json()
    call.writable_repo(repo_type, repo_id)
    if body.get("operation", "upload") != "upload":
        raise ApiError(400, "Only the LFS 'upload' operation is supported; download files through /resolve/")
    objects = []
    for obj in body.get("objects", []):
        oid, size = str(obj.get("oid", "")), int(obj.get("size", 0))
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            objects.append(
                {"oid": oid, "size": size, "error": {"code": 422, "message": "oid must be a sha256"}}
            )
        elif call.storage.has_blob(oid):
            objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips the PUT
        else:
            href = f"{call.base}/lfs-upload/{oid}?size={size}&token={upload_token(call, oid, size)}"
            actions = {
                "upload": {"href": href, "header": {}},
                "verify": {"href": f"{call.base}/lfs-verify/{oid}", "header": {}},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
    return json_response({"transfer": "basic", "objects": objects}, media_type=LFS_MEDIA_TYPE)


def lfs_upload(call: Call, oid: str) -> Response:
    size = int(call.arg("size", "-1")) if (call.arg("size") or "").isdigit() else -1
    if not hmac.compare_digest(call.arg("token", ""), upload_token(call, oid, size)):
        raise ApiError(
            403, "Invalid or missing upload token: ask the LFS batch endpoint for a new upload link"
        )
    if len(call.body) != size or hashlib.sha256(call.body).hexdigest() != oid:
        raise ApiError(400, f"Uploaded content does not match oid {oid} and size {size}")
    call.storage.put_blob(call.body)
    return Response(status_code=200)


def lfs_verify(call: Call, oid: str) -> Response:
    call.require_user()
    size = call.json().get("size")
    path = call.storage.blob_path(oid) if re.fullmatch(r"[0-9a-f]{64}", oid) else None
    if path is None or not path.is_file() or (size is not None and path.stat().st_size != int(size)):
        raise ApiError(404, f"LFS object {oid} was not uploaded", code="EntryNotFound")
    return json_response({"success": True}, media_type=LFS_MEDIA_TYPE)


# -- commit --------------------------------------------------------------------------------------------------
def clean_path(path: str) -> str:
    path = path.strip()
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise ApiError(400, f"Invalid path in repo: {path!r}")
    return path


def apply_operation(call: Call, tree: dict, key: str, value: dict) -> None:
    """Apply one NDJSON line to ``tree`` (in place)."""
    if key == "file":
        content = value.get("content", "")
        data = base64.b64decode(content) if value.get("encoding", "base64") == "base64" else content.encode()
        tree[clean_path(value["path"])] = file_entry(
            call.storage.put_blob(data), len(data), lfs=False, data=data
        )
    elif key == "lfsFile":
        oid = value.get("oid", "")
        path = call.storage.blob_path(oid) if re.fullmatch(r"[0-9a-f]{64}", oid) else None
        if path is None or not path.is_file():
            raise ApiError(
                422, f"LFS object {oid} of {value.get('path')!r} was never uploaded: upload it first"
            )
        size = path.stat().st_size
        if value.get("size") is not None and int(value["size"]) != size:
            raise ApiError(422, f"LFS object {oid} has size {size}, not {value['size']}")
        tree[clean_path(value["path"])] = file_entry(oid, size, lfs=True)
    elif key == "deletedFile":
        if tree.pop(value.get("path", ""), None) is None:
            raise ApiError(
                404, f"A file with this name doesn't exist: {value.get('path')!r}", code="EntryNotFound"
            )
    elif key == "deletedFolder":
        prefix = value.get("path", "").rstrip("/") + "/"
        doomed = [p for p in tree if p.startswith(prefix)]
        if not doomed:
            raise ApiError(
                404, f"A folder with this name doesn't exist: {value.get('path')!r}", code="EntryNotFound"
            )
        for path in doomed:
            del tree[path]
    else:
        raise ApiError(
            400, f"Unknown commit operation {key!r}: use file, lfsFile, deletedFile or deletedFolder"
        )


def commit(call: Call, repo_type: str, repo_id: str, revision: str) -> Response:
    try:
        lines = [json.loads(line) for line in call.body.decode().splitlines() if line.strip()]
    except ValueError:
        raise ApiError(400, "Commit body must be NDJSON: one JSON object per line") from None
    call.writable_repo(repo_type, repo_id)
    header = next((line.get("value", {}) for line in lines if line.get("key") == "header"), {})
    create_pr = call.flag("create_pr")
    storage = call.storage
    with storage.lock:  # read head, build the tree, move the ref: one writer at a time per server
        refs = storage.refs(repo_type, repo_id)
        ref = revision if revision.startswith("refs/") else f"refs/heads/{revision}"
        if ref not in refs or (create_pr and not ref.startswith("refs/heads/")):
            raise ApiError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        head, parent = refs[ref], (header.get("parentCommit") or "").lower()
        if create_pr:
            base = resolve_commit(call, repo_type, repo_id, parent)["sha"] if parent else head
        elif parent and not head.startswith(parent):
            raise ApiError(412, PARENT_MISMATCH)
        else:
            base = head
        tree = dict(storage.get_commit(repo_type, repo_id, base)["tree"])
        for line in lines:
            if line.get("key") != "header":
                apply_operation(call, tree, line.get("key"), line.get("value") or {})
        title = header.get("summary") or "Commit using the local hub"
        sha = storage.write_commit(
            repo_type,
            repo_id,
            parents=[base],
            tree=tree,
            title=title,
            message=header.get("description") or "",
            author=call.user,
        )
        if create_pr:
            number = 1 + max((int(r.rsplit("/", 1)[1]) for r in refs if r.startswith("refs/pr/")), default=0)
            ref = f"refs/pr/{number}"
        refs[ref] = sha
        storage.write_refs(repo_type, repo_id, refs)
    repo_url = call.repo_url(repo_type, repo_id)
    out = {"success": True, "commitOid": sha, "commitUrl": f"{repo_url}/commit/{sha}"}
    if create_pr:
        out["pullRequestUrl"] = f"{repo_url}/discussions/{number}"
    return json_response(out)


# -- downloads -----------------------------------------------------------------------------------------------
def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single ``bytes=`` range; None to send the whole file; 416 if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None  # multi-range or malformed: a full 200 answer is allowed
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    else:
        start, end = max(size - int(last), 0), size - 1
    if start >= size or start > end:
        raise ApiError(416, f"Range {header} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def resolve_file(call: Call, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
    call.readable_repo(repo_type, repo_id)
    commit = resolve_commit(call, repo_type, repo_id, revision)
    entry = commit["tree"].get(path)
    headers = {"X-Repo-Commit": commit["sha"]}
    if entry is None:
        # X-Repo-Commit on the 404 lets the client cache the miss; datasets probes optional files this way.
        raise ApiError(404, f"Entry not found: {path!r} at {revision}", code="EntryNotFound", headers=headers)
    size = entry["size"]
    etag = entry["sha256"] if entry["lfs"] else entry["oid"]
    headers |= {
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
    }
    if entry["lfs"]:
        headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)}
    span = parse_range(call.headers["range"], size) if "range" in call.headers else None
    status, start, end = (206, *span) if span else (200, 0, size - 1)
    if span:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    media_type = image_media_type(path) or "application/octet-stream"
    if call.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    with open(call.storage.blob_path(entry["sha256"]), "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start + 1)
    return Response(data, status_code=status, headers=headers, media_type=media_type)
