"""Runs the host firewall in the network namespace this process was started in.

libnftables works in its caller's namespace, so tests start this with ``nsenter --net=...``
instead of switching namespaces inside the test process. Each run is a fresh process: what
``apply`` decides comes from the kernel alone, never from memory of an earlier call.

    python firewall_cli.py apply TABLE     the ruleset as JSON on stdin (``ruleset_json``);
                                           prints "changed" or "unchanged"
    python firewall_cli.py remove TABLE

A ``DataPlaneError`` is printed on stderr with exit status 2.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from adapter.dataplane.firewall import (
    Firewall,
    FloatingAddress,
    GatewayRule,
    PublishedPort,
    Ruleset,
)
from adapter.errors import DataPlaneError


def ruleset_json(ruleset: Ruleset) -> str:
    return json.dumps(dataclasses.asdict(ruleset))


def ruleset_from_json(text: str) -> Ruleset:
    raw = json.loads(text)
    return Ruleset(gateways=tuple(GatewayRule(**item) for item in raw["gateways"]),
                   published=tuple(PublishedPort(**item) for item in raw["published"]),
                   floating=tuple(FloatingAddress(**item) for item in raw["floating"]),
                   connected=tuple((a, b) for a, b in raw.get("connected", ())))


async def run(command: str, table: str) -> str:
    firewall = Firewall(table)
    if command == "apply":
        changed = await firewall.apply(ruleset_from_json(sys.stdin.read()))
        return "changed" if changed else "unchanged"
    await firewall.remove()
    return "removed"


def main() -> int:
    command, table = sys.argv[1], sys.argv[2]
    try:
        print(asyncio.run(run(command, table)))
    except DataPlaneError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
