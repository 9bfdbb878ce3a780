"""Routing between networks, when asked for: ``connections/<A>+<B>``, one key per pair.

    connections/<A>+<B>     {networks: [A, B], created}      A < B; network names hold no '+'

Connecting is symmetric: the key of a pair is its two names sorted, so ``connect A B`` and
``connect B A`` claim the same key, with a create-only write. The same transaction reads both
network records and CAS-bumps ``meta/networks-version``, which every network removal bumps too:
a pair is only stored while both networks exist, and a removal that found a network unconnected
cannot commit after a connection of it. A connected network is not removed (``network rm``
refuses, ``--force`` disconnects it too); see ``adapter.network.networks``. Which packets then
flow between the two networks is the data plane's business: it follows ``pairs``/``watch``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from adapter.errors import InvalidNetwork, NetworkConflict, NetworkNotFound
from adapter.model import quoted, validate_name
from adapter.network.consul_kv import ConsulKV, dump
from adapter.network.watch import watch

# The counter ``adapter.network.networks`` bumps on every creation and removal.
NETWORKS_VERSION_KEY = "meta/networks-version"
CONNECT_ATTEMPTS = 30

log = logging.getLogger(__name__)

FOLDER = "connections/"
SEPARATOR = "+"


def pair_key(first: str, second: str) -> str:
    """The key (under ``connections/``) of a pair, the same whichever order it is named in."""
    low, high = sorted((first, second))
    return f"{low}{SEPARATOR}{high}"


def pair_of_key(key: str) -> tuple[str, str] | None:
    """The two networks a key names, sorted; None for a key that is not a pair."""
    low, plus, high = key.partition(SEPARATOR)
    if not plus or not low or not high or low >= high or SEPARATOR in high or "/" in key:
        return None
    return low, high


def parse_pairs(items: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The connected pairs of a listing of ``connections/``, sorted; stray keys are logged."""
    pairs = []
    for key in items:
        pair = pair_of_key(key)
        if pair is None:
            log.warning("ignoring connection key %s: not NAME+NAME", quoted(key))
            continue
        pairs.append(pair)
    return sorted(pairs)


def connections_of(pairs: list[tuple[str, str]], network: str) -> list[str]:
    """The networks ``network`` is connected to, by name."""
    return sorted({other for pair in pairs if network in pair for other in pair
                   if other != network})


class Connections:
    """Which networks route to each other."""

    def __init__(self, kv: ConsulKV) -> None:
        self._kv = kv

    async def connect(self, first: str, second: str) -> bool:
        """Store that the two networks are connected; False if they were already.

        NetworkNotFound if either does not exist; InvalidNetwork for a network and itself."""
        self._check(first, second)
        key = FOLDER + pair_key(first, second)
        low, high = sorted((first, second))
        record = {"networks": [low, high], "created": time.time()}
        for attempt in range(CONNECT_ATTEMPTS):
            version = await self._kv.get(NETWORKS_VERSION_KEY)
            number = version[0] if version and type(version[0]) is int else 0
            result = await self._kv.txn([
                self._kv.op("cas", NETWORKS_VERSION_KEY, str(number + 1),
                            version[1] if version else 0),
                self._kv.op("get", f"networks/{first}"),
                self._kv.op("get", f"networks/{second}"),
                self._kv.op("cas", key, dump(record), 0),
            ])
            if result.ok:
                log.info("connected networks %s and %s", low, high)
                return True
            for position, name in ((1, first), (2, second)):
                if position in result.failed:
                    raise NetworkNotFound(f"network {quoted(name)} not found")
            if 0 not in result.failed:
                return False  # the pair's key exists: connected already
            await asyncio.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))
        raise NetworkConflict(f"could not connect {first!r} and {second!r}: network state kept "
                              "changing; try again")

    async def disconnect(self, first: str, second: str) -> None:
        """Forget that the two networks are connected; NetworkConflict if they were not."""
        self._check(first, second)
        key = FOLDER + pair_key(first, second)
        found = await self._kv.get(key)
        if found is None:
            raise NetworkConflict(f"networks {first!r} and {second!r} are not connected")
        await self._kv.delete_if_unchanged(key, found[1])
        log.info("disconnected networks %s and %s", *sorted((first, second)))

    async def pairs(self) -> list[tuple[str, str]]:
        """Every connected pair, each sorted, the pairs sorted."""
        return parse_pairs(await self._kv.items(FOLDER))

    async def of_network(self, network: str) -> list[str]:
        return connections_of(await self.pairs(), network)

    def watch(self) -> AsyncIterator[list[tuple[str, str]]]:
        """The pairs now and after every change; rides out Consul outages."""
        return watch(self._kv, FOLDER, parse_pairs)

    @staticmethod
    def _check(first: str, second: str) -> None:
        validate_name(first)
        validate_name(second)
        if first == second:
            raise InvalidNetwork(f"cannot connect network {first!r} to itself: a network's "
                                 "containers reach each other already")
