"""``powerplane network create|list|info|rm|connect|disconnect``: manage the virtual networks
shared by all hosts, and which of them route to each other."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

from adapter.model import NetworkSpec
from adapter.network.state import State
from adapter.settings import CONSUL_OPTIONS, add_options, load_settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "network", help="create, list, inspect and remove networks",
        description="Manage the virtual networks that span every host.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="create a network",
                                description="Create a network shared by every host.")
    create.add_argument("name", metavar="NAME", help="[a-zA-Z0-9][a-zA-Z0-9_.-]*")
    create.add_argument("cidr", metavar="CIDR", help="IPv4 subnet, /8 to /29, e.g. 10.6.0.0/16")
    create.add_argument("--gateway", metavar="IP", help="gateway address (default: first host)")
    create.add_argument("--vni", type=int, metavar="N", help="VXLAN id (default: next free)")
    create.add_argument("--mtu", type=int, metavar="N", help="overlay MTU (default: host's)")
    create.add_argument("--internal", action="store_true",
                        help="no way out: containers reach only their network and its gateway")
    create.set_defaults(handler=_create)

    listing = actions.add_parser("list", aliases=["ls"], help="list networks")
    listing.set_defaults(handler=_list)

    info = actions.add_parser("info", aliases=["inspect"], help="show a network and its endpoints")
    info.add_argument("name", metavar="NAME")
    info.set_defaults(handler=_info)

    remove = actions.add_parser(
        "rm", aliases=["remove"], help="remove a network",
        description="Remove a network. Refused while addresses are allocated in it or while it "
                    "is connected to another network, unless forced.")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--force", "-f", action="store_true",
                        help="remove even while addresses are allocated, and disconnect it")
    remove.set_defaults(handler=_remove)

    connect = actions.add_parser(
        "connect", help="route between two networks",
        description="Let the containers of two networks reach each other (both ways). Security "
                    "groups still apply: a container in groups accepts only what its rules "
                    "allow.")
    disconnect = actions.add_parser(
        "disconnect", help="stop routing between two networks",
        description="Undo `network connect`: the two networks no longer reach each other.")
    for command in (connect, disconnect):
        command.add_argument("first", metavar="A", help="a network")
        command.add_argument("second", metavar="B", help="another network")
    connect.set_defaults(handler=_connect)
    disconnect.set_defaults(handler=_disconnect)

    for command in (create, listing, info, remove, connect, disconnect):
        add_options(command, CONSUL_OPTIONS)
    for command in (listing, info):
        command.add_argument("--json", action="store_true", help="print JSON")


def _state(args: argparse.Namespace, environ: Mapping[str, str]) -> State:
    return State(load_settings(args, environ, CONSUL_OPTIONS))


async def _create(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    spec = NetworkSpec.parse(args.name, args.cidr, gateway=args.gateway, vni=args.vni,
                             mtu=args.mtu, internal=args.internal)
    state = _state(args, environ)
    try:
        network = await state.networks.create(spec)
    finally:
        await state.close()
    print(f"{network.name}: subnet {network.cidr}, gateway {network.gateway}, "
          f"VNI {network.vni}" + (f", MTU {network.mtu}" if network.mtu else "")
          + (", internal" if network.internal else ""))
    return 0


async def _list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        networks = await state.networks.all()
        counts = await state.addresses.counts()
    finally:
        await state.close()
    if args.json:
        print(json.dumps(
            [{**n.to_json(), "addresses": counts.get(n.name, 0)} for n in networks], indent=2
        ))
        return 0
    rows = [
        [n.name, n.cidr, n.gateway, str(n.vni), str(n.mtu or "-"),
         f"{counts.get(n.name, 0)}/{n.capacity}"]
        for n in networks
    ]
    print(format_table(["NAME", "SUBNET", "GATEWAY", "VNI", "MTU", "ADDRESSES"], rows))
    return 0


async def _info(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        network = await state.networks.get(args.name)
        addresses = await state.addresses.of_network(network.name)
        # An address is held by the sandbox; the endpoint record is keyed by the app container
        # and names its sandbox: that is the join.
        by_sandbox = {
            e.sandbox: e for e in await state.endpoints.all() if e.network == network.name
        }
        connected = await state.connections.of_network(network.name)
    finally:
        await state.close()
    # The address records are the truth for what is allocated; endpoints add the app and port.
    members: list[dict[str, Any]] = []
    for ip, record in addresses.items():
        endpoint = by_sandbox.get(record.container)
        if endpoint is not None and endpoint.ip != ip:
            endpoint = None
        members.append({
            "container": endpoint.container_id if endpoint else "",
            "sandbox": record.container, "ip": ip, "mac": record.mac, "host": record.host,
            "port": endpoint.port if endpoint else "",
            # What the DNS server on the gateway answers for it (adapter/network/names.py).
            "names": list(endpoint.dns_names) if endpoint else [],
            "groups": list(endpoint.groups) if endpoint else [],
        })
    if args.json:
        print(json.dumps({**network.to_json(), "connected": connected, "endpoints": members},
                         indent=2))
        return 0
    print(f"Name:      {network.name}\n"
          f"Subnet:    {network.cidr}\n"
          f"Gateway:   {network.gateway}\n"
          f"VNI:       {network.vni}\n"
          f"MTU:       {network.mtu or 'each host: its underlay MTU - 50'}\n"
          f"Egress:    {'none (internal)' if network.internal else 'through each host (NAT)'}\n"
          f"Connected: {', '.join(connected) or '-'}\n"
          f"Addresses: {len(addresses)} of {network.capacity} in use")
    if members:
        print()
        # An address whose app container is not recorded yet (a create in flight) shows its
        # sandbox instead.
        rows = [[m["container"][:12] or f"({m['sandbox'][:12]})", ",".join(m["names"]) or "-",
                 m["ip"], m["mac"], m["host"], m["port"] or "-", ",".join(m["groups"]) or "-"]
                for m in members]
        print(format_table(["CONTAINER", "NAMES", "IP", "MAC", "HOST", "PORT", "GROUPS"], rows))
    return 0


async def _remove(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        await state.networks.delete(args.name, force=args.force)
    finally:
        await state.close()
    print(args.name)
    return 0


async def _connect(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        made = await state.connections.connect(args.first, args.second)
    finally:
        await state.close()
    print(f"{args.first} <-> {args.second}" + ("" if made else " (connected already)"))
    return 0


async def _disconnect(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        await state.connections.disconnect(args.first, args.second)
    finally:
        await state.close()
    print(f"{args.first} </> {args.second}")
    return 0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, like the docker CLI's tables."""
    columns = zip(headers, *rows, strict=False)
    widths = [max(len(str(cell)) for cell in column) for column in columns]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in (headers, *rows)]
    return "\n".join(lines)
