"""Which parts of this host are up, for the log, systemd, ``status`` and waiting callers.

``serve`` is ready only when every part is: its listeners, its Consul session and its data plane.
A caller that needs one part (a create needs the data plane) waits for that part, bounded, and
gets an error naming what is still not up, never an early refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from adapter.errors import NotReady

log = logging.getLogger(__name__)

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
        # Facts learnt while coming up that `status` shows (e.g. the overlay MTU in use).
        self.details: dict[str, Any] = {}
        self.was_ready = False  # every part has been up at least once

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

    def mark_up(self, part: str, **details: Any) -> None:
        self.details.update(details)
        event = self._events[part]
        if event.is_set():
            return
        event.set()
        self.waiting_reasons.pop(part, None)
        self._notify()

    def set_details(self, **details: Any) -> None:
        """Facts that changed while running (what the DNS server listens on); observers hear."""
        if any(self.details.get(key) != value for key, value in details.items()):
            self.details.update(details)
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

    @property
    def state(self) -> str:
        """``ready``; ``starting`` until it first was; ``degraded`` when a part went down since."""
        if self.ready:
            return "ready"
        return "degraded" if self.was_ready else "starting"

    def _notify(self) -> None:
        self.was_ready = self.was_ready or self.ready
        for observer in self._observers:
            observer(self)


class StatusFile:
    """``serve``'s readiness as a small JSON file that ``powerplane status`` reads.

    Written whole and renamed into place, so a reader never sees half of it; removed when serve
    stops. The writes are a few hundred bytes to tmpfs, a handful per process life: done inline.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, readiness: Readiness) -> None:
        document = {
            "pid": os.getpid(),
            "state": readiness.state,
            "waiting_for": {part: readiness.waiting_reasons.get(part, "starting")
                            for part in readiness.pending()},
            **readiness.details,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            partial.write_text(json.dumps(document) + "\n")
            partial.replace(self.path)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror or exc)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def read(self) -> dict[str, Any] | None:
        """The document of a serve that is still running, else None."""
        try:
            document = json.loads(self.path.read_text())
            pid = int(document["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a serve that died without cleaning up
        except PermissionError:
            pass
        return document if isinstance(document, dict) else None
