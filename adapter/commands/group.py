"""``powerplane group``: security groups, the allow rules of who may connect to a container.

create/rm a group, add and remove its rules, list and inspect groups, and ``check`` whether a
new connection between two containers would be let through (and by which rule).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections.abc import Mapping, Sequence
from typing import Any

from adapter.commands.network import format_table
from adapter.errors import BadRequest
from adapter.groups import (
    PROTOCOLS,
    Group,
    GroupRule,
    Peer,
    check_connection,
    connection_key,
    parse_check_port,
)
from adapter.model import Endpoint, quoted
from adapter.network.state import State
from adapter.settings import CONSUL_OPTIONS, add_options, load_settings

DESCRIPTION = """\
Security groups decide who may open a connection to a container. A container joins groups when
it is created, with -e SOCKETPLANE_GROUPS=web,admin (the groups must exist). A container in no
group accepts everything its network sends it. A container in groups accepts a new connection
only when a rule of one of its groups allows it; rules only allow. Replies to allowed
connections, and everything a container opens itself, always pass: the switch tracks
connections.
"""

RULE_HELP = """\
A rule allows new connections of one protocol (tcp, udp, icmp or any), to a port or port range
(tcp and udp only; all ports without --port), from a source: an IPv4 CIDR, the members of a
group (group:NAME) or every container of a network (network:NAME). The group or network named
must exist.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "group", help="security groups: who may connect to a container",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser(
        "create", help="create an empty group (it allows nothing yet)",
        description="Create a security group without rules. A container in it accepts no new "
                    "connection until a rule allows one: add rules with `group rule add`.")
    create.add_argument("name", metavar="NAME", help="[a-zA-Z0-9][a-zA-Z0-9_.-]*")
    create.set_defaults(handler=_create)

    rule = actions.add_parser("rule", help="add or remove a rule of a group",
                              description=RULE_HELP)
    rule_actions = rule.add_subparsers(dest="rule_action", metavar="ACTION", required=True)
    add = rule_actions.add_parser(
        "add", help="allow connections matching the rule", description=RULE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add.set_defaults(handler=_rule_add)
    remove_rule = rule_actions.add_parser(
        "rm", aliases=["remove"], help="take a rule out (the same arguments as add)",
        description="Remove the rule given by the same arguments it was added with.")
    remove_rule.set_defaults(handler=_rule_remove)
    for command in (add, remove_rule):
        command.add_argument("name", metavar="NAME", help="the group")
        command.add_argument("--proto", required=True, choices=PROTOCOLS, type=str.lower,
                             help="protocol; any also covers icmp")
        command.add_argument("--port", metavar="N[-M]",
                             help="destination port or range, tcp and udp only (default: all)")
        command.add_argument("--from", dest="source", required=True,
                             metavar="CIDR|group:NAME|network:NAME", help="who may connect")

    listing = actions.add_parser("ls", aliases=["list"], help="list groups",
                                 description="List the groups with their rules and number of "
                                             "member containers.")
    listing.set_defaults(handler=_list)
    info = actions.add_parser(
        "info", aliases=["inspect"], help="show a group's rules and members",
        description="Show a group's rules, the containers in it, and the groups whose rules "
                    "name it as a source.")
    info.add_argument("name", metavar="NAME")
    info.set_defaults(handler=_info)
    remove = actions.add_parser(
        "rm", aliases=["remove"], help="remove a group nothing uses",
        description="Remove a group. Refused while a container is in it, and while a rule of "
                    "another group names it (--from group:NAME).")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_remove)

    check = actions.add_parser(
        "check", help="would a new connection from SRC to DST be allowed, and why?",
        description="Tell whether a new connection from SRC to DST would be allowed, by which "
                    "group and rule; or that DST is in no group (it accepts everything); or "
                    "that no rule allows it; or that SRC cannot reach DST at all (different "
                    "networks, not connected). Exit status 0 when allowed, 1 when not.")
    check.add_argument("source", metavar="SRC", help="container name, id (or prefix) or IP")
    check.add_argument("destination", metavar="DST", help="container name, id (or prefix) or IP")
    check.add_argument("port", metavar="PORT", help="80 (tcp), 80/tcp, 53/udp or icmp")
    check.set_defaults(handler=_check)

    for command in (create, add, remove_rule, listing, info, remove, check):
        add_options(command, CONSUL_OPTIONS)
    for command in (listing, info, check):
        command.add_argument("--json", action="store_true", help="print JSON")


def _state(args: argparse.Namespace, environ: Mapping[str, str]) -> State:
    return State(load_settings(args, environ, CONSUL_OPTIONS))


