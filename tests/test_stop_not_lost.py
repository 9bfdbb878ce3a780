"""Fault injection: serve's stop must never be lost to a change arriving at the same moment.

`serve` sometimes did not exit on SIGTERM (about 1 run in 12 under load): a background loop
waiting for "a change, or the reconcile interval" with ``asyncio.wait_for`` was cancelled in
the same loop iteration as its event was set. Python 3.11's ``wait_for`` then returns the
event's result and drops the cancellation, so the loop waits again and the task group that
stop awaits never ends. Here that interleaving is forced, which a real stop hits only by
chance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapter.network.floating_host import FloatingFollower
from adapter.settings import Settings


class QuietFloating:
    async def watch(self) -> AsyncIterator[list[Any]]:
        await asyncio.Event().wait()
        yield []


class QuietState:
    floating = QuietFloating()


class NoDataPlane:
    async def set_floating(self, floating: Any) -> list[str]:
        return []


async def test_a_cancel_with_the_event_set_in_the_same_tick_stops_the_loop() -> None:
    follower = FloatingFollower(Settings(reconcile_interval=30.0),
                                state=QuietState(),  # type: ignore[arg-type]
                                dataplane=NoDataPlane())
    task = asyncio.create_task(follower._apply_forever())
    for _ in range(5):
        await asyncio.sleep(0)  # into its wait for a change
    follower._changed.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
