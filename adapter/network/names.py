"""The names of every overlay endpoint, in memory, kept current from Consul.

The DNS server answers from here and never waits on Consul: ``run`` follows ``endpoints/``
with blocking queries (a change anywhere in the cluster arrives within the query's round
trip), and while Consul does not answer, the last listing stands.

Scope is per network: a name resolves only on the network its endpoint is on, like two Docker
networks. Several endpoints may answer to one name (an alias shared by replicas); all of their
addresses are returned, in address order. The reverse (PTR) name of an address is its
container's name, or its hostname when the container has no name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from adapter.model import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NetworkNames:
    """One network's names: name → addresses, address → name."""

    forward: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reverse: dict[str, str] = field(default_factory=dict)
    endpoints: int = 0


def index(endpoints: Iterable[Endpoint]) -> dict[str, NetworkNames]:
    """Every network's names from a listing of endpoint records."""
    forward: dict[str, dict[str, list[str]]] = {}
    reverse: dict[str, dict[str, str]] = {}
    counts: dict[str, int] = {}
    for endpoint in endpoints:
        network = endpoint.network
        counts[network] = counts.get(network, 0) + 1
        names = endpoint.dns_names
        by_name = forward.setdefault(network, {})
        for name in names:
            addresses = by_name.setdefault(name, [])
            if endpoint.ip not in addresses:
                addresses.append(endpoint.ip)
        if names:
            reverse.setdefault(network, {}).setdefault(endpoint.ip, names[0])
    return {network: NetworkNames(
        forward={name: tuple(ips) for name, ips in forward.get(network, {}).items()},
        reverse=reverse.get(network, {}), endpoints=count)
        for network, count in counts.items()}


class NameCache:
    """Names per network, answered from memory; ``run`` keeps them current."""

    def __init__(self, listings: Callable[[], AsyncIterator[list[Endpoint]]]) -> None:
        # ``listings`` is EndpointRecords.watch: every listing of endpoints/, changes only.
        self._listings = listings
        self._networks: dict[str, NetworkNames] = {}
        self._changed = asyncio.Condition()
        self.generation = 0  # how many listings have been taken in

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        """Answer from this listing from now on."""
        self._networks = index(endpoints)
        self.generation += 1

    async def run(self) -> None:
        async for endpoints in self._listings():
            self.replace(endpoints)
            log.debug("names: %d endpoints on %d networks", len(endpoints),
                      len(self._networks))
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, generation: int) -> None:
        """Return once a listing after ``generation`` has been taken in (for tests, status)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > generation)

    def addresses(self, network: str, name: str) -> tuple[str, ...]:
        """The addresses ``name`` (any case) has on ``network``; () when it has none."""
        names = self._networks.get(network)
        return names.forward.get(name.lower(), ()) if names else ()

    def name_of(self, network: str, ip: str) -> str | None:
        """The name of the endpoint holding ``ip`` on ``network``, for PTR."""
        names = self._networks.get(network)
        return names.reverse.get(ip) if names else None

    def names(self, network: str) -> dict[str, tuple[str, ...]]:
        """Every name of ``network`` with its addresses."""
        names = self._networks.get(network)
        return dict(names.forward) if names else {}

    def records(self, network: str) -> int:
        """How many names ``network`` answers (A record sets)."""
        names = self._networks.get(network)
        return len(names.forward) if names else 0
