"""Endpoint records in Consul: ``endpoints/<container-id>``, the record cleanup works from."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from adapter.model import Endpoint, quoted
from adapter.network.addresses import ip_sort_key
from adapter.network.consul_kv import ConsulKV, safe_key
from adapter.network.watch import watch

log = logging.getLogger(__name__)


class EndpointRecords:
    """Which container holds which address on which host and port."""

    def __init__(self, kv: ConsulKV) -> None:
        self._kv = kv

    async def put(self, endpoint: Endpoint) -> None:
        await self._kv.put(f"endpoints/{endpoint.container_id}", endpoint.to_json())

    async def get(self, container_id: str) -> Endpoint | None:
        if not safe_key(container_id):
            return None
        found = await self._kv.get(f"endpoints/{container_id}")
        return None if found is None else _endpoint(container_id, found[0])

    async def delete(self, container_id: str) -> None:
        if safe_key(container_id):
            await self._kv.delete(f"endpoints/{container_id}")

    async def all(self, *, host: str | None = None,
                  consistent: bool = False) -> list[Endpoint]:
        """Every endpoint (of ``host``, if given), by network and address."""
        endpoints = parse_endpoints(await self._kv.items("endpoints/", consistent=consistent))
        return [e for e in endpoints if host is None or e.host == host]

    def watch(self) -> AsyncIterator[list[Endpoint]]:
        """Every endpoint now and after every change; rides out Consul outages."""
        return watch(self._kv, "endpoints/", parse_endpoints)

    async def hosts_holding(self) -> set[str]:
        """The ids of the hosts that Consul records endpoints on."""
        return {endpoint.host for endpoint in await self.all()}


def parse_endpoints(items: dict[str, Any]) -> list[Endpoint]:
    """The endpoints of a listing of ``endpoints/``, by network and address; damaged records
    are left out (and logged)."""
    endpoints = [endpoint for container_id, value in items.items()
                 if (endpoint := _endpoint(container_id, value)) is not None]
    return sorted(endpoints, key=lambda e: (e.network, ip_sort_key(e.ip)))


def _endpoint(container_id: str, data: object) -> Endpoint | None:
    try:
        return Endpoint.from_json(container_id, data)
    except ValueError as exc:
        log.warning("ignoring malformed endpoint record %s: %s", quoted(container_id), exc)
        return None
