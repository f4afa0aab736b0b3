"""On-disk state of the local Hub: content-addressed blobs, commit objects with parents, refs, collections.

Layout under the data directory::

    blobs/<aa>/<sha256>                      file contents (regular and LFS alike), deduplicated
    repos/<type>/<ns>/<name>/repo.json       owner, visibility, creation date
    repos/<type>/<ns>/<name>/commits/<sha>.json   {sha, parents, tree: {path: entry}, title, message, date, author}
    repos/<type>/<ns>/<name>/refs.json       {"refs/heads/main": sha, "refs/tags/v1": sha, "refs/pr/1": sha}
    collections/<id>.json                    one collection with its items
    secret                                   key that signs LFS upload links

Crash safety: every file is written to a temporary name and moved into place with ``os.replace``; a commit
writes its blobs and its commit object first and replaces ``refs.json`` last, so a crash at any point leaves
the previous head intact (a dangling commit object at worst).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from pathlib import Path

from hub_tools.local_hub.protocol import DEFAULT_GITATTRIBUTES, git_blob_oid, lfs_pointer, now_iso

ID_PART = re.compile(r"^(?!\.{1,2}$)[\w\-.]{1,96}$")
HEX = re.compile(r"^[0-9a-f]+$")


def check_repo_id(repo_id: str) -> None:
    """Refuse ids that could leave the data directory (they come from URL segments, percent-decoded)."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(ID_PART.match(part) for part in parts):
        raise ValueError(f"invalid repo id {repo_id!r}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None if it does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def file_entry(sha256: str, size: int, *, lfs: bool, data: bytes | None = None) -> dict:
    """A tree entry; ``oid`` is what the Hub reports: git blob sha1 of the content, or of the LFS pointer."""
    oid = git_blob_oid(lfs_pointer(sha256, size) if lfs else data)
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}


class Storage:
    """All persistent state. Writes are serialised by one lock; reads need none (files are replaced atomically)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.RLock()
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        secret_path = self.root / "secret"
        if not secret_path.exists():
            write_atomic(secret_path, secrets.token_hex(32).encode())
        self.secret = secret_path.read_bytes()

    # -- blobs ---------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        if not HEX.match(sha256):
            raise ValueError(f"invalid blob id {sha256!r}")
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 and return the hash."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha256):
            write_atomic(self.blob_path(sha256), data)
        return sha256

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # -- repos ---------------------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        check_repo_id(repo_id)
        return self.root / "repos" / repo_type / repo_id

    def get_repo(self, repo_type: str, repo_id: str) -> dict | None:
        return read_json(self.repo_dir(repo_type, repo_id) / "repo.json")

    def put_repo(self, repo: dict) -> None:
        write_atomic(self.repo_dir(repo["type"], repo["id"]) / "repo.json", json.dumps(repo).encode())

    def list_repos(self) -> list[dict]:
        return [json.loads(p.read_bytes()) for p in sorted((self.root / "repos").glob("*/*/*/repo.json"))]

    def create_repo(self, *, repo_type: str, repo_id: str, owner: str, private: bool, author: str) -> dict:
        """Create a repo with the Hub's initial commit (``.gitattributes``) on ``main``."""
        with self.lock:
            data = DEFAULT_GITATTRIBUTES.encode()
            tree = {".gitattributes": file_entry(self.put_blob(data), len(data), lfs=False, data=data)}
            repo = {
                "type": repo_type,
                "id": repo_id,
                "owner": owner,
                "private": private,
                "created": now_iso(),
            }
            self.put_repo(repo)
            sha = self.write_commit(
                repo_type, repo_id, parents=[], tree=tree, title="initial commit", author=author
            )
            self.write_refs(repo_type, repo_id, {"refs/heads/main": sha})
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Remove a repo: rename it away first so a crash never leaves half a repo visible."""
        with self.lock:
            src = self.repo_dir(repo_type, repo_id)
            trash = self.root / "trash" / secrets.token_hex(8)
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # -- refs and commits ----------------------------------------------------------------------------------
    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]:
        return read_json(self.repo_dir(repo_type, repo_id) / "refs.json") or {}

    def write_refs(self, repo_type: str, repo_id: str, refs: dict[str, str]) -> None:
        """Replace the ref table in one ``os.replace``: the commit point of every write."""
        write_atomic(
            self.repo_dir(repo_type, repo_id) / "refs.json", json.dumps(refs, sort_keys=True).encode()
        )

    def get_commit(self, repo_type: str, repo_id: str, sha: str) -> dict | None:
        if not HEX.match(sha):
            return None
        return read_json(self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json")

    def write_commit(
        self,
        repo_type: str,
        repo_id: str,
        *,
        parents: list[str],
        tree: dict,
        title: str,
        author: str,
        message: str = "",
    ) -> str:
        """Store a commit object and return its 40-hex id (not yet reachable from any ref)."""
        body = {"parents": parents, "tree": tree, "title": title, "message": message, "date": now_iso()}
        body["author"] = author
        # The nonce keeps two identical commits made in the same millisecond distinct, as git's would be.
        seed = json.dumps(body, sort_keys=True).encode() + secrets.token_bytes(8)
        sha = hashlib.sha1(seed).hexdigest()
        write_atomic(
            self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json",
            json.dumps({"sha": sha, **body}).encode(),
        )
        return sha

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> tuple[str | None, str | None]:
        """(commit sha, ref name or None) for a revision: exact ref, branch, tag, then a unique sha prefix."""
        refs = self.refs(repo_type, repo_id)
        for ref in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
            if ref in refs:
                return refs[ref], ref
        if 7 <= len(revision) <= 40 and all(c in "0123456789abcdef" for c in revision):
            commits_dir = self.repo_dir(repo_type, repo_id) / "commits"
            found = [p.stem for p in commits_dir.glob(f"{revision}*.json")]
            if len(found) == 1:
                return found[0], None
        return None, None

    def history(self, repo_type: str, repo_id: str, sha: str) -> list[dict]:
        """Commits from ``sha`` back to the first one, newest first (first-parent chain)."""
        out = []
        while sha:
            commit = self.get_commit(repo_type, repo_id, sha)
            if commit is None:
                break
            out.append(commit)
            sha = commit["parents"][0] if commit["parents"] else None
        return out

    # -- collections ---------------------------------------------------------------------------------------
    def get_collection(self, collection_id: str) -> dict | None:
        if not HEX.match(collection_id):
            return None
        return read_json(self.root / "collections" / f"{collection_id}.json")

    def put_collection(self, collection: dict) -> None:
        write_atomic(self.root / "collections" / f"{collection['id']}.json", json.dumps(collection).encode())

    def delete_collection(self, collection_id: str) -> None:
        (self.root / "collections" / f"{collection_id}.json").unlink(missing_ok=True)

    def list_collections(self) -> list[dict]:
        return [json.loads(p.read_bytes()) for p in sorted((self.root / "collections").glob("*.json"))]
