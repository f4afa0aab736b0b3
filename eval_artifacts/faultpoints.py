"""Named crash points for the reliability tests: ``kill -9`` the process at a chosen place in a stage.

``COT_COMPRESS_KILL_AT=<point>`` (or ``<point>#<n>``, the n-th time the point is reached) makes
``maybe_crash(point)`` send SIGKILL to its own process there: no ``finally``, no ``atexit``, no flush, exactly
what an out-of-memory kill or a pre-empted job does. Unset (always, outside tests), it costs one dict lookup.
A point may carry a detail (``maybe_crash("write_json", path.name)``), matched as ``write_json:stats.json``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable

ENV = "COT_COMPRESS_KILL_AT"
_reached: Counter[str] = Counter()


def maybe_crash(point: str, detail: str | None = None, *, before: Callable[[], None] | None = None) -> None:
    """SIGKILL this process if ``$COT_COMPRESS_KILL_AT`` names ``point`` (or ``point:detail``) at this hit.

    ``before`` runs just before the kill, e.g. to leave half a line on disk as a kill inside ``write`` would.
    """
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition("#")
    if name not in (point, f"{point}:{detail}"):
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)
