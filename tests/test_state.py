"""adapter.network.state against a real ``consul agent -dev``: networks, IPAM, endpoints, hosts,
errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from adapter.errors import (
    ConsulAccessDenied,
    ConsulUnavailable,
    InvalidNetwork,
    NetworkConflict,
    NetworkNotFound,
    PoolExhausted,
)
from adapter.model import Endpoint, Host, NetworkSpec, parse_cidr
from adapter.network.state import State
from adapter.settings import Settings
from tests.support.consul import ConsulAgent

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def state(consul_settings: Settings) -> AsyncIterator[State]:
    """A State on a fresh KV prefix of the module's dev agent."""
    client = State(consul_settings)
    try:
        yield client
    finally:
        await client.close()


async def test_create_get_list_delete(state: State) -> None:
    """A created network reads back the same by name and in the list, and is gone after rm."""
    foo = await state.networks.create(NetworkSpec.parse("foo4", "10.6.0.0/16", mtu=1400))
    assert (foo.cidr, foo.gateway, foo.mtu) == ("10.6.0.0/16", "10.6.0.1", 1400)
    bar = await state.networks.create(
        NetworkSpec.parse("bar", "10.7.0.0/24", vni=5000, gateway="10.7.0.254"))
    assert await state.networks.get("foo4") == foo
    assert await state.networks.all() == [bar, foo]
    assert foo.vni == 256 and bar.vni == 5000  # auto VNIs start at the configured minimum
    await state.networks.delete("foo4")
    with pytest.raises(NetworkNotFound, match="'foo4'"):
        await state.networks.get("foo4")
    assert await state.networks.all() == [bar]
    # Name, subnet and VNI are free again.
    again = await state.networks.create(NetworkSpec.parse("foo4", "10.6.0.0/16", vni=256))
    assert again.vni == 256


async def test_invalid_and_conflicting_networks_change_nothing(state: State) -> None:
    """Bad input and clashes raise errors naming the problem, and nothing is created."""
    await state.networks.create(NetworkSpec.parse("foo", "10.6.0.0/16", vni=300))
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"name": "foo", "cidr": "10.99.0.0/24"}, NetworkConflict, "'foo' already exists"),
        ({"name": "inner", "cidr": "10.6.5.0/24"}, NetworkConflict, "overlaps network 'foo'"),
        ({"name": "outer", "cidr": "10.0.0.0/8"}, NetworkConflict, "overlaps network 'foo'"),
        ({"name": "samevni", "cidr": "10.8.0.0/24", "vni": 300}, NetworkConflict,
         "VNI 300 is already used by network 'foo'"),
        ({"name": "-bad", "cidr": "10.8.0.0/24"}, InvalidNetwork, "invalid network name"),
        ({"name": "tiny", "cidr": "10.8.0.0/30"}, InvalidNetwork, "use /8 to /29"),
        ({"name": "v6", "cidr": "fd00::/64"}, InvalidNetwork, "only IPv4"),
        ({"name": "gw", "cidr": "10.8.0.0/24", "gateway": "10.9.0.1"}, InvalidNetwork,
         "inside 10.8.0.0/24"),
        ({"name": "vni", "cidr": "10.8.0.0/24", "vni": 0}, InvalidNetwork, "invalid VNI"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            await state.networks.create(NetworkSpec.parse(**kwargs))  # type: ignore[arg-type]
    assert [n.name for n in await state.networks.all()] == ["foo"]


async def test_slash29_exhausts_and_release_is_idempotent(state: State) -> None:
    """A /29 gives exactly its 5 usable addresses, then PoolExhausted; freed ones come back."""
    small = await state.networks.create(NetworkSpec.parse("small", "10.9.0.0/29"))
    got = [await state.addresses.allocate(small, container=f"c{i}", host="h1") for i in range(5)]
    assert got == [f"10.9.0.{i}" for i in range(2, 7)]
    with pytest.raises(PoolExhausted, match=r"'small' \(10.9.0.0/29\).*all 5"):
        await state.addresses.allocate(small, container="c5", host="h1")
    await state.addresses.release("small", "10.9.0.4")
    await state.addresses.release("small", "10.9.0.4")
    await state.addresses.release("small", "10.9.0.99")
    assert await state.addresses.allocate(small, container="c6", host="h2") == "10.9.0.4"
    records = await state.addresses.of_network("small")
    assert list(records) == got
    assert (records["10.9.0.4"].container, records["10.9.0.4"].host) == ("c6", "h2")
    assert records["10.9.0.4"].mac == "02:42:0a:09:00:04"


async def test_release_if_owned_leaves_a_reassigned_address(state: State) -> None:
    """A late release by the previous owner must not free the address its new owner holds."""
    net = await state.networks.create(NetworkSpec.parse("owned", "10.9.1.0/29"))
    ip = await state.addresses.allocate(net, container="old", host="h1")
    assert await state.addresses.release_if_owned("owned", ip, "old")
    assert not await state.addresses.release_if_owned("owned", ip, "old")  # already free
    assert await state.addresses.allocate(net, container="new", host="h1") != ip  # next-fit
    again = await state.addresses.allocate(net, container="new2", host="h1")
    while again != ip:  # walk round the /29 until the freed address is handed out again
        again = await state.addresses.allocate(net, container="new2", host="h1")
    assert not await state.addresses.release_if_owned("owned", ip, "old")
    assert (await state.addresses.of_network("owned"))[ip].container == "new2"


async def test_first_address_of_a_new_network_is_dot_two(state: State) -> None:
    """Next-fit starts after the gateway, so the first container gets .2 (socketplane habit)."""
    network = await state.networks.for_subnet(parse_cidr("10.0.6.1/24")[0])
    assert network.name == "net-10.0.6.0-24"
    assert await state.addresses.allocate(network, container="web", host="h1") == "10.0.6.2"
    assert await state.addresses.allocate(network, container="b", host="h2") == "10.0.6.3"


async def test_many_states_allocating_concurrently_get_distinct_addresses(
    consul_settings: Settings,
) -> None:
    """Four independent clients x 30 concurrent allocations on one /24: 120 distinct IPs."""
    clients = [State(consul_settings) for _ in range(4)]
    try:
        network = await clients[0].networks.create(NetworkSpec.parse("busy", "10.30.0.0/24"))
        results = await asyncio.gather(*(
            client.addresses.allocate(network, container=f"c{n}-{i}", host=f"h{n}")
            for n, client in enumerate(clients) for i in range(30)
        ))
        assert len(set(results)) == 120
        assert not {"10.30.0.0", "10.30.0.1", "10.30.0.255"} & set(results)
        assert len(await clients[1].addresses.of_network("busy")) == 120
    finally:
        for client in clients:
            await client.close()


async def test_racing_network_for_cidr_creates_one_network(consul_settings: Settings) -> None:
    """Five clients resolving one SOCKETPLANE_CIDR at once all end with the same network."""
    clients = [State(consul_settings) for _ in range(5)]
    try:
        networks = await asyncio.gather(*(
            c.networks.for_subnet(parse_cidr(f"10.40.0.{i + 1}/24")[0])
            for i, c in enumerate(clients)))
        assert len(set(networks)) == 1
        assert len(await clients[0].networks.all()) == 1
        # Overlapping but different subnets from many clients: at most one wins.
        outcome = await asyncio.gather(*(
            c.networks.create(
                NetworkSpec.parse(f"n{i}", f"10.50.{i}.0/24" if i else "10.50.0.0/16"))
            for i, c in enumerate(clients)), return_exceptions=True)
        winners = [o for o in outcome if not isinstance(o, BaseException)]
        losers = [o for o in outcome if isinstance(o, BaseException)]
        assert all(isinstance(o, NetworkConflict) for o in losers)
        subnets = [n.subnet for n in winners]
        assert not any(a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1:])
    finally:
        for client in clients:
            await client.close()


