"""Security groups and connected networks on this host: what Consul says, kept in the switch.

A group's rules name their sources as CIDRs, as ``network:NAME`` (that network's subnet) or as
``group:NAME`` (the address of every container in that group, on any host). The reconciler
follows the groups, the endpoints and the networks with blocking queries, compiles each group
to addresses, and hands the result to the data plane, which rewrites only the flows that
changed. Who is in a group on *this* host the switch knows itself (each port records its
groups when it is plugged), so a container is guarded from its first packet, before any of
this has run.

Connected networks (``network connect A B``) are routed by the sender's host: the reconciler
also hands the switch the connected pairs and every container of a connected network on another
host (from the same endpoint records), so that the gateway port routing into that network can
reach it down a tunnel.

It acts on a full picture only: until all three lists have been read once, the switch keeps
what it has (and a guarded port plugged meanwhile accepts nothing new). Flows live in
ovs-vswitchd's memory, so a restarted vswitchd is checked for every second and refilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Protocol

from adapter.dataplane.flows import Allow
from adapter.dataplane.switch import RemoteContainer
from adapter.errors import PowerplaneError
from adapter.groups import Group
from adapter.model import Endpoint, Network

log = logging.getLogger(__name__)

CANARY_SECONDS = 1.0  # how often a restarted ovs-vswitchd is looked for (a pidfile read)
STARTUP_GRACE_SECONDS = 5.0


class Follows(Protocol):
    def watch(self) -> AsyncIterator[list[Any]]: ...


class SecuritySwitch(Protocol):
    async def set_security(self, allows: Mapping[str, Iterable[Allow]]) -> None: ...

    async def set_routes(self, connections: Iterable[tuple[str, str]],
                         remote: Iterable[RemoteContainer]) -> None: ...

    async def ensure_flows(self) -> bool: ...


def compile_groups(groups: Iterable[Group], endpoints: Iterable[Endpoint],
                   networks: Iterable[Network]) -> dict[str, tuple[Allow, ...]]:
    """Each group's rules with their sources resolved to IPv4 networks.

    A rule whose source resolves to nothing (an empty group, an unknown network) allows
    nothing, and is left out.
    """
    members: dict[str, list[str]] = {}
    for endpoint in endpoints:
        for name in endpoint.groups:
            members.setdefault(name, []).append(f"{endpoint.ip}/32")
    subnets = {network.name: network.cidr for network in networks}
    compiled: dict[str, tuple[Allow, ...]] = {}
    for group in groups:
        allows: list[Allow] = []
        for rule in group.rules:
            if rule.source_kind == "group":
                sources = tuple(sorted(set(members.get(rule.source_name, ()))))
            elif rule.source_kind == "network":
                subnet = subnets.get(rule.source_name)
                sources = (subnet,) if subnet else ()
            else:
                sources = (rule.source,)
            if sources:
                allows.append(Allow(group.name, rule.proto, rule.ports, sources))
        compiled[group.name] = tuple(allows)
    return compiled


def remote_containers(endpoints: Iterable[Endpoint], connections: Iterable[tuple[str, str]],
                      host_id: str) -> set[RemoteContainer]:
    """The containers on other hosts of every network that is connected to another."""
    connected = {name for pair in connections for name in pair}
    return {RemoteContainer(e.network, e.host, e.ip, e.mac) for e in endpoints
            if e.network in connected and e.host != host_id and e.mac}


class SecurityReconciler:
    """Runs until cancelled: every change to groups, endpoints or networks reaches the switch."""

    def __init__(self, switch: SecuritySwitch, *, host_id: str, groups: Follows,
                 endpoints: Follows, networks: Follows, connections: Follows,
                 interval: float) -> None:
        self._switch = switch
        self._host_id = host_id
        self._sources = {"groups": groups, "endpoints": endpoints, "networks": networks,
                         "connections": connections}
        self._latest: dict[str, Sequence[Any]] = {}
        self._interval = interval
        self._changed = asyncio.Event()
        self._applied: dict[str, tuple[Allow, ...]] | None = None
        self._routed: tuple[frozenset[tuple[str, str]], frozenset[RemoteContainer]] | None = None
        self.applied = asyncio.Event()  # set after each change reached the switch

    async def _follow(self, name: str) -> None:
        async for value in self._sources[name].watch():
            self._latest[name] = value
            self._changed.set()

    async def _canary(self) -> None:
        # Not before the groups are known (or a while has passed without them): flows put in
        # by a serve that ran before are better than ones that know no group.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STARTUP_GRACE_SECONDS):
                await self.applied.wait()
        while True:
            await asyncio.sleep(CANARY_SECONDS)
            try:
                if await self._switch.ensure_flows():
                    log.warning("ovs-vswitchd restarted: port security and group flows "
                                "installed again")
            except PowerplaneError as exc:
                log.warning("checking the flow tables: %s", exc)

    async def apply(self, *, force: bool = False) -> bool:
        """Compile what is known and hand it to the switch if it changed (or if ``force``:
        the switch then puts back flows changed behind its back); False when the picture is
        not complete yet."""
        if len(self._latest) < len(self._sources):
            return False
        compiled = compile_groups(self._latest["groups"], self._latest["endpoints"],
                                  self._latest["networks"])
        if force or compiled != self._applied:
            await self._switch.set_security(compiled)
            if self._applied is not None and compiled != self._applied:
                log.info("security groups: %d groups, %d allow rules in force", len(compiled),
                         sum(len(a) for a in compiled.values()))
            self._applied = compiled
        connections = frozenset(tuple(pair) for pair in self._latest["connections"])
        routed = (connections, frozenset(remote_containers(self._latest["endpoints"],
                                                           connections, self._host_id)))
        if force or routed != self._routed:
            await self._switch.set_routes(*routed)
            if self._routed is None or routed[0] != self._routed[0]:
                log.info("connected networks: %s", ", ".join(
                    f"{a}<->{b}" for a, b in sorted(connections)) or "none")
            self._routed = routed
        return True

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for name in self._sources:
                tasks.create_task(self._follow(name), name=f"powerplane-security-{name}")
            tasks.create_task(self._canary(), name="powerplane-security-canary")
            while True:
                tick = False
                try:
                    async with asyncio.timeout(self._interval):
                        await self._changed.wait()
                except TimeoutError:
                    tick = True  # nothing changed for a while: converge anyway
                self._changed.clear()
                try:
                    if await self.apply(force=tick):
                        self.applied.set()
                except PowerplaneError:
                    log.exception("security groups could not be applied; retrying")
                    await asyncio.sleep(1)
                    self._changed.set()
