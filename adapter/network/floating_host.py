"""This host's side of floating addresses: answer for those attached to containers it runs.

Follows ``floating/`` with Consul blocking queries, so an address attached, detached or moved
anywhere in the cluster is taken up (or let go) here within moments of the change, and applies
the result again every reconcile interval, which puts back what the kernel lost and retries
what failed. While Consul is unreachable the last known list stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Protocol

from adapter.dataplane.firewall import FloatingAddress
from adapter.errors import PowerplaneError
from adapter.model import FloatingIP
from adapter.network.state import State
from adapter.settings import Settings

log = logging.getLogger(__name__)


class FloatingDataPlane(Protocol):
    async def set_floating(self, floating: Iterable[FloatingAddress]) -> list[str]: ...


def addresses_of_host(records: Iterable[FloatingIP], host_id: str) -> list[FloatingAddress]:
    return [FloatingAddress(address=r.ip, container_ip=r.container_ip)
            for r in records if r.attached and r.host == host_id]


class FloatingFollower:
    """Keeps this host's floating addresses what Consul says they are."""

    def __init__(self, settings: Settings, *, state: State,
                 dataplane: FloatingDataPlane) -> None:
        self._settings = settings
        self._state = state
        self._dataplane = dataplane
        self._latest: list[FloatingIP] | None = None
        self._changed = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow())
            tasks.create_task(self._apply_forever())

    async def _follow(self) -> None:
        async for records in self._state.floating.watch():
            self._latest = records
            self._changed.set()

    async def _apply_forever(self) -> None:
        applied: list[FloatingAddress] | None = None
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
            # arrives as the event is set, and serve would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.reconcile_interval):
                    await self._changed.wait()
            self._changed.clear()
            if self._latest is None:
                continue  # Consul has not answered yet: nothing known, nothing to undo
            wanted = addresses_of_host(self._latest, self._settings.host_id)
            try:
                await self._dataplane.set_floating(wanted)
            except PowerplaneError as exc:
                log.warning("floating addresses of this host not in place (%s); retrying", exc)
                continue
            if wanted != applied:
                log.info("floating addresses answered here: %s",
                         ", ".join(f"{f.address}->{f.container_ip}" for f in wanted) or "none")
                applied = wanted