async def test_delete_refused_while_in_use_unless_forced(state: State) -> None:
    """rm refuses a network with addresses; force removes it, its addresses and endpoints."""
    network = await state.networks.create(NetworkSpec.parse("used", "10.10.0.0/24"))
    ip = await state.addresses.allocate(network, container="c1", host="h1")
    await state.endpoints.put(Endpoint("c1", "used", ip, "02:42:0a:0a:00:02", "h1", "ovsc1"))
    with pytest.raises(NetworkConflict, match="'used' still has 1 address"):
        await state.networks.delete("used")
    await state.networks.delete("used", force=True)
    assert await state.addresses.of_network("used") == {}
    assert await state.endpoints.get("c1") is None
    # A client still holding the old Network object cannot allocate in the deleted network.
    with pytest.raises(NetworkNotFound):
        await state.addresses.allocate(network, container="c2", host="h1")
    assert await state.addresses.of_network("used") == {}


async def test_endpoints_round_trip_and_filter_by_host(state: State) -> None:
    """Endpoints are stored per container, listed per host, and deleted idempotently."""
    one = Endpoint("aaa", "foo", "10.6.0.2", "02:42:0a:06:00:02", "h1", "ovsaaa", "sbx1")
    two = Endpoint("bbb", "foo", "10.6.0.3", "02:42:0a:06:00:03", "h2", "ovsbbb")
    await state.endpoints.put(one)
    await state.endpoints.put(two)
    assert await state.endpoints.get("aaa") == one
    assert await state.endpoints.all(host="h2") == [two]
    assert await state.endpoints.all() == [one, two]
    await state.endpoints.delete("aaa")
    await state.endpoints.delete("aaa")
    assert await state.endpoints.get("aaa") is None
    assert await state.endpoints.get("../x") is None


async def test_registered_host_is_listed_and_watched(state: State) -> None:
    """watch_hosts yields at once, then on registration and on deregistration."""
    watch = state.hosts.watch()
    assert await anext(watch) == []
    host = Host("h1", "192.168.50.11", "box1", "0.1.0")
    async with state.hosts.registered(host):
        assert await asyncio.wait_for(anext(watch), 5) == [host]
        assert await state.hosts.all() == [host]
    assert await asyncio.wait_for(anext(watch), 5) == []
    await watch.aclose()


