"""Fault injection: make the next N requests of a route fail, stall or lose their connection.

A status fault answers instead of serving (nothing is written), unless ``served``: then the request is served
and its answer replaced by the status, as when the Hub fails after writing. A dropped connection is always
served first.

A plan is a list of rules; each request takes the first rule whose method and path regex match and that still
has uses left. Rules can be given at start (``FaultPlan([...])``, as ``Fault`` objects or plain dicts) and
added to a running hub (``hub.faults.add(...)``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field


@dataclass
class Fault:
    """One rule. ``path`` is a regex searched in the raw request path (no query string)."""

    method: str = "*"
    path: str = ".*"
    times: int = 1
    status: int | None = None  # answer this status instead of serving (500, 503, 429, ...)
    retry_after: int | None = None  # seconds, sent as Retry-After (429/503)
    drop: bool = False  # send the headers and half the body, then close the connection
    served: bool = False  # with a status: serve the request first (the write lands), then answer the status
    delay: float = 0.0  # seconds to wait before answering
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.status is None and not self.drop and not self.delay:
            raise ValueError("a Fault needs a status, drop=True or a delay, otherwise it does nothing")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"a Fault status must be an HTTP error (400-599), got {self.status}")
        if self.served and self.status is None:
            raise ValueError("a served Fault needs the status it answers after serving")
        self._regex = re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method.upper()) and self._regex.search(path) is not None


class FaultPlan:
    """Thread-safe list of fault rules consumed by the server."""

    def __init__(self, rules: list[Fault | dict] | None = None):
        self._lock = threading.Lock()
        self.rules: list[Fault] = []
        for rule in rules or []:
            if isinstance(rule, dict):
                self.add(**rule)
            else:
                self._append(rule)

    def _append(self, rule: Fault) -> Fault:
        with self._lock:
            self.rules.append(rule)
        return rule

    def add(self, method: str = "*", path: str = ".*", **options) -> Fault:
        """Add a rule, e.g. ``add("POST", r"/commit/", status=503, times=2)``; returns it (its ``hits`` count)."""
        return self._append(Fault(method=method.upper(), path=path, **options))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The rule that applies to this request, with one use consumed; None if no rule applies."""
        with self._lock:
            for rule in self.rules:
                if rule.hits < rule.times and rule.matches(method, path):
                    rule.hits += 1
                    return rule
        return None

    def pending(self) -> int:
        """How many injected faults have not fired yet."""
        with self._lock:
            return sum(rule.times - rule.hits for rule in self.rules)
