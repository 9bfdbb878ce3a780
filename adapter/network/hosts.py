"""The host registry: ``hosts/<host-id>`` held by a Consul session with a TTL.

A host that dies drops out by itself: Consul deletes its key once the session expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from adapter.errors import StateError
from adapter.model import Host, quoted
from adapter.network.consul_kv import ConsulKV
from adapter.network.watch import watch
from adapter.settings import Settings

log = logging.getLogger(__name__)

# Consul refuses session TTLs under 10 s and may keep a session up to twice its TTL.
SESSION_TTL_MIN = 10
REGISTER_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Registration:
    """A host's record as Consul holds it: the record (None when damaged), the session holding
    it (None when none does) and whether Consul still knows that session."""

    host: Host | None
    session: str | None
    session_alive: bool


class Hosts:
    """Registration of this host and the list of all of them."""

    def __init__(self, kv: ConsulKV, settings: Settings) -> None:
        self._kv = kv
        self._host_ttl = settings.host_ttl

    async def all(self) -> list[Host]:
        return parse_hosts(await self._kv.items("hosts/"))

    async def registration(self, host_id: str) -> Registration | None:
        """How ``hosts/<host_id>`` stands in Consul; None when there is no such record."""
        key = f"hosts/{host_id}"
        found = await self._kv.get(key)
        if found is None:
            return None
        try:
            host: Host | None = Host.from_json(host_id, found[0])
        except ValueError:
            host = None
        session = await self._kv.holder(key)
        alive = session is not None and await self._kv.session_exists(session)
        return Registration(host, session, alive)

    def watch(self) -> AsyncIterator[list[Host]]:
        """Yield the host list now and after every change; rides out Consul outages."""
        return watch(self._kv, "hosts/", parse_hosts)

    @asynccontextmanager
    async def registered(
        self, host: Host, *, on_registered: Callable[[], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
    ) -> AsyncIterator[None]:
        """Hold ``hosts/<id>`` under a TTL session renewed in the background; drop it on exit.

        We ask Consul for half of ``host_ttl`` because it may wait up to twice a session's TTL
        (minimum 10 s). Consul being down on entry is not an error (``serve`` starts without
        Consul): the background task keeps trying and registers as soon as Consul answers.
        ``on_registered`` is called after every successful registration, ``on_failed`` with the
        reason after every failed attempt.
        """
        ttl = max(SESSION_TTL_MIN, math.ceil(self._host_ttl / 2))
        notify = on_registered or (lambda: None)
        failed = on_failed or (lambda reason: None)
        holder: list[str | None] = [None]
        try:
            holder[0] = await self._register(host, ttl)
            notify()
        except StateError as exc:
            log.warning("host %s: not registered yet, will retry: %s", host.host_id, exc)
            failed(str(exc))
        renewer = asyncio.create_task(self._keep_registered(host, ttl, holder, notify, failed),
                                      name=f"powerplane-register-{host.host_id}")
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            session = holder[0]
            if session is not None:
                try:
                    await self._kv.delete(f"hosts/{host.host_id}")
                    await self._kv.destroy_session(session)
                except StateError as exc:
                    log.warning("could not deregister host %s: %s", host.host_id, exc)

    async def _register(self, host: Host, ttl: int) -> str:
        key = f"hosts/{host.host_id}"
        session = await self._kv.create_session(f"powerplane host {host.host_id}", ttl)
        for _ in range(REGISTER_ATTEMPTS):
            if await self._kv.acquire(key, host.to_json(), session):
                log.info("registered host %s (%s)", host.host_id,
                         host.underlay_ip or "no underlay address")
                return session
            # A previous run of this very host still holds the key: its session is stale.
            stale = await self._kv.holder(key)
            if stale and stale != session:
                log.warning("host %s: taking over the key from stale session %s",
                            host.host_id, stale)
                await self._kv.destroy_session(stale)
        await self._kv.destroy_session(session)
        raise StateError(f"could not register host {host.host_id!r}: its key is held elsewhere")

    async def _keep_registered(self, host: Host, ttl: int, holder: list[str | None],
                               notify: Callable[[], None],
                               failed: Callable[[str], None]) -> None:
        retry = min(1.0, ttl / 3)
        interval = ttl / 3 if holder[0] else retry
        while True:
            await asyncio.sleep(interval)
            try:
                session = holder[0]
                if session is None or not await self._kv.renew_session(session):
                    if session is not None:
                        log.warning("host %s: session expired; registering again",
                                    host.host_id)
                    holder[0] = await self._register(host, ttl)
                # After every success, not only after a new registration: a renewal that
                # failed once (a leader election) marked us down while the session lived on.
                notify()
                interval = ttl / 3
            except StateError as exc:
                log.warning("host %s: cannot renew registration: %s", host.host_id, exc)
                failed(str(exc))
                interval = retry


def parse_hosts(items: Mapping[str, Any]) -> list[Host]:
    """The well-formed host records of a listing, by id; malformed ones are logged."""
    hosts = []
    for host_id, value in items.items():
        try:
            hosts.append(Host.from_json(host_id, value))
        except ValueError as exc:
            log.warning("ignoring malformed host record %s: %s", quoted(host_id), exc)
    return sorted(hosts, key=lambda h: h.host_id)
