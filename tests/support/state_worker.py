"""A stand-in for one host's ``powerplane serve`` talking to Consul, run as its own process.

Tests start it inside a lab namespace (or on loopback) to make several hosts act at the same
moment. It prints one JSON document on stdout when done. Commands:

    allocate NETWORK --count N --tag T [--spread S] [--retry-for S]
        N concurrent allocations for containers T-0 .. T-(N-1), each starting after a random
        delay up to S seconds; Consul outages are retried (as the network hook's caller would)
        until --retry-for seconds have passed. Prints {"allocated": [[container, ip], ...],
        "retries": n, "failed": [message, ...]}.
    network-for-cidr CIDR     prints the network it got.
--go-file F makes a command print {"ready": true} and wait until F exists, so workers race.
    addresses NETWORK         prints {ip: container}.
    register HOST_ID IP --ttl S
        registers and prints {"registered": HOST_ID}, then sleeps until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

from adapter.errors import ConsulUnavailable, PowerplaneError
from adapter.model import Host, parse_cidr
from adapter.network.state import State
from adapter.settings import Settings


def _emit(document: object) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


async def _allocate(state: State, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.retry_for
    retries = 0
    failed: list[str] = []
    allocated: list[list[str]] = []

    async def one(index: int) -> None:
        nonlocal retries
        container = f"{args.tag}-{index}"
        await asyncio.sleep(random.uniform(0.0, args.spread))
        while True:
            try:
                network = await state.networks.get(args.network)
                ip = await state.addresses.allocate(network, container=container, host=args.tag)
            except ConsulUnavailable as exc:
                if time.monotonic() > deadline:
                    failed.append(f"{container}: {exc}")
                    return
                retries += 1
                await asyncio.sleep(0.2)
                continue
            except PowerplaneError as exc:
                failed.append(f"{container}: {type(exc).__name__}: {exc}")
                return
            allocated.append([container, ip])
            return

    await asyncio.gather(*(one(i) for i in range(args.count)))
    # Retries Powerplane made itself through an election count as the outage being seen.
    _emit({"allocated": allocated, "retries": retries + state.kv.retries, "failed": failed})


async def _main(args: argparse.Namespace) -> None:
    settings = Settings(consul_addr=args.consul, consul_prefix=args.prefix,
                        host_ttl=getattr(args, "ttl", 15.0))
    state = State(settings)
    try:
        if args.command == "allocate":
            await _allocate(state, args)
        elif args.command == "network-for-cidr":
            network = await state.networks.for_subnet(parse_cidr(args.cidr)[0])
            _emit(network.to_json())
        elif args.command == "addresses":
            records = await state.addresses.of_network(args.network)
            _emit({ip: record.container for ip, record in records.items()})
        elif args.command == "register":
            host = Host(args.host_id, args.ip, f"host-{args.host_id}", "test")
            async with state.hosts.registered(host):
                _emit({"registered": args.host_id})
                await asyncio.Event().wait()
    finally:
        await state.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--consul", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--go-file", default="",
                        help="print a ready line, then wait until this file exists, so that "
                             "several workers act at the same moment")
    commands = parser.add_subparsers(dest="command", required=True)
    allocate = commands.add_parser("allocate")
    allocate.add_argument("network")
    allocate.add_argument("--count", type=int, required=True)
    allocate.add_argument("--tag", required=True)
    allocate.add_argument("--spread", type=float, default=0.0)
    allocate.add_argument("--retry-for", type=float, default=0.0)
    cidr = commands.add_parser("network-for-cidr")
    cidr.add_argument("cidr")
    addresses = commands.add_parser("addresses")
    addresses.add_argument("network")
    register = commands.add_parser("register")
    register.add_argument("host_id")
    register.add_argument("ip")
    register.add_argument("--ttl", type=float, default=15.0)
    args = parser.parse_args()
    if args.go_file:
        # Everything is imported by now: what is left to do is what the workers race on.
        _emit({"ready": True})
        while not os.path.exists(args.go_file):
            time.sleep(0.01)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
