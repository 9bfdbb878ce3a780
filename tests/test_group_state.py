"""Security groups and network connections in a real ``consul agent -dev``: CRUD, races,
refusals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from adapter.errors import (
    GroupConflict,
    GroupNotFound,
    InvalidGroup,
    InvalidNetwork,
    NetworkConflict,
    NetworkNotFound,
)
from adapter.groups import Group, GroupRule
from adapter.model import Endpoint, NetworkSpec
from adapter.network.state import State
from adapter.settings import Settings


@pytest.fixture
async def state(consul_settings: Settings) -> AsyncIterator[State]:
    client = State(consul_settings)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def clients(settings: Settings, count: int) -> AsyncIterator[list[State]]:
    """``count`` States, each with its own connection to Consul, as separate hosts would be."""
    made = [State(settings) for _ in range(count)]
    try:
        yield made
    finally:
        for client in made:
            await client.close()


def rule(proto: str, port: str | None, source: str) -> GroupRule:
    return GroupRule.parse(proto, port, source)


def member(container: str, *groups: str, network: str = "front") -> Endpoint:
    return Endpoint(container_id=container, network=network, ip="10.1.0.9", mac="", host="h1",
                    port="", name=container, groups=groups)


async def test_create_get_list_rules_remove(state: State) -> None:
    """A group is created empty, takes and loses rules, lists, and is gone after rm."""
    assert await state.groups.create("web") == Group("web")
    await state.groups.create("lb")
    http = rule("tcp", "80", "10.0.0.0/8")
    from_lb = rule("tcp", "8000-8100", "group:lb")
    assert await state.groups.add_rule("web", http) == (Group("web", (http,)), True)
    assert await state.groups.add_rule("web", from_lb) == (Group("web", (http, from_lb)), True)
    assert await state.groups.add_rule("web", http) == (Group("web", (http, from_lb)), False)
    assert await state.groups.get("web") == Group("web", (http, from_lb))
    assert await state.groups.all() == [Group("lb"), Group("web", (http, from_lb))]
    assert await state.groups.remove_rule("web", http) == Group("web", (from_lb,))
    with pytest.raises(InvalidGroup, match=r"has no rule tcp/80 from 10\.0\.0\.0/8"):
        await state.groups.remove_rule("web", http)
    await state.groups.remove("web")
    with pytest.raises(GroupNotFound, match="'web' not found"):
        await state.groups.get("web")
    assert await state.groups.all() == [Group("lb")]
    # The record keeps its creation time through rule changes.
    await state.groups.add_rule("lb", rule("icmp", None, "0.0.0.0/0"))
    record, _ = await state.kv.get("groups/lb") or (None, 0)
    assert isinstance(record["created"], float)


async def test_bad_input_changes_nothing(state: State) -> None:
    """Unknown names, duplicates, malformed names and sources: errors naming it, no write."""
    await state.groups.create("web")
    await state.networks.create(NetworkSpec.parse("front", "10.1.0.0/24"))
    before = await state.kv.items("")
    cases: list[tuple[object, type[Exception], str]] = [
        (state.groups.create("web"), GroupConflict, "'web' already exists"),
        (state.groups.create("-web"), InvalidGroup, "invalid group name"),
        (state.groups.create("a/b"), InvalidGroup, "invalid group name"),
        (state.groups.get("nope"), GroupNotFound, "'nope' not found"),
        (state.groups.get("../web"), InvalidGroup, "invalid group name"),
        (state.groups.add_rule("nope", rule("tcp", "80", "10.0.0.0/8")), GroupNotFound,
         "'nope' not found"),
        (state.groups.add_rule("web", rule("tcp", "80", "group:nope")), GroupNotFound,
         "no group 'nope'"),
        (state.groups.add_rule("web", rule("tcp", "80", "network:nope")), NetworkNotFound,
         "no network 'nope'"),
        (state.groups.remove_rule("nope", rule("tcp", "80", "10.0.0.0/8")), GroupNotFound,
         "'nope' not found"),
        (state.groups.remove("nope"), GroupNotFound, "'nope' not found"),
        (state.groups.require(["web", "nope"]), GroupNotFound,
         "'nope' .SOCKETPLANE_GROUPS. does not exist"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            await call  # type: ignore[misc]
    assert await state.kv.items("") == before
    await state.groups.require(["web"])
    await state.groups.add_rule("web", rule("tcp", None, "network:front"))  # both exist


async def test_concurrent_rule_adds_all_land(consul_settings: Settings) -> None:
    """Eight hosts each add a rule to one group at the same moment: all eight rules are in it."""
    async with clients(consul_settings, 8) as hosts:
        await hosts[0].groups.create("web")
        rules = [rule("tcp", str(8000 + n), "10.0.0.0/8") for n in range(8)]
        results = await asyncio.gather(*(host.groups.add_rule("web", r)
                                         for host, r in zip(hosts, rules, strict=True)))
        assert all(changed for _, changed in results)
        assert set((await hosts[0].groups.get("web")).rules) == set(rules)
        # And taken out at the same moment: none is left.
        await asyncio.gather(*(host.groups.remove_rule("web", r)
                               for host, r in zip(hosts, rules, strict=True)))
        assert (await hosts[0].groups.get("web")).rules == ()


async def test_remove_refused_while_a_container_is_in_the_group(state: State) -> None:
    await state.groups.create("web")
    await state.endpoints.put(member("c1", "admin", "web"))
    with pytest.raises(GroupConflict, match=r"'web' is in use by 1 container\(s\): c1"):
        await state.groups.remove("web")
    assert await state.groups.get("web") == Group("web")
    await state.endpoints.delete("c1")
    await state.groups.remove("web")


async def test_remove_refused_while_another_groups_rule_names_it(state: State) -> None:
    await state.groups.create("lb")
    await state.groups.create("web")
    from_lb = rule("tcp", "80", "group:lb")
    await state.groups.add_rule("web", from_lb)
    with pytest.raises(GroupConflict, match=r"named by rules of group\(s\) web \(--from group:lb"):
        await state.groups.remove("lb")
    # A group naming itself (members talk to each other) does not keep it alive.
    await state.groups.add_rule("lb", rule("any", None, "group:lb"))
    await state.groups.remove_rule("web", from_lb)
    await state.groups.remove("lb")


async def test_remove_and_a_rule_naming_the_group_never_both_win(
        consul_settings: Settings) -> None:
    """Removing lb while another host adds "--from group:lb" to web, many times over: either
    the removal loses (lb stays) or the rule add does (no rule names a missing group)."""
    async with clients(consul_settings, 2) as (remover, adder):
        await remover.groups.create("web")
        from_lb = rule("tcp", "80", "group:lb")
        outcomes = set()
        for _ in range(15):
            await remover.groups.create("lb")
            removal, addition = await asyncio.gather(
                remover.groups.remove("lb"), adder.groups.add_rule("web", from_lb),
                return_exceptions=True)
            names = {g.name: g for g in await remover.groups.all()}
            if "lb" not in names:
                assert from_lb not in names["web"].rules, (removal, addition)
                assert isinstance(addition, GroupNotFound), addition
                outcomes.add("removed")
            else:
                assert isinstance(removal, GroupConflict), removal
                assert from_lb in names["web"].rules
                outcomes.add("kept")
                await remover.groups.remove_rule("web", from_lb)
                await remover.groups.remove("lb")
        assert outcomes  # every round ended in one of the two consistent states


async def test_watch_yields_the_groups_now_and_after_a_change(state: State) -> None:
    await state.groups.create("web")
    stream = state.groups.watch()
    try:
        assert await anext(stream) == [Group("web")]
        http = rule("tcp", "80", "10.0.0.0/8")
        await state.groups.add_rule("web", http)
        async with asyncio.timeout(30):
            assert await anext(stream) == [Group("web", (http,))]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_damaged_group_record_is_named(state: State) -> None:
    await state.kv.put("groups/bad", {"rules": {"proto": "tcp"}})
    await state.groups.create("good")
    assert await state.groups.all() == [Group("good")]  # the damaged one is left out
    with pytest.raises(InvalidGroup, match=r"malformed group record .*groups/bad"):
        await state.groups.get("bad")


# -- connections between networks --------------------------------------------------------------

async def networks(state: State, *names: str) -> None:
    for number, name in enumerate(names):
        await state.networks.create(NetworkSpec.parse(name, f"10.{50 + number}.0.0/24"))


async def test_connect_disconnect_pairs(state: State) -> None:
    await networks(state, "front", "back", "ops")
    assert await state.connections.connect("front", "back") is True
    assert await state.connections.connect("back", "front") is False  # the same pair
    assert await state.connections.connect("ops", "front") is True
    assert await state.connections.pairs() == [("back", "front"), ("front", "ops")]
    record, _ = await state.kv.get("connections/back+front") or (None, 0)
    assert record["networks"] == ["back", "front"] and isinstance(record["created"], float)
    assert await state.connections.of_network("front") == ["back", "ops"]
    assert await state.connections.of_network("ops") == ["front"]
    await state.connections.disconnect("front", "back")
    assert await state.connections.pairs() == [("front", "ops")]
    with pytest.raises(NetworkConflict, match="are not connected"):
        await state.connections.disconnect("back", "front")


async def test_connect_refuses_unknown_networks_and_itself(state: State) -> None:
    await networks(state, "front")
    with pytest.raises(NetworkNotFound, match="'nope' not found"):
        await state.connections.connect("front", "nope")
    with pytest.raises(NetworkNotFound, match="'nope' not found"):
        await state.connections.connect("nope", "front")
    with pytest.raises(InvalidNetwork, match="to itself"):
        await state.connections.connect("front", "front")
    with pytest.raises(InvalidNetwork, match="invalid network name"):
        await state.connections.connect("front", "a+b")
    assert await state.connections.pairs() == []


async def test_network_rm_refuses_a_connected_network_unless_forced(state: State) -> None:
    await networks(state, "front", "back", "ops")
    await state.connections.connect("front", "back")
    await state.connections.connect("front", "ops")
    with pytest.raises(NetworkConflict, match="'back' is connected to front; disconnect"):
        await state.networks.delete("back")
    await state.networks.delete("front", force=True)
    assert await state.connections.pairs() == []
    assert [n.name for n in await state.networks.all()] == ["back", "ops"]


async def test_connect_racing_network_rm_leaves_no_dangling_pair(
        consul_settings: Settings) -> None:
    """Connecting a network while another host removes it: never a pair naming a network that
    is gone; exactly one of the two wins each round."""
    async with clients(consul_settings, 2) as (remover, connector):
        await networks(remover, "front")
        for round_number in range(15):
            await remover.networks.create(NetworkSpec.parse("back", "10.60.0.0/24"))
            removal, connection = await asyncio.gather(
                remover.networks.delete("back"), connector.connections.connect("front", "back"),
                return_exceptions=True)
            left = {n.name for n in await remover.networks.all()}
            pairs = await remover.connections.pairs()
            if "back" in left:
                assert isinstance(removal, NetworkConflict), (round_number, removal)
                assert pairs == [("back", "front")]
                await remover.networks.delete("back", force=True)
            else:
                assert pairs == [], (round_number, removal, connection)
                assert isinstance(connection, NetworkNotFound), connection


async def test_connections_watch(state: State) -> None:
    await networks(state, "front", "back")
    stream = state.connections.watch()
    try:
        assert await anext(stream) == []
        await state.connections.connect("front", "back")
        async with asyncio.timeout(30):
            assert await anext(stream) == [("back", "front")]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