async def _create(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        group = await state.groups.create(args.name)
    finally:
        await state.close()
    print(group.name)
    return 0


def _rule(args: argparse.Namespace) -> GroupRule:
    return GroupRule.parse(args.proto, args.port, args.source)


async def _rule_add(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    rule = _rule(args)  # bad input is refused before Consul is asked
    state = _state(args, environ)
    try:
        _, changed = await state.groups.add_rule(args.name, rule)
    finally:
        await state.close()
    print(f"{args.name}: allow {rule.describe()}" + ("" if changed else " (had it already)"))
    return 0


async def _rule_remove(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    rule = _rule(args)
    state = _state(args, environ)
    try:
        await state.groups.remove_rule(args.name, rule)
    finally:
        await state.close()
    print(f"{args.name}: removed {rule.describe()}")
    return 0


def _members(endpoints: Sequence[Endpoint], name: str) -> list[Endpoint]:
    return [e for e in endpoints if name in e.groups]


def _endpoint_json(endpoint: Endpoint) -> dict[str, Any]:
    return {"container": endpoint.container_id, "name": endpoint.name, "ip": endpoint.ip,
            "network": endpoint.network, "host": endpoint.host,
            "groups": list(endpoint.groups)}


async def _list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        groups = await state.groups.all()
        endpoints = await state.endpoints.all()
    finally:
        await state.close()
    if args.json:
        print(json.dumps([{"name": g.name, **g.to_json(),
                           "members": len(_members(endpoints, g.name))} for g in groups],
                         indent=2))
        return 0
    rows = [[g.name, "; ".join(r.describe() for r in g.rules) or "(allows nothing)",
             str(len(_members(endpoints, g.name)))] for g in groups]
    print(format_table(["NAME", "RULES", "MEMBERS"], rows))
    return 0


async def _info(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        group = await state.groups.get(args.name)
        members = _members(await state.endpoints.all(), group.name)
        referrers = [g.name for g in await state.groups.all() if g.name != group.name and any(
            r.source_kind == "group" and r.source_name == group.name for r in g.rules)]
    finally:
        await state.close()
    if args.json:
        print(json.dumps({"name": group.name, **group.to_json(),
                          "members": [_endpoint_json(e) for e in members],
                          "named_by": referrers}, indent=2))
        return 0
    print(f"Name:      {group.name}\n"
          f"Members:   {len(members)}\n"
          f"Named by:  {', '.join(referrers) or '-'}")
    print("\nrules" + ("" if group.rules else ": none (members accept no new connection)"))
    if group.rules:
        print(format_table(["PROTO", "PORTS", "FROM"], [
            [r.proto, _ports(r), r.source] for r in group.rules]))
    if members:
        print()
        print(format_table(["CONTAINER", "NAME", "IP", "NETWORK", "HOST"], [
            [e.container_id[:12], e.name or "-", e.ip, e.network, e.host] for e in members]))
    return 0


def _ports(rule: GroupRule) -> str:
    if rule.ports is None:
        return "all" if rule.proto in ("tcp", "udp", "any") else "-"
    low, high = rule.ports
    return str(low) if low == high else f"{low}-{high}"


async def _remove(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = _state(args, environ)
    try:
        await state.groups.remove(args.name)
    finally:
        await state.close()
    print(args.name)
    return 0


def find_endpoint(endpoints: Sequence[Endpoint], wanted: str) -> Endpoint:
    """The endpoint ``wanted`` names: its container's name, full id, a unique id prefix, or
    its overlay address; BadRequest naming the problem otherwise."""
    text = wanted.strip().lstrip("/")
    try:
        ip = str(ipaddress.IPv4Address(text))
    except ValueError:
        ip = None
    for found in ([e for e in endpoints if e.ip == ip],
                  [e for e in endpoints if e.container_id == text],
                  [e for e in endpoints if e.name == text]):
        if len(found) == 1:
            return found[0]
    prefixed = [e for e in endpoints if text and e.container_id.startswith(text)]
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise BadRequest(f"{quoted(wanted)} is the start of {len(prefixed)} container ids; "
                         "give more of it")
    raise BadRequest(f"no overlay container is named {quoted(wanted)} (by name, id or address)")


def _peer(endpoint: Endpoint) -> Peer:
    return Peer(ip=endpoint.ip, network=endpoint.network, groups=endpoint.groups)


def _label(endpoint: Endpoint) -> str:
    return f"{endpoint.name or endpoint.container_id[:12]} ({endpoint.ip} on {endpoint.network})"


async def _check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    proto, port = parse_check_port(args.port)
    state = _state(args, environ)
    try:
        endpoints = await state.endpoints.all()
        source = find_endpoint(endpoints, args.source)
        destination = find_endpoint(endpoints, args.destination)
        groups: dict[str, Group] = {g.name: g for g in await state.groups.all()}
        pairs = await state.connections.pairs()
    finally:
        await state.close()
    verdict = check_connection(_peer(source), _peer(destination), proto, port, groups=groups,
                               connected=[connection_key(*pair) for pair in pairs])
    if args.json:
        print(json.dumps({
            "source": _endpoint_json(source), "destination": _endpoint_json(destination),
            "proto": proto, "port": port, "allowed": verdict.allowed,
            "outcome": verdict.outcome, "group": verdict.group,
            "rule": verdict.rule.to_json() if verdict.rule else None,
            "reason": verdict.reason}, indent=2))
    else:
        what = f"{proto}/{port}" if port is not None else proto
        print(f"{_label(source)} -> {_label(destination)} {what}: {verdict.reason}")
    return 0 if verdict.allowed else 1
