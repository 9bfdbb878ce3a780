"""Networks in Consul: create (race-free overlap and VNI checks), look up, list, delete, watch.

    networks/<name>            {name, cidr, gateway, vni, mtu, created}
    subnets/<cidr>             network name          (no two networks share a subnet)
    vnis/<vni>                 network name          (VNIs unique)
    meta/networks-version      bumped with CAS by every network creation and removal, and by
                               every connection of two networks (adapter.network.connections)

Every creation bumps ``meta/networks-version`` with CAS in the same transaction that claims the
name, subnet and VNI, so the overlap check can never be raced: a concurrent creation makes our
transaction fail, and we look again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

from adapter.errors import InvalidNetwork, NetworkConflict, NetworkNotFound
from adapter.model import Network, NetworkSpec, quoted
from adapter.network.connections import FOLDER as CONNECTIONS
from adapter.network.connections import connections_of, pair_key, parse_pairs
from adapter.network.consul_kv import ConsulKV, dump, safe_key
from adapter.network.endpoint_records import EndpointRecords
from adapter.network.watch import watch
from adapter.settings import Settings

log = logging.getLogger(__name__)

CREATE_ATTEMPTS = 30
VERSION_KEY = "meta/networks-version"


class Networks:
    """The networks every host shares."""

    def __init__(self, kv: ConsulKV, settings: Settings, endpoints: EndpointRecords) -> None:
        self._kv = kv
        self._vni_range = (settings.vni_min, settings.vni_max)
        self._endpoints = endpoints

    async def create(self, spec: NetworkSpec) -> Network:
        """Create a network; NetworkConflict if its name, subnet (or an overlap) or VNI is taken."""
        for attempt in range(CREATE_ATTEMPTS):
            version = await self._kv.get(VERSION_KEY)
            version_index = version[1] if version else 0
            existing = await self.all()
            claimed_vnis = await self._kv.keys("vnis/")
            network = spec.network(self._choose_vni(spec, existing, claimed_vnis))
            claims = (VERSION_KEY, f"networks/{spec.name}", f"subnets/{network.cidr}",
                      f"vnis/{network.vni}")
            result = await self._kv.txn([
                self._kv.op("cas", claims[0], str(_version_number(version) + 1),
                            version_index),
                self._kv.op("cas", claims[1], dump(network.to_json()), 0),
                self._kv.op("cas", claims[2], spec.name, 0),
                self._kv.op("cas", claims[3], spec.name, 0),
            ])
            if result.ok:
                log.info("created network %s (%s, VNI %d)", spec.name, network.cidr,
                         network.vni)
                return network
            stale = sorted(index for index in result.failed if 0 < index < len(claims))
            if 0 not in result.failed and stale:
                # The version held, so no network was created meanwhile: the key is held by a
                # record the listing could not read (malformed, or left by a removal).
                raise NetworkConflict(
                    f"cannot create network {spec.name!r}: {self._kv.prefix}{claims[stale[0]]} "
                    "in Consul is taken by a record that is not a valid network; remove that "
                    "key or choose another name and subnet")
            # Someone else created a network meanwhile; back off a little and look again.
            await asyncio.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))
        raise NetworkConflict(
            f"could not create network {spec.name!r}: network state kept changing; try again"
        )

    def _choose_vni(self, spec: NetworkSpec, existing: list[Network],
                    claimed: list[str]) -> int:
        used_vnis: dict[int, str] = {}
        for other in existing:
            if other.name == spec.name:
                raise NetworkConflict(f"network {spec.name!r} already exists ({other.cidr})")
            if other.overlaps(spec.subnet):
                raise NetworkConflict(
                    f"subnet {spec.subnet} overlaps network {other.name!r} ({other.cidr})"
                )
            used_vnis[other.vni] = other.name
        # A VNI claimed under vnis/ is taken even when no readable network record holds it.
        unreadable = {int(key) for key in claimed if key.isascii() and key.isdigit()}
        if spec.vni is not None:
            if spec.vni in used_vnis:
                raise NetworkConflict(
                    f"VNI {spec.vni} is already used by network {used_vnis[spec.vni]!r}")
            if spec.vni in unreadable:
                raise NetworkConflict(
                    f"VNI {spec.vni} is claimed in Consul ({self._kv.prefix}vnis/{spec.vni}) "
                    "by no valid network; remove that key or choose another VNI")
            return spec.vni
        low, high = self._vni_range
        for candidate in range(low, high + 1):
            if candidate not in used_vnis and candidate not in unreadable:
                return candidate
        raise NetworkConflict(f"no free VNI left in the range {low}-{high}")

    async def for_subnet(self, subnet: ipaddress.IPv4Network) -> Network:
        """The network of ``subnet`` (SOCKETPLANE_CIDR), created on first use.

        Two hosts asking at once end with one network: the loser of the creation race finds the
        winner's network by its subnet.
        """
        for _ in range(3):
            found = await self._by_subnet(subnet)
            if found is not None:
                return found
            try:
                return await self.create(NetworkSpec.for_subnet(subnet))
            except NetworkConflict:
                found = await self._by_subnet(subnet)
                if found is not None:
                    return found
                raise
        raise NetworkConflict(f"could not find or create the network for {subnet}")

    async def _by_subnet(self, subnet: ipaddress.IPv4Network) -> Network | None:
        name = await self._kv.get_text(f"subnets/{subnet}")
        if name is None:
            return None
        try:
            return await self.get(name)
        except NetworkNotFound:
            return None  # being created or deleted right now

    async def get(self, name: str) -> Network:
        found = await self._kv.get(f"networks/{name}") if safe_key(name) else None
        if found is None:
            raise NetworkNotFound(f"network {quoted(name)} not found")
        try:
            return _network_of_key(name, found[0])
        except ValueError as exc:
            key = f"{self._kv.prefix}networks/{name}"
            raise InvalidNetwork(f"malformed network record {key} in Consul: {exc}; remove it "
                                 f"with `consul kv delete {key}`") from None

    async def all(self) -> list[Network]:
        return parse_networks(await self._kv.items("networks/"))

    def watch(self) -> AsyncIterator[list[Network]]:
        """Yield the network list now and after every change; rides out Consul outages."""
        return watch(self._kv, "networks/", parse_networks)

    async def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a network; refused while it has addresses allocated or is connected to another
        network, unless ``force`` (which also disconnects it)."""
        for attempt in range(CREATE_ATTEMPTS):
            # Read first: a connection made after this read bumps it, and the removal retries.
            version = await self._kv.get(VERSION_KEY)
            network = await self.get(name)
            in_use = await self._kv.keys(f"addresses/{name}/")
            if in_use and not force:
                raise NetworkConflict(
                    f"network {name!r} still has {len(in_use)} address(es) in use; remove its "
                    "containers first or force the removal"
                )
            pairs = [pair for pair in parse_pairs(await self._kv.items(CONNECTIONS))
                     if name in pair]
            if pairs and not force:
                others = connections_of(pairs, name)
                raise NetworkConflict(
                    f"network {name!r} is connected to {', '.join(others)}; disconnect it first "
                    f"(powerplane network disconnect {name} {others[0]}) or force the removal")
            found = await self._kv.get(f"networks/{name}")
            if found is None:
                raise NetworkNotFound(f"network {name!r} vanished while being removed")
            result = await self._kv.txn([
                self._kv.op("cas", VERSION_KEY, str(_version_number(version) + 1),
                            version[1] if version else 0),
                self._kv.op("delete-cas", f"networks/{name}", index=found[1]),
                self._kv.op("delete", f"subnets/{network.cidr}"),
                self._kv.op("delete", f"vnis/{network.vni}"),
                self._kv.op("delete-tree", f"addresses/{name}/"),
                self._kv.op("delete", f"ipam/{name}"),
                *(self._kv.op("delete", CONNECTIONS + pair_key(*pair)) for pair in pairs),
            ])
            if result.ok:
                break
            if 0 not in result.failed:
                raise NetworkConflict(f"network {name!r} changed while being removed; try again")
            await asyncio.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))
        else:
            raise NetworkConflict(f"network {name!r}: network state kept changing while it was "
                                  "being removed; try again")
        if force:
            for endpoint in await self._endpoints.all():
                if endpoint.network == name:
                    await self._endpoints.delete(endpoint.container_id)
        log.info("deleted network %s", name)


def parse_networks(items: Mapping[str, Any]) -> list[Network]:
    """The well-formed network records of a listing, by name; malformed ones are logged."""
    networks = []
    for name, value in items.items():
        try:
            networks.append(_network_of_key(name, value))
        except ValueError as exc:
            log.warning("ignoring malformed network record %s: %s", quoted(name), exc)
    return sorted(networks, key=lambda n: n.name)


def _network_of_key(name: str, value: object) -> Network:
    """The network stored under ``networks/<name>``; ValueError when the record is not one."""
    network = Network.from_json(value)
    if network.name != name:
        raise ValueError(f"it names network {quoted(network.name)}")
    return network


def _version_number(found: tuple[Any, int] | None) -> int:
    """The value of ``meta/networks-version``: a counter only CAS depends on (its index), so a
    damaged value starts again from 0 instead of blocking every creation."""
    value = found[0] if found else 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    log.warning("%s holds %s, not a number; counting again from 0", VERSION_KEY, quoted(value))
    return 0
