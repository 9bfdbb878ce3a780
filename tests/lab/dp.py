"""Drive one lab host's data plane from inside its namespace: ``python -m tests.lab.dp OPS``.

OPS is a JSON list of operations run in order; the output is a JSON list of their results.
Operations: plug, unplug, plugged, tunnels, set_tunnels, gateways, set_gateways,
set_published, set_security, flows; in Consul: create_network, create_group, add_rule,
remove_rule.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from typing import Any

from adapter.dataplane.firewall import PublishedPort
from adapter.dataplane.flows import Allow
from adapter.dataplane.switch import DataPlane
from adapter.groups import GroupRule
from adapter.model import Host, Network, NetworkSpec
from adapter.network.security import compile_groups, remote_containers
from adapter.network.state import State
from adapter.settings import CONSUL_OPTIONS, SERVE_OPTIONS, load_settings


async def run(ops: list[dict[str, Any]]) -> list[Any]:
    settings = load_settings(argparse.Namespace(), os.environ, (*SERVE_OPTIONS, *CONSUL_OPTIONS))
    dataplane = DataPlane(settings)
    state = State(settings)
    results: list[Any] = []
    try:
        await dataplane.start()
        # Another process on the agent's switch: it must know the groups the agent enforces,
        # or its own plugs would install flows without them.
        endpoints = await state.endpoints.all()
        await dataplane.set_security(compile_groups(
            await state.groups.all(), endpoints, await state.networks.all()))
        pairs = await state.connections.pairs()
        await dataplane.set_routes(pairs, remote_containers(endpoints, pairs, settings.host_id))
        for op in ops:
            kind = op["op"]
            if kind == "plug":
                port = await dataplane.plug(container_id=op["container_id"], netns=op["netns"],
                                            network=Network.from_json(op["network"]), ip=op["ip"],
                                            groups=op.get("groups", ()))
                results.append(dataclasses.asdict(port))
            elif kind == "unplug":
                await dataplane.unplug(op["container_id"])
                results.append(None)
            elif kind == "plugged":
                results.append([dataclasses.asdict(p) for p in await dataplane.plugged()])
            elif kind == "tunnels":
                results.append([dataclasses.asdict(t) for t in await dataplane.tunnels()])
            elif kind == "set_tunnels":
                change = await dataplane.set_tunnels(
                    [Host.from_json(h["host_id"], h) for h in op["hosts"]],
                    [Network.from_json(n) for n in op["networks"]])
                results.append(dataclasses.asdict(change))
            elif kind == "gateways":
                results.append([dataclasses.asdict(g) for g in await dataplane.gateways()])
            elif kind == "set_gateways":
                results.append(await dataplane.set_gateways(
                    [Network.from_json(n) for n in op["networks"]]))
            elif kind == "set_published":
                results.append(await dataplane.set_published(
                    [PublishedPort(**p) for p in op["ports"]]))
            elif kind == "set_security":
                await dataplane.set_security({
                    group: [Allow(group, a["proto"], tuple(a["ports"]) if a.get("ports") else None,
                                  tuple(a["sources"])) for a in allows]
                    for group, allows in op["allows"].items()})
                results.append(None)
            elif kind in ("create_group", "add_rule", "remove_rule"):
                if kind == "create_group":
                    await state.groups.create(op["name"])
                else:
                    rule = GroupRule.parse(op["proto"], op.get("port"), op["source"])
                    await (state.groups.add_rule(op["name"], rule) if kind == "add_rule"
                           else state.groups.remove_rule(op["name"], rule))
                results.append(None)
            elif kind == "flows":
                results.append(await dataplane.flows())
            elif kind == "create_network":
                network = await state.networks.create(
                    NetworkSpec.parse(op["name"], op["cidr"], vni=op.get("vni")))
                results.append(network.to_json())
            else:
                raise ValueError(f"unknown operation {kind!r}")
    finally:
        await dataplane.close()
        await state.close()
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))))
