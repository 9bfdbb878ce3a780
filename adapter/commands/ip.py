"""``powerplane ip create|attach|detach|ls|rm``: floating addresses, reachable from outside."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

from adapter.commands.network import format_table
from adapter.errors import FloatingIPNotFound, UpstreamError
from adapter.model import Endpoint
from adapter.network.docker_api import Docker
from adapter.network.floating import parse_floating_address
from adapter.network.state import State
from adapter.settings import (
    CONSUL_OPTIONS,
    FLOATING_RANGE,
    Option,
    Settings,
    add_options,
    load_settings,
)

DOCKER_OPTION = Option("docker_url", "--docker", "this host's Docker daemon, to find a container "
                       "by name (default unix:///var/run/docker.sock)", metavar="URL")
OPTIONS = (*CONSUL_OPTIONS, FLOATING_RANGE, DOCKER_OPTION)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ip", help="floating IPs: outside addresses that follow a container",
        description="Floating IPs: addresses of the underlay's outside range (--floating-range) "
                    "that reach one overlay container, 1:1 both ways, on whichever host runs "
                    "it. Attach to a container on another host and the address moves there.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="claim a floating address")
    create.add_argument("address", metavar="ADDRESS", help="an address inside --floating-range")
    create.set_defaults(handler=_create)
    attach = actions.add_parser("attach", help="attach an address to an overlay container")
    attach.add_argument("address", metavar="ADDRESS")
    attach.add_argument("container", metavar="CONTAINER",
                        help="name or id (a name is looked up on this host's Docker)")
    attach.set_defaults(handler=_attach)
    detach = actions.add_parser("detach", help="detach an address from its container")
    detach.add_argument("address", metavar="ADDRESS")
    detach.set_defaults(handler=_detach)
    listing = actions.add_parser("ls", aliases=["list"], help="list floating addresses")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)
    remove = actions.add_parser("rm", aliases=["remove"], help="release a floating address")
    remove.add_argument("address", metavar="ADDRESS")
    remove.add_argument("--force", "-f", action="store_true", help="even while attached")
    remove.set_defaults(handler=_remove)
    for command in (create, attach, detach, listing, remove):
        add_options(command, OPTIONS)


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    return load_settings(args, environ, OPTIONS)


async def _create(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = _settings(args, environ)
    address = parse_floating_address(args.address, settings.floating_range)
    state = State(settings)
    try:
        await state.floating.create(address)
    finally:
        await state.close()
    print(address)
    return 0


async def _attach(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = _settings(args, environ)
    address = parse_floating_address(args.address, settings.floating_range)
    state = State(settings)
    try:
        endpoint = await _endpoint_of(state, settings, args.container)
        await state.floating.attach(address, endpoint)
    finally:
        await state.close()
    print(f"{address} -> {endpoint.container_id[:12]} ({endpoint.ip} on {endpoint.network}, "
          f"host {endpoint.host})")
    return 0


async def _endpoint_of(state: State, settings: Settings, container: str) -> Endpoint:
    """The overlay endpoint of ``container``: this host's Docker resolves names; an id (or a
    unique prefix of one) of a container on any host is found in Consul."""
    docker = Docker(settings.docker_url)
    try:
        info = await docker.inspect(container)
    except UpstreamError:
        info = None  # no Docker here (a workstation): ids still resolve through Consul
    finally:
        await docker.close()
    endpoints = await state.endpoints.all()
    if info is not None:
        found = [e for e in endpoints if e.container_id == info.get("Id")]
    else:
        found = [e for e in endpoints if len(container) >= 4
                 and e.container_id.startswith(container.lower())]
    if len(found) == 1:
        return found[0]
    if not found:
        raise FloatingIPNotFound(f"no overlay container {container!r}: a floating address "
                                 "attaches to a container on a Powerplane network")
    raise FloatingIPNotFound(f"{container!r} matches {len(found)} containers; give more of "
                             "the id")


async def _detach(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = _settings(args, environ)
    state = State(settings)
    try:
        record = await state.floating.get(args.address.strip())
        await state.floating.detach(record.ip)
    finally:
        await state.close()
    print(record.ip)
    return 0


async def _list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = State(_settings(args, environ))
    try:
        records = await state.floating.all()
    finally:
        await state.close()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    rows = [[r.ip, r.container[:12] or "-", r.container_ip or "-", r.network or "-",
             r.host or "-"] for r in records]
    print(format_table(["ADDRESS", "CONTAINER", "CONTAINER IP", "NETWORK", "HOST"], rows))
    return 0


async def _remove(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = State(_settings(args, environ))
    try:
        await state.floating.delete(args.address.strip(), force=args.force)
    finally:
        await state.close()
    print(args.address.strip())
    return 0
