"""The name cache: names per network from endpoint records, kept current from a real Consul dev
agent, answering from memory while Consul is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from adapter.model import Endpoint
from adapter.network.names import NameCache, index
from adapter.network.state import State
from adapter.settings import Settings
from tests.support.consul import ConsulAgent


def endpoint(container: str, network: str, ip: str, name: str = "", hostname: str = "",
             aliases: tuple[str, ...] = ()) -> Endpoint:
    return Endpoint(container, network, ip, "", "h1", "", "", name=name, hostname=hostname,
                    aliases=aliases)


def test_names_are_per_network_and_case_blind() -> None:
    """Name, hostname and aliases resolve on the endpoint's network only; PTR gives the name."""
    cache = NameCache(lambda: _never())
    cache.replace([
        endpoint("a", "blue", "10.0.6.2", "web", "Web-Host", ("www",)),
        endpoint("b", "blue", "10.0.6.3", "web2", aliases=("www",)),
        endpoint("c", "red", "10.0.7.2", "db"),
        endpoint("d", "red", "10.0.7.3", hostname="0123456789ab"),
        endpoint("e", "red", "10.0.7.4"),  # an old record: no names at all
    ])
    assert cache.addresses("blue", "WEB") == ("10.0.6.2",)
    assert cache.addresses("blue", "web-host") == ("10.0.6.2",)
    assert cache.addresses("blue", "www") == ("10.0.6.2", "10.0.6.3")
    assert cache.addresses("red", "web") == ()
    assert cache.addresses("green", "web") == ()
    assert cache.name_of("blue", "10.0.6.2") == "web"
    assert cache.name_of("red", "10.0.7.3") == "0123456789ab"
    assert cache.name_of("red", "10.0.7.4") is None
    assert cache.name_of("red", "10.0.6.2") is None
    assert cache.records("blue") == 4 and cache.records("red") == 2
    assert index([]) == {}


async def _never() -> AsyncIterator[list[Endpoint]]:
    await asyncio.Event().wait()
    yield []


@pytest.fixture
async def state(consul_settings: Settings) -> AsyncIterator[State]:
    client = State(consul_settings)
    try:
        yield client
    finally:
        await client.close()


async def _until(what: str, check: object, bound: float = 1.0) -> float:
    """Poll ``check()`` until true, at most ``bound`` seconds; how long it took."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < bound, f"{what} not within {bound} s"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def test_cache_follows_consul_and_outlives_it(state: State,
                                                    consul_agent: ConsulAgent) -> None:
    """A record put or deleted in Consul shows within 1 s; with Consul stopped the cache
    keeps answering; after Consul is back, changes show again."""
    cache = NameCache(state.endpoints.watch)
    task = asyncio.create_task(cache.run())
    try:
        await state.endpoints.put(endpoint("a" * 64, "blue", "10.0.6.2", "web"))
        took = await _until("web added", lambda: cache.addresses("blue", "web"))
        print(f"added: {took * 1000:.1f} ms")
        await state.endpoints.put(endpoint("b" * 64, "blue", "10.0.6.3", "db", aliases=("x",)))
        await _until("db added", lambda: cache.addresses("blue", "x") == ("10.0.6.3",))
        await state.endpoints.delete("a" * 64)
        took = await _until("web removed", lambda: not cache.addresses("blue", "web"))
        print(f"removed: {took * 1000:.1f} ms")
        await asyncio.to_thread(consul_agent.stop)
        await asyncio.sleep(1.5)  # the watch has seen the outage by now
        assert cache.addresses("blue", "db") == ("10.0.6.3",)
        assert cache.name_of("blue", "10.0.6.3") == "db"
    finally:
        # Started in a thread: the cache's task goes on meanwhile. A dev agent starts empty.
        await asyncio.to_thread(consul_agent.start)
    try:
        await state.endpoints.put(endpoint("c" * 64, "blue", "10.0.6.4", "back"))
        # The watch retries with backoff (at most 10 s) after the outage.
        await _until("a name after the outage", lambda: cache.addresses("blue", "back"), 15)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
