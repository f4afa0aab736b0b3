"""The Hub a publishing command talks to: its endpoint, the token, and the access checks made before any write.

``--endpoint local`` (or ``hub.endpoint: local``) starts the embedded Hub-compatible server with its storage
under the run directory for the command's duration and uses that server's own token; any URL is used as is,
with the token from ``HF_TOKEN`` or the login cache. The token is never printed, logged or written: every
message built from a client error goes through ``scrub``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import httpx2
import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import LOCAL_ENDPOINT, StudyConfig
from eval_artifacts.study.errors import HubError
from hub_tools import cards

# Roles under which a member of an org may push to it (the Hub's org roles; "read" may not).
WRITE_ROLES = {"admin", "write", "contributor"}


@dataclass
class HubTarget:
    """A Hub ready for publishing: endpoint, client, and the identity of the token (never the token's text)."""

    endpoint: str
    label: str  # "local" or the endpoint URL: the key of this Hub in publish/state.json
    api: HfApi
    token: str = field(repr=False)  # kept out of reprs, so out of tracebacks and logs
    user: str | None = None
    local_hub: object | None = None  # the running LocalHub for ``local``

    def scrub(self, text: str) -> str:
        return scrub(text, self.token)

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = {"model": "", "dataset": "datasets/"}[repo_type]
        return f"{self.endpoint}/{prefix}{repo_id}"

    def collection_url(self, slug: str) -> str:
        return f"{self.endpoint}/collections/{slug}"

    @contextmanager
    def clients(self) -> Iterator[None]:
        """Point this process's ``datasets`` and module-level huggingface_hub helpers at this Hub for the
        block, and back after it: only publishing talks to it, never the stages (which download the
        base model and GSM8K from the public Hub) that ``train-and-publish`` runs while it is open."""
        if self.endpoint == cards.PUBLIC_HUB:
            yield
            return
        from hub_tools.local_hub import configure_clients

        restore = configure_clients(self.endpoint)
        try:
            yield
        finally:
            restore()


def scrub(text: str, token: str | None) -> str:
    """``text`` on one line with the token (if any) masked out."""
    if token:
        text = text.replace(token, "hf_***")
    return " ".join(text.split())


def describe(error: BaseException, token: str | None) -> str:
    """A one-line, token-free description of a client error."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        message = error.server_message or str(error).splitlines()[0]
        return scrub(f"HTTP {error.response.status_code}: {message}", token)
    return scrub(f"{type(error).__name__}: {error}", token)


def status_of(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


T = TypeVar("T")
TRANSIENT_STATUSES = {429, 500, 502, 503, 504}
READ_ATTEMPTS = 3
WRITE_ATTEMPTS = 3


def unwrapped(error: BaseException) -> BaseException:
    """The HTTP error behind huggingface_hub's ``RuntimeError("Error while uploading ...")`` around LFS failures."""
    return (error.__cause__ or error) if type(error) is RuntimeError else error


def _transient(error: BaseException) -> bool:
    """A 429, a 5xx, a dropped or timed-out connection; not a refused one (nobody listens: retrying won't help)."""
    if isinstance(error, httpx2.ConnectError):
        return False
    if isinstance(error, HfHubHTTPError):
        return status_of(error) is None or status_of(error) in TRANSIENT_STATUSES
    return isinstance(error, httpx2.TransportError)


def _back_off(error: BaseException, attempt: int) -> None:
    """Wait ``Retry-After`` (at most 30 s) if the Hub sent one, else ``attempt`` seconds."""
    retry_after = getattr(getattr(error, "response", None), "headers", {}).get("Retry-After", "")
    time.sleep(min(int(retry_after), 30) if retry_after.isdigit() else attempt)


def reading(call: Callable[[], T]) -> T:
    """Run a read-only Hub call, retried on a transient failure: 429, 5xx, a dropped or timed-out connection.

    huggingface_hub retries uploads but not whoami, repo info, paths-info or collection reads, so one flaky
    answer would stop a publish. Reads are safe to repeat; writes go through ``writing``, which first reads
    whether the write landed. Waits ``Retry-After`` (at most 30 s) or 1 s, then 2 s.
    """
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return call()
        except (HfHubHTTPError, httpx2.TransportError) as error:
            if attempt == READ_ATTEMPTS or not _transient(error):
                raise
            _back_off(error, attempt)
    raise AssertionError("unreachable")


def writing(write: Callable[[], T], *, landed: Callable[[], T | None]) -> T:
    """Run a write whose answer may be lost, so that it takes effect exactly once.

    After a 429, a 5xx, a 412 or a dropped connection the write may or may not have landed (the Hub can fail
    after writing, and a lost answer says nothing). So ``landed`` reads the Hub: it returns the write's result
    when the write is there (or nothing is left to write), None when it is not (then the write is sent again,
    after ``Retry-After`` or 1 s, then 2 s), and raises ``HubError`` when the Hub holds something else. A 412
    counts as uncertain because ``landed`` checks the precondition itself, and every write it re-sends still
    carries its own (a commit's parent), so a real concurrent change is never overwritten.

    Raises the last error when every attempt failed and the last did not land either, and any other error at
    once.
    """
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return write()
        except (HfHubHTTPError, httpx2.TransportError, RuntimeError) as raised:
            error = unwrapped(raised)
            if not (_transient(error) or (isinstance(error, HfHubHTTPError) and status_of(error) == 412)):
                raise
            last = raised
        if attempt < WRITE_ATTEMPTS:
            _back_off(error, attempt)
        found = landed()
        if found is not None:
            return found
    raise last


@contextmanager
def open_hub(config: StudyConfig, run_dir: RunDir, *, token: str | None = None) -> Iterator[HubTarget]:
    """
    The Hub of ``config.hub.endpoint``: the embedded local hub (started here) or the URL, with its token.

    Args:
        config (`StudyConfig`):
            The study: its ``hub.endpoint`` (``local`` or an http(s) URL, as the config validates it) and, for
            the local hub, its ``hub.namespace``, the name of the local hub's one user.
        run_dir (`RunDir`):
            The run directory; the local hub keeps its storage in ``run_dir.hub_data_dir``.
        token (`str`, *optional*):
            The token for a URL; defaults to ``HF_TOKEN`` or the login cache. The local hub uses its own.

    Returns:
        `Iterator[HubTarget]`: the Hub, for the duration of the block (the local hub stops after it).

    Raises:
        [`HubError`]:
            No token is available for a URL.
    """
    endpoint = config.hub.endpoint
    if endpoint == LOCAL_ENDPOINT:
        from hub_tools.local_hub import DEFAULT_USERS, running_hub

        # The embedded hub gets one user named after the study's namespace, with the local hub's token.
        local_token = next(iter(DEFAULT_USERS.values()))
        with running_hub(run_dir.hub_data_dir, users={config.hub.namespace: local_token}) as hub:
            api = HfApi(endpoint=hub.endpoint, token=local_token)
            yield HubTarget(hub.endpoint, LOCAL_ENDPOINT, api, local_token, local_hub=hub)
        return
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(
            f"no Hugging Face token for {endpoint}: set HF_TOKEN or run `hf auth login`, then rerun "
            "(or publish to the embedded hub with --endpoint local)"
        )
    yield HubTarget(endpoint, endpoint, HfApi(endpoint=endpoint, token=token), token)


def check_write_access(target: HubTarget, namespace: str) -> str:
    """Check with ``whoami`` that the token is valid and may write to ``namespace``; returns the user name.

    Raises:
        HubError: the token is missing, rejected, read-only, or its user cannot write to the namespace.
    """
    try:
        info = reading(lambda: target.api.whoami(token=target.token))
    except LocalTokenNotFoundError:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun") from None
    except HfHubHTTPError as error:
        if status_of(error) == 401:
            raise HubError(
                f"the Hugging Face token was rejected by {target.endpoint} (invalid or expired): "
                "set HF_TOKEN to a valid token with the 'write' role or run `hf auth login`"
            ) from None
        raise HubError(
            f"cannot check the token with {target.endpoint}: {describe(error, target.token)}"
        ) from None
    except (httpx2.HTTPError, OSError) as error:
        raise HubError(
            f"cannot reach {target.endpoint} ({describe(error, target.token)}): check --endpoint and the network"
        ) from None
    user = info.get("name") or "?"
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(
            f"the token of {user!r} is read-only: create a token with the 'write' role "
            f"({target.endpoint}/settings/tokens) and set HF_TOKEN to it"
        )
    writable = {user} | {
        org.get("name") for org in info.get("orgs") or [] if org.get("roleInOrg", "write") in WRITE_ROLES
    }
    if namespace not in writable:
        raise HubError(
            f"user {user!r} cannot write to namespace {namespace!r} on {target.endpoint}: pass "
            f"--namespace {user} or ask an admin of {namespace!r} for the 'write' role"
        )
    target.user = user
    return user