def _hosts_cli(settings: Settings) -> list[dict[str, str]]:
    result = subprocess.run(
        [sys.executable, "-m", "adapter.cli", "hosts", "--json",
         "--consul", settings.consul_addr, "--consul-prefix", settings.consul_prefix],
        capture_output=True, text=True, check=True, timeout=30,
    )
    hosts: list[dict[str, str]] = json.loads(result.stdout)
    return hosts


def test_sigkilled_host_disappears_within_its_ttl(consul_settings: Settings) -> None:
    """A registered process killed with SIGKILL drops out of `powerplane hosts` within host_ttl."""
    ttl = 20.0
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.support.state_worker", "--consul",
         consul_settings.consul_addr, "--prefix", consul_settings.consul_prefix,
         "register", "doomed", "192.168.50.99", "--ttl", str(ttl)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert worker.stdout is not None
        assert json.loads(worker.stdout.readline()) == {"registered": "doomed"}
        assert [h["host_id"] for h in _hosts_cli(consul_settings)] == ["doomed"]
        worker.kill()
        worker.wait()
        killed = time.monotonic()
        while _hosts_cli(consul_settings):
            # Consul drops a session 2 x its TTL after the last renewal; we ask for ttl/2. The
            # margin covers this polling loop's own command runs.
            assert time.monotonic() - killed < ttl + 4, "dead host still listed after its TTL"
            time.sleep(0.25)
    finally:
        worker.kill()
        worker.wait()


async def test_unreachable_consul_fails_fast_naming_the_address() -> None:
    """Nothing listening: ConsulUnavailable at once, naming the address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = State(Settings(consul_addr=f"127.0.0.1:{port}"))
    started = time.monotonic()
    with pytest.raises(ConsulUnavailable, match=f"127.0.0.1:{port}"):
        await client.networks.create(NetworkSpec.parse("x", "10.1.0.0/24"))
    assert time.monotonic() - started < 2
    await client.close()


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_silent_consul_times_out_within_seconds() -> None:
    """A server that accepts but never answers gives ConsulUnavailable in a few seconds."""
    with _silent_listener() as port:
        client = State(Settings(consul_addr=f"127.0.0.1:{port}"))
        started = time.monotonic()
        with pytest.raises(ConsulUnavailable, match="did not answer within"):
            await client.ping()
        assert time.monotonic() - started < 8
        await client.close()


async def test_acl_denied_says_so(tmp_path: Path) -> None:
    """With ACLs on, a missing or wrong token is ConsulAccessDenied; the right one works."""
    agent = ConsulAgent.start_dev(tmp_path, extra_config={
        "acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": "root"}}})
    try:
        for token in (None, "wrong"):
            client = State(Settings(consul_addr=agent.http_addr, consul_token=token))
            with pytest.raises(ConsulAccessDenied, match="ACL token"):
                await client.ping()
            with pytest.raises(ConsulAccessDenied):
                await client.networks.create(NetworkSpec.parse("x", "10.1.0.0/24"))
            await client.close()
        client = State(Settings(consul_addr=agent.http_addr, consul_token="root"))
        await client.ping()
        await client.networks.create(NetworkSpec.parse("x", "10.1.0.0/24"))
        assert [n.name for n in await client.networks.all()] == ["x"]
        await client.close()
    finally:
        agent.kill()


async def test_watch_rides_out_a_consul_restart(tmp_path: Path) -> None:
    """A watch survives its Consul going away and yields again once Consul is back."""
    agent = ConsulAgent.start_dev(tmp_path)
    client = State(Settings(consul_addr=agent.http_addr))
    watch = client.networks.watch()
    try:
        assert await anext(watch) == []
        agent.kill()
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(1.0)  # the watch is now failing and backing off
        assert not pending.done()
        await asyncio.to_thread(agent.start)  # a dev agent comes back empty: recreate state
        writer = State(Settings(consul_addr=agent.http_addr))
        created = await writer.networks.create(NetworkSpec.parse("back", "10.60.0.0/24"))
        await writer.close()
        assert await asyncio.wait_for(pending, 15) == [created]
    finally:
        await watch.aclose()
        await client.close()
        agent.kill()


async def test_registration_waits_for_consul_to_come_up(tmp_path: Path) -> None:
    """Registering while Consul is down does not fail; the host appears once Consul answers."""
    agent = ConsulAgent.start_dev(tmp_path)
    agent.kill()
    client = State(Settings(consul_addr=agent.http_addr))
    host = Host("late", "192.168.50.12", "box2", "0.1.0")
    try:
        async with client.hosts.registered(host):
            await asyncio.to_thread(agent.start)
            deadline = time.monotonic() + 10
            while await client.hosts.all() != [host]:
                assert time.monotonic() < deadline, "host never registered"
                await asyncio.sleep(0.2)
        assert await client.hosts.all() == []
    finally:
        await client.close()
        agent.kill()
