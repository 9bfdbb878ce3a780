"""IPAM: each network's addresses in Consul, claimed race-free across hosts.

    addresses/<network>/<ip>   {container, host, mac, created}
    ipam/<network>             next host offset to try (a hint: correctness never depends on it)

Uniqueness is Consul's doing, never ours: every claim is a create-only write (``cas=0``) inside
a transaction that also checks the network still exists, so two hosts asking at the same moment
cannot both win. Next-fit from the hint keeps an allocation at two round trips whatever the
fill level (docs/state.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from adapter.errors import NetworkNotFound, PoolExhausted
from adapter.model import AddressRecord, Network, mac_for_ip, quoted
from adapter.network.consul_kv import ConsulKV, dump, safe_key
from adapter.network.locks import KeyedLocks

if TYPE_CHECKING:
    from adapter.metrics import Metrics

log = logging.getLogger(__name__)

# Addresses tried from the hint before falling back to one listing of the network's keys.
HINT_PROBES = 8
# Networks this small are cheaper to list than to probe.
SMALL_NETWORK = 64


class Addresses:
    """Allocation and release of overlay addresses."""

    def __init__(self, kv: ConsulKV, metrics: Metrics | None = None) -> None:
        self._kv = kv
        self._metrics = metrics
        # Allocations for one network from this process go one at a time: contention is then
        # only between hosts, and a burst of local requests costs no failed claims.
        self._allocation_locks = KeyedLocks()

    async def allocate(self, network: Network, *, container: str, host: str) -> str:
        """Claim a free address of ``network`` for ``container``; PoolExhausted when none is left.

        Only after ``HINT_PROBES`` taken addresses in a row does it list the network's keys, once.
        """
        async with self._allocation_locks.hold(network.name):
            ip = await self._allocate(network, container, host)
        if self._metrics is not None:
            self._metrics.address_allocated(network.name)
        return ip

    async def _allocate(self, network: Network, container: str, host: str) -> str:
        if network.capacity > SMALL_NETWORK:
            hint = await self._hint(network)
            for step in range(HINT_PROBES):
                offset = (hint + step) % network.size
                ip = network.host_address(offset)
                if ip == network.gateway:
                    continue
                if await self._claim(network, ip, offset, container, host):
                    return ip
        return await self._claim_from_listing(network, container, host)

    async def _hint(self, network: Network) -> int:
        # Only a hint: a stale one costs a failed claim, never a wrong one.
        text = await self._kv.get_text(f"ipam/{network.name}", consistent=False)
        try:
            return int(text) % network.size if text else 0
        except ValueError:
            return 0

    async def _claim(
        self, network: Network, ip: str, offset: int, container: str, host: str
    ) -> bool:
        record = AddressRecord(ip=ip, container=container, host=host, mac=mac_for_ip(ip))
        result = await self._kv.txn([
            self._kv.op("get", f"networks/{network.name}"),
            self._kv.op("cas", f"addresses/{network.name}/{ip}", dump(record.to_json()), 0),
            self._kv.op("set", f"ipam/{network.name}", str((offset + 1) % network.size)),
        ])
        if 0 in result.failed:
            # Consul's own words say which check failed: a missing network, or something else.
            raise NetworkNotFound(f"network {network.name!r} not found while claiming {ip} "
                                  f"(Consul: {result.failed[0] or 'no reason given'})")
        if not result.ok and self._metrics is not None:
            self._metrics.address_conflict(network.name)
        return result.ok

    async def _claim_from_listing(self, network: Network, container: str, host: str) -> str:
        taken = set(await self._kv.keys(f"addresses/{network.name}/"))
        start = await self._hint(network)
        for ip in network.assignable(start):
            if ip in taken:
                continue
            if await self._claim(network, ip, network.host_offset(ip), container, host):
                return ip
        if self._metrics is not None:
            self._metrics.pool_exhausted(network.name)
        raise PoolExhausted(
            f"network {network.name!r} ({network.cidr}) has no free address: all "
            f"{network.capacity} are allocated"
        )

    async def release(self, network: str, ip: str) -> None:
        """Free an address; releasing a free address is not an error."""
        if safe_key(network) and safe_key(ip):
            await self._kv.delete(f"addresses/{network}/{ip}")
            if self._metrics is not None:
                self._metrics.address_released(network)

    async def release_if_owned(self, network: str, ip: str, owner: str) -> bool:
        """Free ``ip`` only while ``owner`` holds it: one read, then a delete checked against
        that read's index, so an address handed to someone else meanwhile stays theirs."""
        if not (safe_key(network) and safe_key(ip)):
            return False
        key = f"addresses/{network}/{ip}"
        found = await self._kv.get(key)
        record = None if found is None else _address_record(network, ip, found[0])
        if found is None or record is None or record.container != owner:
            return False
        released = await self._kv.delete_if_unchanged(key, found[1])
        if released and self._metrics is not None:
            self._metrics.address_released(network)
        return released

    async def of_network(self, network: str) -> dict[str, AddressRecord]:
        """Every allocated address of ``network`` with its holder, in address order."""
        items = await self._kv.items(f"addresses/{network}/")
        return {
            ip: record
            for ip, value in sorted(items.items(), key=lambda kv: ip_sort_key(kv[0]))
            if (record := _address_record(network, ip, value)) is not None
        }

    async def held_by(self, host: str) -> list[tuple[str, AddressRecord]]:
        """Every address record naming ``host``, as (network, record), from one listing."""
        found: list[tuple[str, AddressRecord]] = []
        for key, value in (await self._kv.items("addresses/")).items():
            network, _, ip = key.partition("/")
            record = _address_record(network, ip, value) if ip else None
            if record is not None and record.host == host:
                found.append((network, record))
        return sorted(found, key=lambda item: (item[0], ip_sort_key(item[1].ip)))

    async def counts(self) -> dict[str, int]:
        """How many addresses each network has allocated, from one key listing."""
        counts: dict[str, int] = {}
        for key in await self._kv.keys("addresses/"):
            network, _, ip = key.partition("/")
            if ip:
                counts[network] = counts.get(network, 0) + 1
        return counts


def _address_record(network: str, ip: str, value: object) -> AddressRecord | None:
    try:
        return AddressRecord.from_json(ip, value)
    except ValueError as exc:
        log.warning("ignoring malformed address record %s of network %s: %s", quoted(ip),
                    quoted(network), exc)
        return None


def ip_sort_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(octet) for octet in ip.split("."))
    except ValueError:
        return (1 << 32,)
