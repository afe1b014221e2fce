"""``StepTimer``: runs named steps, announcing each as it starts and recording its seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

Result = TypeVar("Result")


class StepTimer:
    """Runs named steps and records how long each took.

    Args:
        seconds: where each finished step's wall-clock seconds are recorded, by name.
        announce: optional ``callback(name)`` called as each step starts.
    """

    def __init__(
        self, *, seconds: dict[str, float], announce: Callable[[str], None] | None = None
    ) -> None:
        self.seconds = seconds
        self.announce = announce

    def run(self, name: str, action: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
        """Announce ``name``, call ``action(*args, **kwargs)``, record its seconds, return it."""
        if self.announce:
            self.announce(name)
        started = time.perf_counter()
        value = action(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - started
        return value
