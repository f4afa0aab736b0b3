"""Small pieces of the Hub protocol shared by the handlers: errors, dates, git oids, card front matter.

Every rule here mirrors what the real clients check (see ../shared/reference/hub_protocol.md): dates end in
``Z``, regular-file oids are git blob sha1s, LFS tree oids are the sha1 of the pointer text.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from datetime import datetime, timezone

import yaml

REPO_TYPES = ("model", "dataset", "space")
# Top-level path words that can never be a namespace, because the router reads them first.
RESERVED_NAMESPACES = {"api", "datasets", "spaces", "models", "collections", "lfs-upload", "lfs-verify"}
REPO_NAME_RE = re.compile(r"^[\w\-.]{1,96}$")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# Served with their image type so that browsers show them; every other file stays application/octet-stream, so
# that no file of a repo (HTML, SVG) can run in the hub's pages' origin.
IMAGE_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                     ".webp": "image/webp"}  # fmt: skip
FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)

# What the Hub writes into a new repo's .gitattributes; the preupload decision reads it back from the repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy "
        "*.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* "
        "*.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents* *.lz4 *.mds *.mp3 *.ogg *.wav *.flac "
        "*.mp4 *.webm *.jpg *.jpeg *.png *.webp *.gif"
    ).split()
)


class ApiError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to its exception classes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        extra: dict | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}  # more JSON keys for the body (409s carry `url` or `slug`)
        self.headers = headers or {}


def now_iso() -> str:
    """UTC now as the Hub writes it: milliseconds and a trailing Z (the client rejects +00:00)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data`` (what the client computes for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer text stored in git in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def image_media_type(path: str) -> str | None:
    """The image type a browser needs to show ``path``, or None if it is not a raster image."""
    suffix = path[path.rfind(".") :].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return IMAGE_MEDIA_TYPES.get(suffix)


def split_front_matter(text: str) -> tuple[str | None, str]:
    """Split a README into (YAML front matter or None, markdown body)."""
    match = FRONT_MATTER_RE.match(text)
    if match is None:
        return None, text
    return match.group(1), text[match.end() :]


def parse_card_data(text: str) -> dict:
    """The README's YAML metadata as a dict; raises ValueError with the parser's message if it is invalid."""
    front, _ = split_front_matter(text)
    if front is None or not front.strip():
        return {}
    try:
        data = yaml.safe_load(front)
    except yaml.YAMLError as error:
        raise ValueError(f"Invalid YAML in README.md metadata: {' '.join(str(error).split())}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md metadata must be a YAML mapping (key: value), not a list or a scalar")
    return data


def lfs_patterns(gitattributes: str) -> list[str]:
    """The path patterns a .gitattributes text routes through LFS."""
    patterns = []
    for line in gitattributes.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def matches_any(path: str, patterns: list[str]) -> bool:
    """Gitignore-style match: a pattern without a slash matches the base name, one with a slash the full path."""
    base = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        if "/" in pattern.rstrip("/"):
            if fnmatch.fnmatchcase(path, pattern.lstrip("/").replace("**/", "*")):
                return True
        elif fnmatch.fnmatchcase(base, pattern) or path.startswith(pattern.rstrip("/") + "/"):
            return True
    return False


def validate_repo_name(name: str) -> None:
    """Reject the names the Hub rejects, with the rule in the message."""
    if not REPO_NAME_RE.match(name) or "--" in name or ".." in name or name.endswith(".git"):
        raise ApiError(
            400, f"Invalid repo name {name!r}: use letters, digits, '-', '_', '.' (max 96, no '--')"
        )
