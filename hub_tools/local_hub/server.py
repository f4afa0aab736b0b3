"""The Starlette app, its router, and ways to run it (background thread for tests and pipelines, foreground CLI).

Routing happens on the RAW path (``scope["raw_path"]``), split on ``/`` first and percent-decoded per segment:
revisions arrive as ``refs%2Fpr%2F1`` and must stay one segment. Every request body is read in full before
anything else, even for errors, because the clients keep connections alive and an unread body would be parsed
as the next request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from eval_artifacts.study.errors import HubError
from hub_tools.local_hub import content, hub_collections, pages, repos
from hub_tools.local_hub.context import Call, HubState, error_response, json_response
from hub_tools.local_hub.faults import Fault, FaultPlan
from hub_tools.local_hub.protocol import ApiError
from hub_tools.local_hub.storage import Storage

DEFAULT_USERS = {"cot-compress": "hf_local_cot_compress_token"}
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIXES = {"datasets": "dataset", "spaces": "space"}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
logger = logging.getLogger(__name__)


# -- routing -------------------------------------------------------------------------------------------------
def route(call: Call) -> Response:
    """Dispatch one authenticated request to its handler."""
    s, m = call.segments, call.method
    if s[:1] == ["api"]:
        return route_api(call, s[1:])
    if len(s) == 2 and s[0] == "lfs-upload" and m == "PUT":
        return content.lfs_upload(call, s[1])
    if len(s) == 2 and s[0] == "lfs-verify" and m == "POST":
        return content.lfs_verify(call, s[1])
    if m in ("GET", "HEAD") and (s == [] or (len(s) == 3 and s[0] == "collections")):
        return page(call, pages.index_page) if not s else page(call, pages.collection_page, s[1], s[2])
    if m in ("GET", "HEAD") and (len(s) == 1 or (len(s) == 2 and s[0] == "collections")):
        return page(call, pages.index_page, s[-1])  # an owner's profile and collections pages
    repo_type = "model"
    if s[:1] and s[0] in PREFIXES and len(s) >= 3:
        repo_type, s = PREFIXES[s[0]], s[1:]
    if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"] and m == "POST":
        return content.lfs_batch(call, repo_type, f"{s[0]}/{s[1][:-4]}")
    if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
        return content.resolve_file(call, repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
    if len(s) == 2 and m in ("GET", "HEAD"):
        return page(call, pages.repo_page, repo_type, f"{s[0]}/{s[1]}")
    if len(s) >= 5 and s[2] == "blob" and m in ("GET", "HEAD"):
        return page(call, pages.blob_page, repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
    if len(s) >= 4 and s[2] == "tree" and m in ("GET", "HEAD"):
        return page(call, pages.repo_page, repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
    if len(s) == 4 and m in ("GET", "HEAD") and s[2] in ("commit", "discussions"):
        revision = f"refs/pr/{s[3]}" if s[2] == "discussions" else s[3]
        return page(call, pages.repo_page, repo_type, f"{s[0]}/{s[1]}", revision)
    raise ApiError(
        404, f"No endpoint {m} /{'/'.join(call.segments)} on the local hub", code="EndpointNotFound"
    )


def page(call: Call, render, *args) -> Response:
    """HTML pages answer errors as HTML, not JSON."""
    try:
        return render(call, *args)
    except ApiError as error:
        return pages.error_page(error)


def route_api(call: Call, s: list[str]) -> Response:
    m = call.method
    fixed = {
        ("GET", "whoami-v2"): repos.whoami,
        ("POST", "validate-yaml"): repos.validate_yaml,
        ("GET", "agent-harnesses"): lambda c: json_response({"standardEnvVars": [], "harnesses": {}}),
        ("POST", "repos/create"): repos.create_repo,
        ("DELETE", "repos/delete"): repos.delete_repo,
        ("GET", "collections"): hub_collections.list_all,
        ("POST", "collections"): hub_collections.create,
    }
    handler = fixed.get((m, "/".join(s)))
    if handler is not None:
        return handler(call)
    if s[:1] == ["collections"] and len(s) >= 3:
        return route_collection(call, s[1], s[2], s[3:])
    if s[:1] and s[0] in TYPES and len(s) == 2:
        # A single-segment id: the client then creates the repo in the caller's namespace.
        raise call.not_found(f"Repository {s[1]}")
    if s[:1] and s[0] in TYPES and len(s) >= 3:
        return route_repo(call, TYPES[s[0]], f"{s[1]}/{s[2]}", s[3:])
    raise ApiError(404, f"No endpoint {m} /api/{'/'.join(s)} on the local hub", code="EndpointNotFound")


def route_repo(call: Call, t: str, repo_id: str, rest: list[str]) -> Response:
    m, action, args = call.method, (rest[0] if rest else ""), rest[1:]
    joined = "/".join(args)
    table = {
        ("GET", ""): lambda: repos.repo_info(call, t, repo_id),
        ("GET", "revision"): lambda: repos.repo_info(call, t, repo_id, joined),
        ("GET", "tree"): lambda: repos.list_tree(call, t, repo_id, args[0], "/".join(args[1:])),
        ("POST", "paths-info"): lambda: repos.paths_info(call, t, repo_id, joined),
        ("GET", "refs"): lambda: repos.list_refs(call, t, repo_id),
        ("GET", "commits"): lambda: repos.list_commits(call, t, repo_id, joined),
        ("POST", "branch"): lambda: repos.create_branch(call, t, repo_id, joined),
        ("DELETE", "branch"): lambda: repos.delete_branch(call, t, repo_id, joined),
        ("POST", "tag"): lambda: repos.create_tag(call, t, repo_id, joined),
        ("DELETE", "tag"): lambda: repos.delete_tag(call, t, repo_id, joined),
        ("PUT", "settings"): lambda: repos.update_settings(call, t, repo_id),
        ("POST", "preupload"): lambda: content.preupload(call, t, repo_id, joined),
        ("POST", "commit"): lambda: content.commit(call, t, repo_id, joined),
    }
    needs_arg = action in (
        "revision",
        "tree",
        "paths-info",
        "commits",
        "branch",
        "tag",
        "preupload",
        "commit",
    )
    handler = table.get((m, action))
    if handler is None or (needs_arg and not args):
        raise ApiError(
            404, f"No endpoint {m} {action!r} for {t} repos on the local hub", code="EndpointNotFound"
        )
    return handler()


def route_collection(call: Call, namespace: str, slug: str, rest: list[str]) -> Response:
    m = call.method
    if not rest:
        handler = {
            "GET": hub_collections.get,
            "PATCH": hub_collections.update,
            "DELETE": hub_collections.delete,
        }
        if m in handler:
            return handler[m](call, namespace, slug)
    elif rest == ["items"] and m == "POST":
        return hub_collections.add_item(call, namespace, slug)
    elif len(rest) == 2 and rest[0] == "items" and m in ("PATCH", "DELETE"):
        handler = hub_collections.update_item if m == "PATCH" else hub_collections.delete_item
        return handler(call, namespace, slug, rest[1])
    raise ApiError(404, f"No endpoint {m} on collection {namespace}/{slug}", code="EndpointNotFound")


# -- the app -------------------------------------------------------------------------------------------------
def authenticate(call: Call) -> None:
    """Set the caller from ``Authorization: Bearer``; an unknown token is a 401 whatever the route."""
    header = call.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token:
        return
    user = call.hub.token_users.get(token)
    if user is None:
        raise ApiError(401, "Invalid credentials in Authorization header", code="Unauthorized")
    call.user, call.read_only = user, token in call.hub.read_only_tokens


def serve_one(state: HubState, request: Request, raw_path: str, body: bytes) -> Response:
    parts = raw_path.split("/")[1:]
    if parts and parts[-1] == "":
        parts.pop()
    call = Call(
        method=request.method,
        segments=[unquote(part) for part in parts],
        query_string=request.url.query,
        body=body,
        headers=request.headers,
        base=f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}",
        hub=state,
    )
    try:
        authenticate(call)
        return route(call)
    except ApiError as error:
        return error_response(error)
    except Exception as error:  # a bug here must reach the client as a 500, not a dropped connection
        logger.exception("local hub failed on %s %s", request.method, raw_path)
        return error_response(ApiError(500, f"Local hub internal error: {type(error).__name__}: {error}"))


class DroppedResponse(Response):
    """Sends the headers and half the body of ``inner``, then aborts the connection (fault injection)."""

    def __init__(self, inner: Response):
        self.inner = inner

    async def __call__(self, scope, receive, send) -> None:
        body = self.inner.body
        await send(
            {
                "type": "http.response.start",
                "status": self.inner.status_code,
                "headers": self.inner.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        raise ConnectionAbortedError("fault injection: connection dropped mid-body")


def fault_response(fault: Fault) -> Response:
    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
    return json_response({"error": f"Injected fault: HTTP {fault.status}"}, fault.status, headers)


def create_app(state: HubState) -> Starlette:
    """The ASGI app over ``state``: one catch-all route, routed by raw path."""

    async def handle(request: Request) -> Response:
        body = await request.body()
        raw_path = (request.scope.get("raw_path") or request.scope["path"].encode()).decode("latin-1")
        raw_path = raw_path.split("?", 1)[0]
        fault = state.faults.take(request.method, raw_path)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.status is not None and not fault.served:
            response = fault_response(fault)
        else:
            response = await run_in_threadpool(serve_one, state, request, raw_path, body)
            if fault is not None and fault.served:
                response = fault_response(fault)
        record = {
            "method": request.method,
            "path": raw_path,
            "status": response.status_code,
            "bytes_in": len(body),
        }
        state.request_log.append(record | {"query": request.url.query, "fault": fault is not None})
        return DroppedResponse(response) if fault is not None and fault.drop else response

    return Starlette(routes=[Route("/{path:path}", handle, methods=METHODS)])


# -- running it ----------------------------------------------------------------------------------------------
@dataclass
class LocalHub:
    """A running local hub: where it listens, its state, and helpers for tests."""

    endpoint: str
    data_dir: Path
    state: HubState

    @property
    def default_user(self) -> str:
        return next(iter(self.state.users))

    @property
    def default_token(self) -> str:
        return self.state.users[self.default_user]

    @property
    def request_log(self) -> list[dict]:
        return self.state.request_log

    @property
    def faults(self) -> FaultPlan:
        return self.state.faults

    @property
    def storage(self) -> Storage:
        return self.state.storage

    def requests(self, method: str | None = None, path_contains: str = "") -> list[dict]:
        """Logged requests with this method (any if None) whose raw path contains ``path_contains``."""
        return [
            r
            for r in self.request_log
            if (method is None or r["method"] == method) and path_contains in r["path"]
        ]

    def commit_count(self, repo_type: str, repo_id: str, revision: str = "main") -> int:
        """Commits in the history of ``revision`` (the initial commit included)."""
        sha, _ = self.storage.resolve(repo_type, repo_id, revision)
        if sha is None:
            raise HubError(f"{repo_type} repo {repo_id} has no revision {revision!r} on the local hub")
        return len(self.storage.history(repo_type, repo_id, sha))

    def url_for(self, repo_type: str, repo_id: str) -> str:
        """The HTML page of a repo."""
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
        return f"{self.endpoint}/{prefix}{repo_id}"

    def collection_url(self, slug: str) -> str:
        return f"{self.endpoint}/collections/{slug}"

    def configure_clients(self) -> Callable[[], None]:
        """Point this process's huggingface_hub / datasets at this hub; returns the undo (see ``configure_clients``)."""
        from hub_tools.local_hub.clients import configure_clients

        return configure_clients(self.endpoint)


