"""Which parts of this host are up, for the log, systemd, ``status`` and waiting callers.

``serve`` is ready only when every part is: its listeners, its Consul session and its data plane.
A caller that needs one part (a create needs the data plane) waits for that part, bounded, and
gets an error naming what is still not up, never an early refusal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from adapter.errors import NotReady

LISTENERS = "listeners"
CONSUL = "consul"
DATAPLANE = "dataplane"


class Readiness:
    """A set of named parts, each either coming up or up; an observer hears every change."""

    def __init__(self, parts: Iterable[str]) -> None:
        self._events = {part: asyncio.Event() for part in parts}
        self._observers: list[Callable[[Readiness], None]] = []
        self._started = time.monotonic()
        self.waiting_reasons: dict[str, str] = {}

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self._events)

    def pending(self) -> list[str]:
        return [part for part, event in self._events.items() if not event.is_set()]

    @property
    def ready(self) -> bool:
        return not self.pending()

    def is_up(self, part: str) -> bool:
        return self._events[part].is_set()

    def observe(self, observer: Callable[[Readiness], None]) -> None:
        self._observers.append(observer)

    def mark_up(self, part: str) -> None:
        event = self._events[part]
        if event.is_set():
            return
        event.set()
        self.waiting_reasons.pop(part, None)
        self._notify()

    def mark_waiting(self, part: str, reason: str) -> None:
        """``part`` is not up (yet, or any more); ``reason`` is what a waiter is told."""
        was_up = self._events[part].is_set()
        self._events[part].clear()
        changed = was_up or self.waiting_reasons.get(part) != reason
        self.waiting_reasons[part] = reason
        if changed:
            self._notify()

    async def wait_for(self, part: str, seconds: float) -> None:
        """Return once ``part`` is up; NotReady naming it (and why) after ``seconds``."""
        event = self._events[part]
        if event.is_set():
            return
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            reason = self.waiting_reasons.get(part)
            raise NotReady(
                f"the {part} of this host is not ready after {seconds:g} s"
                + (f": {reason}" if reason else "")
                + "; see `powerplane status`"
            ) from None

    async def wait_all(self) -> None:
        for event in self._events.values():
            await event.wait()

    def seconds_since_start(self) -> float:
        return time.monotonic() - self._started

    def _notify(self) -> None:
        for observer in self._observers:
            observer(self)
