"""Hot tasks: a bounded LRU of per-task sessions, filled by a promotion rule in the background.

A serving process answers every request at once from a shared session, which runs any task,
and keeps specialised sessions (:meth:`supsup_deploy.onnx_graphs.sessions.SharedGraph.specialize`)
for the tasks asked for often. The rule: a task becomes hot on its ``hot_after``-th request among
the last ``window`` requests (any task's). Its session is then built by one background thread,
so no request waits for it; requests for the task keep running on the shared session until the
session is ready. At most ``capacity`` sessions are kept: adding one beyond that drops the least
recently used. At most ``capacity`` promotions wait at a time (a task past its count that finds
the queue full is promoted again at a later request), so memory holds at most ``capacity`` hot
sessions plus the one being built.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from supsup_deploy.errors import ConfigError

DEFAULT_HOT_AFTER = 2
DEFAULT_WINDOW = 64


@dataclass(frozen=True)
class HotRule:
    """When a task becomes hot: its ``hot_after``-th request among the last ``window``."""

    capacity: int
    hot_after: int = DEFAULT_HOT_AFTER
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ConfigError(f"hot tasks must be at least 0, got {self.capacity}")
        if not 1 <= self.hot_after <= self.window:
            raise ConfigError(
                f"a task becomes hot after 1 to window ({self.window}) requests, "
                f"got {self.hot_after}"
            )


class HotTasks:
    """The hot sessions of a server, safe to use from several threads.

    Args:
        specialize: builds a task's session (called in the background thread).
        rule: capacity and promotion rule.
        background: build sessions in a background thread (else in the promoting request).
    """

    def __init__(
        self, specialize: Callable[[int], Any], rule: HotRule, *, background: bool = True
    ) -> None:
        self._specialize = specialize
        self.rule = rule
        self._lock = threading.Lock()
        self._sessions: OrderedDict[int, Any] = OrderedDict()
        self._recent: deque[int] = deque()
        self._counts: Counter[int] = Counter()
        self._pending: set[int] = set()
        self.failures: dict[int, str] = {}
        self.built = 0
        self._worker = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="supsup-hot")
            if background and rule.capacity
            else None
        )

    def session(self, task: int) -> Any | None:
        """Count a request for ``task``; its hot session, or None to run it on the shared one."""
        if not self.rule.capacity:
            return None
        with self._lock:
            self._count(task)
            session = self._sessions.get(task)
            if session is not None:
                self._sessions.move_to_end(task)
                return session
            promote = (
                self._counts[task] >= self.rule.hot_after
                and task not in self._pending
                and task not in self.failures
                and len(self._pending) < self.rule.capacity
            )
            if promote:
                self._pending.add(task)
        if promote:
            if self._worker is None:
                self._build(task)
            else:
                self._worker.submit(self._build, task)
        return None

    def _count(self, task: int) -> None:
        self._recent.append(task)
        self._counts[task] += 1
        if len(self._recent) > self.rule.window:
            dropped = self._recent.popleft()
            self._counts[dropped] -= 1
            if not self._counts[dropped]:
                del self._counts[dropped]

    def _build(self, task: int) -> None:
        try:
            session = self._specialize(task)
        except Exception as error:  # a failed build leaves the task on the shared session
            with self._lock:
                self._pending.discard(task)
                self.failures[task] = str(error)
            return
        with self._lock:
            self._pending.discard(task)
            self._sessions[task] = session
            self._sessions.move_to_end(task)
            self.built += 1
            while len(self._sessions) > self.rule.capacity:
                self._sessions.popitem(last=False)

    @property
    def hot(self) -> tuple[int, ...]:
        """The hot tasks, least recently used first."""
        with self._lock:
            return tuple(self._sessions)

    def wait(self) -> None:
        """Block until every promotion asked for so far has its session (or failed)."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()

    def close(self) -> None:
        """Stop the background thread after the builds already queued; drop every session."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        with self._lock:
            self._sessions.clear()
