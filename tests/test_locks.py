"""KeyedLocks: mutual exclusion per key, and no lock left behind once nobody uses it."""

from __future__ import annotations

import asyncio

from adapter.network.locks import KeyedLocks


async def test_one_key_is_held_by_one_coroutine_at_a_time() -> None:
    """Ten coroutines on one key never overlap; other keys run beside them."""
    locks = KeyedLocks()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}

    async def work(key: str) -> None:
        async with locks.hold(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            await asyncio.sleep(0.001)
            inside[key] -= 1

    await asyncio.gather(*(work(key) for key in "ab" * 10))
    assert most == {"a": 1, "b": 1}
    assert len(locks) == 0


async def test_a_waiter_keeps_the_lock_until_it_is_done() -> None:
    """While one holds and another waits, the entry stays; both done, it is gone."""
    locks = KeyedLocks()
    release = asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with locks.hold("k"):
            order.append("first in")
            await release.wait()
            order.append("first out")

    async def second() -> None:
        async with locks.hold("k"):
            order.append("second in")

    one = asyncio.create_task(first())
    await asyncio.sleep(0)
    two = asyncio.create_task(second())
    await asyncio.sleep(0.01)
    assert order == ["first in"] and len(locks) == 1
    release.set()
    await asyncio.gather(one, two)
    assert order == ["first in", "first out", "second in"]
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_no_entry() -> None:
    """A waiter cancelled before it gets the lock does not leak its count."""
    locks = KeyedLocks()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("k"):
            raise AssertionError("a cancelled waiter got the lock")

    held = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    release.set()
    await held
    assert len(locks) == 0