def make_state(
    data_dir: Path,
    *,
    users: dict[str, str] | None = None,
    orgs: dict[str, list[str]] | None = None,
    read_only_tokens: set[str] | None = None,
    faults: FaultPlan | None = None,
) -> HubState:
    users = dict(users or DEFAULT_USERS)
    if not users:
        raise HubError("the local hub needs at least one user: pass --user NAME:TOKEN")
    return HubState(
        storage=Storage(Path(data_dir)),
        users=users,
        orgs=dict(orgs or {}),
        read_only_tokens=set(read_only_tokens or ()),
        faults=faults if faults is not None else FaultPlan(),
    )


def uvicorn_config(app: Starlette, **kwargs) -> uvicorn.Config:
    # Long keep-alive: the clients pool connections between calls; quiet logs: tests print failures themselves.
    return uvicorn.Config(app, lifespan="off", log_level="warning", timeout_keep_alive=60, **kwargs)


@contextmanager
def running_hub(
    data_dir: Path,
    *,
    users: dict[str, str] | None = None,
    faults: FaultPlan | None = None,
    orgs: dict[str, list[str]] | None = None,
    read_only_tokens: set[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[LocalHub]:
    """Run the hub in a background thread on a free port (or ``port``) until the block exits.

    ``users`` maps username -> token (first user = default namespace); ``orgs`` maps org -> members;
    tokens in ``read_only_tokens`` can read but every write answers 403.
    """
    state = make_state(data_dir, users=users, orgs=orgs, read_only_tokens=read_only_tokens, faults=faults)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by every accepted connection: without it each response waits ~40 ms for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise HubError(f"cannot listen on {host}:{port} ({error}): choose another --port") from error
    server = uvicorn.Server(uvicorn_config(create_app(state), timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="local-hub", daemon=True)
    thread.start()
    endpoint = f"http://{host}:{sock.getsockname()[1]}"
    try:
        wait_until_up(endpoint, thread)
        state.request_log.clear()
        yield LocalHub(endpoint=endpoint, data_dir=Path(data_dir), state=state)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_until_up(endpoint: str, thread: threading.Thread, timeout: float = 20.0) -> None:
    """Poll the hub until it answers an HTTP request (proxies bypassed: it lives on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise HubError(f"the local hub at {endpoint} stopped while starting: see the log above")
        try:
            opener.open(f"{endpoint}/api/agent-harnesses", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise HubError(f"the local hub at {endpoint} did not answer within {timeout:.0f} s")


def serve_forever(
    data_dir: Path, *, host: str, port: int, users: dict[str, str], read_only_tokens: set[str] | None = None
) -> None:
    """Run the hub in the foreground until interrupted (the ``hub serve`` command)."""
    state = make_state(data_dir, users=users, read_only_tokens=read_only_tokens)
    uvicorn.Server(uvicorn_config(create_app(state), host=host, port=port)).run()
