"""Following a Consul folder with blocking queries, riding out outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from adapter.errors import StateError
from adapter.network.consul_kv import ConsulKV

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0


async def watch(
    kv: ConsulKV, folder: str, parse: Callable[[dict[str, Any]], list[T]]
) -> AsyncIterator[list[T]]:
    """Yield ``parse(folder)`` now and after every change to it, forever.

    While Consul does not answer, nothing is yielded (the last value stands) and the query is
    retried with backoff; an index that goes backwards (a rebuilt cluster) starts over. Every
    start-over reads consistently: after an election, a default-mode answer can come from a
    leader still replaying its log, and an empty folder read then would be acted on as truth.
    """
    index: int | None = None
    last: list[T] | None = None
    backoff = BACKOFF_MIN
    while True:
        try:
            listing = await kv.wait_for_change(folder, index, consistent=index is None)
        except StateError as exc:
            log.warning("watching %s%s: %s; retrying in %.1f s", kv.prefix, folder, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            index = None  # the cluster may have been rebuilt: start over
            continue
        backoff = BACKOFF_MIN
        number = listing.index
        # Consul's rule: an index that goes backwards (or is 0) means start over.
        index = None if number <= 0 or (index is not None and number < index) else number
        value = parse(listing.items)
        if value != last:
            last = value
            yield value
