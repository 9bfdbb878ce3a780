"""Fault injection: what a watch reads first after Consul failed it.

The fault suite caught a host removing every tunnel after a peer's Consul server came back:
the first listing after the watch's error, a default-mode read answered by a leader still
replaying its log, held no networks. A fake KV stands in for that leader: it answers "empty"
to any read that is not consistent, the way the half-replayed store did by chance.
"""

from __future__ import annotations

import asyncio
from typing import Any

from adapter.errors import StateError
from adapter.network import watch as watch_module
from adapter.network.consul_kv import Listing
from adapter.network.watch import watch

FULL = {"a": {"n": 1}, "b": {"n": 2}}


class ReplayingLeaderKV:
    """Serves FULL to consistent reads and blocking queries, {} to a default-mode plain read;
    the second call fails as an election would."""

    prefix = "powerplane/"

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, bool]] = []
        self.five_calls = asyncio.Event()

    async def wait_for_change(self, folder: str, index: int | None, *,
                              consistent: bool = False) -> Listing:
        self.calls.append((index, consistent))
        if len(self.calls) >= 5:
            self.five_calls.set()
        if len(self.calls) == 2:
            raise StateError("Unexpected response code: 500 (rpc error making call: EOF)")
        if index is None and not consistent:
            return Listing({}, 7)
        if index is not None:
            await asyncio.sleep(0.01)  # a blocking query that times out unchanged
            return Listing(FULL, index)
        return Listing(FULL, 7)


def keys(items: dict[str, Any]) -> list[str]:
    return sorted(items)


async def test_reads_after_an_error_are_consistent(monkeypatch: Any) -> None:
    monkeypatch.setattr(watch_module, "BACKOFF_MIN", 0.0)
    kv = ReplayingLeaderKV()
    seen: list[list[str]] = []

    async def follow() -> None:
        async for value in watch(kv, "networks/", keys):  # type: ignore[arg-type]
            seen.append(value)

    task = asyncio.create_task(follow())
    await asyncio.wait_for(kv.five_calls.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # Never an empty listing: the first read and the one after the error were consistent.
    assert seen == [["a", "b"]]
    assert kv.calls[0] == (None, True)
    assert kv.calls[2] == (None, True)
    assert all(not consistent for index, consistent in kv.calls if index is not None)
