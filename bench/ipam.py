"""IPAM allocation latency with 10, 1,000 and 10,000 addresses already allocated in a /16.

Runs a private ``consul agent -dev`` on loopback (free ports), fills a /16 network's address
keys to each level, then times ``State.allocate_address`` (each allocation released again so
the fill level stays put). Two fill patterns: *sequential* (what next-fit produces) and
*scattered* (random holes, the hint pointing into them: what long-lived networks look like).
A naive strategy (list every allocated key, pick a free one, claim it) runs side by side as the
baseline that the design avoids. Prints p50/p99 per level and the ratios to the 10-address case.

    /opt/powerplane/bin/python bench/ipam.py [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

LEVELS = (10, 1_000, 10_000)
TXN_OPS = 64


async def _fill(http: str, prefix: str, network: str, ips: list[str], hint: int) -> None:
    """Write address records straight into the KV store, 64 per transaction."""
    record = base64.b64encode(json.dumps({"container": "bench", "host": "bench",
                                          "mac": "", "created": 0}).encode()).decode()
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(ips), TXN_OPS):
            ops = [{"KV": {"Verb": "set", "Key": f"{prefix}addresses/{network}/{ip}",
                           "Value": record}} for ip in ips[start:start + TXN_OPS]]
            async with session.put(f"http://{http}/v1/txn", json=ops) as response:
                response.raise_for_status()
        value = base64.b64encode(str(hint).encode()).decode()
        ops = [{"KV": {"Verb": "set", "Key": f"{prefix}ipam/{network}", "Value": value}}]
        async with session.put(f"http://{http}/v1/txn", json=ops) as response:
            response.raise_for_status()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def _measure(
    allocate: Callable[[str], Awaitable[str]], release: Callable[[str], Awaitable[None]],
    samples: int,
) -> list[float]:
    timings = []
    for i in range(samples):
        started = time.perf_counter()
        ip = await allocate(f"sample-{i}")
        timings.append((time.perf_counter() - started) * 1000)
        await release(ip)
    return timings


async def _run(http: str, samples: int) -> None:
    from adapter.model import Network, NetworkSpec
    from adapter.network.state import State
    from adapter.settings import Settings

    results: dict[tuple[str, str, int], list[float]] = {}
    for pattern in ("sequential", "scattered"):
        for level in LEVELS:
            prefix = f"bench-{pattern}-{level}/"
            state = State(Settings(consul_addr=http, consul_prefix=prefix))
            network = await state.networks.create(NetworkSpec.parse("big", "10.100.0.0/16"))
            candidates = list(network.assignable())
            if pattern == "sequential":
                taken, hint = candidates[:level], level + 1
            else:
                taken = random.sample(candidates, level)
                hint = network.host_offset(random.choice(taken))
            await _fill(http, prefix, "big", taken, hint)

            async def release(ip: str, state: State = state) -> None:
                await state.addresses.release("big", ip)

            async def allocate(
                container: str, state: State = state, network: Network = network
            ) -> str:
                return await state.addresses.allocate(network, container=container, host="bench")

            async def naive(
                container: str, state: State = state, network: Network = network
            ) -> str:
                # Baseline: read every allocated key on each allocation.
                used = set(await state._keys("addresses/big/"))
                for ip in network.assignable():
                    if ip not in used and await state._claim(
                            network, ip, network.host_offset(ip), container, "bench"):
                        return ip
                raise RuntimeError("full")

            results[("next-fit", pattern, level)] = await _measure(allocate, release, samples)
            results[("naive", pattern, level)] = await _measure(naive, release, samples // 3)
            await state.close()

    print(f"{'strategy':<9} {'fill':<11} {'allocated':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p50 / p50@10':>13}")
    for (strategy, pattern, level), timings in results.items():
        base = statistics.median(results[(strategy, pattern, LEVELS[0])])
        p50 = statistics.median(timings)
        print(f"{strategy:<9} {pattern:<11} {level:>9} {p50:>8.2f} "
              f"{_percentile(timings, 0.99):>8.2f} {p50 / base:>12.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    from tests.support.consul import ConsulAgent

    with tempfile.TemporaryDirectory(prefix="bench-ipam-") as workdir:
        agent = ConsulAgent.start_dev(Path(workdir))
        try:
            asyncio.run(_run(agent.http_addr, args.samples))
        finally:
            agent.kill()


if __name__ == "__main__":
    main()
