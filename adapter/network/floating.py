"""Floating addresses in Consul: ``floating/<ip>``, one owner each, changed by CAS.

An address is created detached (``powerplane ip create``), attached to one overlay container
(``ip attach``), detached, and removed. Every change is a check-and-set on the record's
ModifyIndex, so two hosts or two users racing for one address end with one winner and a clear
error for the other. The host that runs the attached container answers for the address (see
``adapter.network.floating_host``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from adapter.errors import BadRequest, FloatingIPConflict, FloatingIPNotFound
from adapter.model import Endpoint, FloatingIP, quoted
from adapter.network.addresses import ip_sort_key
from adapter.network.consul_kv import ConsulKV, dump
from adapter.network.watch import watch

log = logging.getLogger(__name__)

FOLDER = "floating/"


def parse_floating_address(value: str, floating_range: str | None) -> str:
    """A floating address someone typed, checked against the cluster's range."""
    if not floating_range:
        raise BadRequest("no floating range is configured: set --floating-range CIDR (or "
                         "POWERPLANE_FLOATING_RANGE) to the block of outside addresses "
                         "Powerplane may hand out, the same on every host")
    pool = ipaddress.IPv4Network(floating_range, strict=False)
    try:
        address = ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise BadRequest(f"invalid floating address {quoted(value)}: expected an IPv4 "
                         "address") from None
    if address not in pool or address in (pool.network_address, pool.broadcast_address):
        raise BadRequest(f"{address} is outside the floating range {pool}")
    return str(address)


class FloatingIPs:
    """The floating addresses of the cluster and who holds them."""

    def __init__(self, kv: ConsulKV) -> None:
        self._kv = kv

    async def create(self, ip: str) -> FloatingIP:
        record = FloatingIP(ip)
        result = await self._kv.txn([self._kv.op("cas", FOLDER + ip, dump(record.to_json()), 0)])
        if not result.ok:
            raise FloatingIPConflict(f"floating address {ip} already exists")
        log.info("created floating address %s", ip)
        return record

    async def get(self, ip: str) -> FloatingIP:
        record, _ = await self._get(ip)
        return record

    async def _get(self, ip: str) -> tuple[FloatingIP, int]:
        found = await self._kv.get(FOLDER + ip)
        if found is None:
            raise FloatingIPNotFound(f"no floating address {ip}: create it with "
                                     f"`powerplane ip create {ip}`")
        try:
            return FloatingIP.from_json(ip, found[0]), found[1]
        except ValueError as exc:
            raise FloatingIPConflict(f"the record of floating address {ip} in Consul is "
                                     f"damaged ({exc}); remove it with `powerplane ip rm "
                                     f"--force {ip}`") from None

    async def all(self) -> list[FloatingIP]:
        return parse_floating(await self._kv.items(FOLDER))

    def watch(self) -> AsyncIterator[list[FloatingIP]]:
        """The list now and after every change (Consul blocking queries)."""
        return watch(self._kv, FOLDER, parse_floating)

    async def attach(self, ip: str, endpoint: Endpoint) -> FloatingIP:
        record, index = await self._get(ip)
        if record.attached and record.container != endpoint.container_id:
            raise FloatingIPConflict(f"floating address {ip} is attached to container "
                                     f"{record.container[:12]}; detach it first")
        attached = FloatingIP(ip, endpoint.container_id, endpoint.host, endpoint.network,
                              endpoint.ip, record.created)
        if attached == record:
            return record
        await self._replace(ip, attached, index)
        log.info("attached floating address %s to %s (%s on %s)", ip,
                 endpoint.container_id[:12], endpoint.ip, endpoint.host)
        return attached

    async def detach(self, ip: str, *, container: str | None = None) -> FloatingIP:
        """Detach ``ip``; with ``container``, only if that container still holds it."""
        record, index = await self._get(ip)
        if not record.attached or (container is not None and record.container != container):
            return record
        detached = FloatingIP(ip, created=record.created)
        await self._replace(ip, detached, index)
        log.info("detached floating address %s from %s", ip, record.container[:12])
        return detached

    async def delete(self, ip: str, *, force: bool = False) -> None:
        found = await self._kv.get(FOLDER + ip)
        if found is None:
            raise FloatingIPNotFound(f"no floating address {ip}")
        value, index = found
        if not force and isinstance(value, Mapping) and value.get("container"):
            raise FloatingIPConflict(f"floating address {ip} is attached to container "
                                     f"{str(value['container'])[:12]}; detach it first "
                                     "(or --force)")
        if not await self._kv.delete_if_unchanged(FOLDER + ip, index):
            raise FloatingIPConflict(f"floating address {ip} changed meanwhile; try again")

    async def _replace(self, ip: str, record: FloatingIP, index: int) -> None:
        result = await self._kv.txn([self._kv.op("cas", FOLDER + ip, dump(record.to_json()),
                                                 index)])
        if not result.ok:
            raise FloatingIPConflict(f"floating address {ip} changed meanwhile; try again")


def parse_floating(items: Mapping[str, Any]) -> list[FloatingIP]:
    """The well-formed floating records of a listing, by address; damaged ones are logged."""
    records = []
    for ip, value in items.items():
        try:
            records.append(FloatingIP.from_json(ip, value))
        except ValueError as exc:
            log.warning("ignoring malformed floating address record %s: %s", quoted(ip), exc)
    return sorted(records, key=lambda r: ip_sort_key(r.ip))
