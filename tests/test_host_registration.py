"""Fault injection: the host registration's readiness through a failed session renewal.

A Consul leader election makes one renewal fail while the session itself lives on. The full
suite caught a host reported "degraded" for good after that: readiness was marked up again only
when a new session was made, never when the old one simply renewed. A fake KV forces the exact
sequence (register, renew fails once, renew succeeds) that a real cluster produces by chance.
"""

from __future__ import annotations

import asyncio

import pytest

from adapter.errors import StateError
from adapter.model import Host
from adapter.network import hosts as hosts_module
from adapter.network.hosts import Hosts
from adapter.settings import Settings


class FlakyRenewKV:
    """Sessions and one acquire-able key; the ``failures`` first renewals raise StateError."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sessions_created = 0
        self.renewals = 0

    async def create_session(self, name: str, ttl: int) -> str:
        self.sessions_created += 1
        return f"session-{self.sessions_created}"

    async def acquire(self, key: str, value: str, session: str) -> bool:
        return True

    async def renew_session(self, session: str) -> bool:
        self.renewals += 1
        if self.failures:
            self.failures -= 1
            raise StateError("Unexpected response code: 500 (No cluster leader)")
        return True

    async def delete(self, key: str) -> None:
        pass

    async def destroy_session(self, session: str) -> None:
        pass


async def test_readiness_comes_back_when_the_same_session_renews(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts_module, "SESSION_TTL_MIN", 1)
    kv = FlakyRenewKV(failures=1)
    hosts = Hosts(kv, Settings(host_ttl=1))  # type: ignore[arg-type]
    events: list[str] = []
    recovered = asyncio.Event()

    def registered() -> None:
        events.append("up")
        if "down" in events:
            recovered.set()

    async with hosts.registered(Host("h1", "", "box", "0"), on_registered=registered,
                                on_failed=lambda reason: events.append("down")):
        await asyncio.wait_for(recovered.wait(), 10)
    assert events[:3] == ["up", "down", "up"]
    # The session outlived the failed renewal: no second registration was needed.
    assert kv.sessions_created == 1
