"""What every handler receives (one request, already authenticated) and the access rules they share.

Visibility follows the Hub: a private repo or collection is visible to its owner and to members of the
owning org only; to anyone else it does not exist (401 anonymous, 404 signed in, both with ``RepoNotFound``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.responses import Response

from hub_tools.local_hub.faults import FaultPlan
from hub_tools.local_hub.protocol import ApiError
from hub_tools.local_hub.storage import Storage, check_repo_id


@dataclass
class HubState:
    """Server-wide configuration and state shared by all requests."""

    storage: Storage
    users: dict[str, str]  # username -> token
    orgs: dict[str, list[str]] = field(default_factory=dict)  # org -> member usernames
    read_only_tokens: set[str] = field(default_factory=set)
    faults: FaultPlan = field(default_factory=FaultPlan)
    request_log: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_users = {token: name for name, token in self.users.items()}

    def is_member(self, user: str | None, namespace: str) -> bool:
        """Whether ``user`` may write to (and see private things of) ``namespace``."""
        return user is not None and (user == namespace or user in self.orgs.get(namespace, []))


@dataclass
class Call:
    """One request: decoded path segments, query, the whole body, the caller."""

    method: str
    segments: list[str]
    query_string: str
    body: bytes
    headers: Headers
    base: str  # scheme://host:port exactly as the client spelled it (the client checks the host of URLs)
    hub: HubState
    user: str | None = None
    read_only: bool = False

    @property
    def storage(self) -> Storage:
        return self.hub.storage

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.query_string, keep_blank_values=True)

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> dict:
        if not self.body.strip():
            return {}
        try:
            data = json.loads(self.body)
        except ValueError:
            raise ApiError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "Request body must be a JSON object")
        return data

    # -- access rules --------------------------------------------------------------------------------------
    def require_user(self) -> str:
        if self.user is None:
            raise ApiError(401, "Invalid username or password.", code="Unauthorized")
        return self.user

    def require_write(self, namespace: str) -> str:
        """The caller, if its token may write to ``namespace``; 401/403 otherwise."""
        user = self.require_user()
        if self.read_only:
            raise ApiError(403, "This token is read-only: use a token with the 'write' role to publish")
        if not self.hub.is_member(user, namespace):
            raise ApiError(403, f"You don't have the rights to write to the namespace {namespace!r}")
        return user

    def not_found(self, what: str) -> ApiError:
        """The Hub's answer for something missing or invisible: 401 anonymous, 404 signed in."""
        return ApiError(401 if self.user is None else 404, f"{what} not found", code="RepoNotFound")

    def readable_repo(self, repo_type: str, repo_id: str) -> dict:
        try:
            check_repo_id(repo_id)
        except ValueError:
            raise self.not_found(f"Repository {repo_type}/{repo_id}") from None
        repo = self.storage.get_repo(repo_type, repo_id)
        if repo is None or (repo["private"] and not self.hub.is_member(self.user, repo["owner"])):
            raise self.not_found(f"Repository {repo_type}/{repo_id}")
        return repo

    def writable_repo(self, repo_type: str, repo_id: str) -> dict:
        repo = self.readable_repo(repo_type, repo_id)
        self.require_write(repo["owner"])
        return repo

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
        return f"{self.base}/{prefix}{repo_id}"


def json_response(
    data: object, status: int = 200, headers: dict | None = None, media_type: str | None = None
) -> Response:
    return Response(
        json.dumps(data).encode(),
        status_code=status,
        headers=headers,
        media_type=media_type or "application/json",
    )


def error_response(error: ApiError) -> Response:
    """JSON ``{"error": ...}`` plus the X-Error-Code / X-Error-Message headers the client maps to exceptions."""
    headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return json_response({"error": error.message, **error.extra}, error.status, headers)
