"""The host firewall: one nftables table that makes this host a gateway, never a bridge between
overlay networks.

The desired state is a ``Ruleset`` (gateway ports, published ports, floating addresses);
``Firewall.apply`` makes the kernel hold exactly that table. docs/dataplane.md ("Host firewall")
describes the table and why each rule is there.

Every change replaces the whole table in one libnftables batch (add, delete, add it again, then
its sets, chains and rules), so no packet ever meets half a ruleset and a crash leaves the old
table or the new one. The rules themselves never change with the ruleset: only the elements of
named sets and maps, and one DNAT rule per published port, do.

The table's family is ``inet``: the overlay is IPv4, but one ``inet`` table also sees IPv6, so
a container cannot use IPv6 to route around the rules (nothing IPv6 is forwarded from a gateway
port). Base chains have policy accept and match only our gateway interfaces and addresses, so the
host's own firewall and other tables keep working; note that a drop in any table is final, so
another table's forward policy drop (dockerd's iptables) still drops what this table accepts.

libnftables 1.0.6 (Debian 12) reads no table or chain comment from JSON, so the ruleset's
fingerprint is the comment of the one rule in the chain ``fingerprint`` (never jumped to).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapter.dataplane.nft import Command, Nft
from adapter.errors import DataPlaneError

FAMILY = "inet"
FINGERPRINT_CHAIN = "fingerprint"
FINGERPRINT_PREFIX = "ruleset sha256:"
IFNAMSIZ = 16
PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True, slots=True)
class GatewayRule:
    """One overlay network with a gateway port on this host."""

    interface: str  # the gateway port's kernel interface name (<= 15 chars)
    subnet: str  # "10.0.6.0/24"
    gateway: str  # "10.0.6.1"
    egress: bool  # False for `--internal` networks: nothing forwarded out, no SNAT


@dataclass(frozen=True, slots=True)
class PublishedPort:
    """`docker run -p`, one single port (ranges are expanded by the caller)."""

    proto: str  # "tcp" | "udp"
    host_ip: str  # "" = every address of this host
    host_port: int
    container_ip: str
    container_port: int


@dataclass(frozen=True, slots=True)
class FloatingAddress:
    """1:1 NAT of an outside address to a container."""

    address: str
    container_ip: str


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Everything the host firewall holds; empty means no table at all."""

    gateways: tuple[GatewayRule, ...] = ()
    published: tuple[PublishedPort, ...] = ()
    floating: tuple[FloatingAddress, ...] = ()
    # Every overlay subnet of the cluster, with a gateway here or not: never a way out.
    overlays: tuple[str, ...] = ()
    # The name of this host's container ports, as an nft wildcard ("ovs*"): frames a container
    # sends there are the switch's, never the host stack's.
    container_ports: str = ""
    # Gateway interface pairs (in, out) of networks connected with `network connect`: routed
    # both ways, the one exception to "overlay networks never route to each other".
    connected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Summary:
    """What a listing of the table shows, enough to tell whether it still holds a ruleset.

    A table deleted, flushed, or with a chain, rule or element added or taken away by hand
    differs here; a rule edited in place without changing the count does not.
    """

    fingerprint: str | None  # the fingerprint rule's comment
    chains: Mapping[str, tuple[Any, ...]]  # name → (type, hook, prio, policy); () if regular
    rules: Mapping[str, int]  # chain → number of rules
    elements: Mapping[str, int]  # set or map → number of elements


@dataclass(frozen=True, slots=True)
class Rendered:
    """A ruleset as the batch that installs it, and the summary the kernel must then list."""

    commands: tuple[Command, ...]
    summary: Summary


# -- checking the desired state ----------------------------------------------------------------


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise DataPlaneError(f"firewall: {what} {value!r} is not an IPv4 address") from None


def _subnet(rule: GatewayRule) -> ipaddress.IPv4Network:
    name = rule.interface
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name \
            or any(ch.isspace() for ch in name):
        raise DataPlaneError(f"firewall: {name!r} is not an interface name")
    try:
        subnet = ipaddress.IPv4Network(rule.subnet)
    except ValueError:
        raise DataPlaneError(
            f"firewall: subnet {rule.subnet!r} of {name} is not an IPv4 network") from None
    if _ipv4(rule.gateway, f"gateway of {name}") not in subnet:
        raise DataPlaneError(f"firewall: gateway {rule.gateway} of {name} is outside {subnet}")
    return subnet


def _gateways(rules: Iterable[GatewayRule]) -> list[tuple[GatewayRule, ipaddress.IPv4Network]]:
    """The gateway rules by interface name, each with its subnet; overlaps refused."""
    by_name: dict[str, tuple[GatewayRule, ipaddress.IPv4Network]] = {}
    for rule in rules:
        subnet = _subnet(rule)
        if rule.interface in by_name and by_name[rule.interface][0] != rule:
            raise DataPlaneError(f"firewall: two gateway rules for {rule.interface}")
        for other, other_subnet in by_name.values():
            if other.interface != rule.interface and subnet.overlaps(other_subnet):
                raise DataPlaneError(f"firewall: subnet {subnet} of {rule.interface} overlaps "
                                     f"{other_subnet} of {other.interface}")
        by_name[rule.interface] = (rule, subnet)
    return [by_name[name] for name in sorted(by_name)]


def _published(ports: Iterable[PublishedPort]) -> list[PublishedPort]:
    """Published ports, specific host addresses first (they win), one target per port."""
    chosen: dict[tuple[str, str, int], PublishedPort] = {}
    for port in ports:
        if port.proto not in PROTOCOLS:
            raise DataPlaneError(f"firewall: protocol {port.proto!r} cannot be published")
        for number in (port.host_port, port.container_port):
            if not 0 < number < 65536:
                raise DataPlaneError(f"firewall: port {number} is out of range")
        if port.host_ip:
            _ipv4(port.host_ip, "published host address")
        _ipv4(port.container_ip, "published container address")
        key = (port.proto, port.host_ip, port.host_port)
        if key in chosen and chosen[key] != port:
            raise DataPlaneError(f"firewall: {port.proto} {port.host_ip or '*'}:{port.host_port} "
                                 "is published twice")
        chosen[key] = port
    return sorted(chosen.values(), key=lambda p: (p.host_ip == "", p.proto, p.host_ip,
                                                  p.host_port))


def _floating(addresses: Iterable[FloatingAddress]) -> list[FloatingAddress]:
    """Floating addresses by address: one container per address, one address per container."""
    by_address: dict[str, FloatingAddress] = {}
    by_container: dict[str, FloatingAddress] = {}
    for floating in addresses:
        _ipv4(floating.address, "floating address")
        _ipv4(floating.container_ip, "floating address target")
        for index, key in ((by_address, floating.address), (by_container, floating.container_ip)):
            if key in index and index[key] != floating:
                raise DataPlaneError(f"firewall: {floating.address} → {floating.container_ip} "
                                     f"conflicts with {index[key].address} → "
                                     f"{index[key].container_ip}")
            index[key] = floating
    return [by_address[address] for address in sorted(by_address)]


# -- rendering ---------------------------------------------------------------------------------


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _field(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(subnet: ipaddress.IPv4Network) -> dict[str, Any]:
    return {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}


IIF_GATEWAY = _match(_meta("iifname"), "@gateways")
OIF_GATEWAY = _match(_meta("oifname"), "@gateways")
LOCAL_DESTINATION = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
DROP: dict[str, Any] = {"drop": None}
ACCEPT: dict[str, Any] = {"accept": None}
RETURN: dict[str, Any] = {"return": None}

# name → (type, hook, priority) of the base chains; "dnat" is shared by prerouting and output.
BASE_CHAINS: dict[str, tuple[str, str, int]] = {
    "guard": ("filter", "prerouting", -300),  # before conntrack: forged packets leave no trace
    "input": ("filter", "input", 0),
    "forward": ("filter", "forward", 0),
    "prerouting": ("nat", "prerouting", -100),
    "output": ("nat", "output", -100),
    "postrouting": ("nat", "postrouting", 100),
}
REGULAR_CHAINS = ("dnat", FINGERPRINT_CHAIN)


Rule = tuple[str, list[dict[str, Any]], str]  # chain, expression, comment


def _publish_rule(port: PublishedPort) -> Rule:
    where = (_match(_field("ip", "daddr"), port.host_ip) if port.host_ip
             else LOCAL_DESTINATION)
    return ("dnat", [where, _match(_field(port.proto, "dport"), port.host_port),
                     {"dnat": {"family": "ip", "addr": port.container_ip,
                               "port": port.container_port}}],
            f"published {port.proto} {port.host_ip or '*'}:{port.host_port}")


def _rules(published: list[PublishedPort], container_ports: str) -> list[Rule]:
    """Every rule, in order; only the published ports' DNAT rules vary with the ruleset."""
    sources_of_iif = {"concat": [_meta("iifname"), _field("ip", "saddr")]}
    daddr_of_iif = {"concat": [_meta("iifname"), _field("ip", "daddr")]}
    loopback = _prefix(ipaddress.IPv4Network("127.0.0.0/8"))
    # The userspace datapath leaves the kernel a copy of every frame a container sends on its
    # port; one addressed to the broadcast MAC would reach a local address (another network's
    # gateway) past every gateway rule below.
    quiet_ports: list[Rule] = [
        ("guard", [_match(_meta("iifname"), container_ports), DROP],
         "container ports belong to the switch, not to this host"),
    ] if container_ports else []
    return [
        *quiet_ports,
        ("guard", [IIF_GATEWAY, _match(sources_of_iif, "@sources", "!="), DROP],
         "source outside the gateway's own subnet: forged"),
        ("input", [IIF_GATEWAY, _match(_field("ip", "daddr"), "@subnets"),
                   _match(daddr_of_iif, "@sources", "!="), DROP],
         "to another overlay network's gateway"),
        ("forward", [_match({"concat": [_meta("iifname"), _meta("oifname")]}, "@connected"),
                     _match(_meta("nfproto"), "ipv4"), ACCEPT], "connected networks"),
        ("forward", [IIF_GATEWAY, OIF_GATEWAY, DROP], "overlay networks never route to each other"),
        ("forward", [IIF_GATEWAY, _match(_field("ip", "daddr"), "@subnets"), DROP],
         "not even to a network with no gateway on this host"),
        ("forward", [_match(_meta("iifname"), "@egress_gateways"),
                     _match(_meta("nfproto"), "ipv4"), ACCEPT], "egress"),
        ("forward", [IIF_GATEWAY, DROP], "internal networks and IPv6: no way out"),
        ("forward", [OIF_GATEWAY, _match({"ct": {"key": "state"}}, ["established", "related"],
                                         "in"), ACCEPT], "replies"),
        ("forward", [OIF_GATEWAY, _match({"ct": {"key": "status"}}, "dnat", "in"), ACCEPT],
         "published ports and floating addresses"),
        ("forward", [OIF_GATEWAY, DROP], "nothing else comes in"),
        ("prerouting", [{"jump": {"target": "dnat"}}], "from outside"),
        # A packet from 127/8 may not leave the host: 127.0.0.1:port stays the host's own.
        ("output", [_match(_field("ip", "daddr"), loopback), RETURN], "loopback stays local"),
        ("output", [{"jump": {"target": "dnat"}}], "from this host"),
        # First: a floating address is its container's whole, whatever is published elsewhere.
        ("dnat", [{"dnat": {"family": "ip", "addr": {"map": {
            "key": _field("ip", "daddr"), "data": "@floating_in"}}}}], "floating addresses"),
        *(_publish_rule(port) for port in published),
        ("postrouting", [OIF_GATEWAY, RETURN], "into an overlay: sources kept"),
        # Before the masquerade: the first NAT statement that matches decides.
        ("postrouting", [{"snat": {"family": "ip", "addr": {"map": {
            "key": _field("ip", "saddr"), "data": "@floating_out"}}}}], "floating addresses"),
        ("postrouting", [_match(_field("ip", "saddr"), "@egress_subnets"), {"masquerade": None}],
         "egress"),
    ]


def _overlays(gateways: list[tuple[GatewayRule, ipaddress.IPv4Network]],
              overlays: Iterable[str]) -> list[ipaddress.IPv4Network]:
    """Every overlay subnet: the gateways' and the cluster's, each once."""
    found = {subnet for _, subnet in gateways}
    for value in overlays:
        try:
            found.add(ipaddress.IPv4Network(value))
        except ValueError:
            raise DataPlaneError(f"firewall: overlay {value!r} is not an IPv4 network") from None
    ordered = sorted(found)
    for first, second in itertools.pairwise(ordered):
        if first.overlaps(second):
            raise DataPlaneError(f"firewall: overlay subnets {first} and {second} overlap")
    return ordered


def _sets(gateways: list[tuple[GatewayRule, ipaddress.IPv4Network]],
          floating: list[FloatingAddress],
          overlays: list[ipaddress.IPv4Network],
          connected: Iterable[tuple[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """Named sets and maps: name → the JSON API's set or map object, elements included."""
    egress = [(rule, subnet) for rule, subnet in gateways if rule.egress]
    interval = {"flags": ["interval"]}
    return {
        "gateways": {"type": "ifname", "elem": [rule.interface for rule, _ in gateways]},
        "connected": {"type": ["ifname", "ifname"],
                      "elem": [{"concat": list(pair)} for pair in sorted(set(connected))]},
        "egress_gateways": {"type": "ifname", "elem": [rule.interface for rule, _ in egress]},
        "subnets": {"type": "ipv4_addr", **interval,
                    "elem": [_prefix(subnet) for subnet in overlays]},
        "egress_subnets": {"type": "ipv4_addr", **interval,
                           "elem": [_prefix(subnet) for _, subnet in egress]},
        "sources": {"type": ["ifname", "ipv4_addr"], **interval,
                    "elem": [{"concat": [rule.interface, _prefix(subnet)]}
                             for rule, subnet in gateways]},
        "floating_in": {"type": "ipv4_addr", "map": "ipv4_addr",
                        "elem": [[f.address, f.container_ip] for f in floating]},
        "floating_out": {"type": "ipv4_addr", "map": "ipv4_addr",
                         "elem": [[f.container_ip, f.address]
                                  for f in sorted(floating, key=lambda f: f.container_ip)]},
    }


def render(table: str, ruleset: Ruleset) -> Rendered | None:
    """The batch that replaces ``table`` with ``ruleset``; None for an empty ruleset."""
    if not (ruleset.gateways or ruleset.published or ruleset.floating):
        return None
    gateways = _gateways(ruleset.gateways)
    floating = _floating(ruleset.floating)
    overlays = _overlays(gateways, ruleset.overlays)
    where = {"family": FAMILY, "table": table}
    body: list[Command] = []
    elements: dict[str, int] = {}
    here = {rule.interface for rule, _ in gateways}
    connected = [pair for pair in ruleset.connected if set(pair) <= here]
    for name, spec in _sets(gateways, floating, overlays, connected).items():
        kind = "map" if "map" in spec else "set"
        if not spec["elem"]:
            spec = {key: value for key, value in spec.items() if key != "elem"}
        body.append({"add": {kind: {**where, "name": name, **spec}}})
        elements[name] = len(spec.get("elem", ()))
    chains: dict[str, tuple[Any, ...]] = {}
    for name, (kind, hook, priority) in BASE_CHAINS.items():
        body.append({"add": {"chain": {**where, "name": name, "type": kind, "hook": hook,
                                       "prio": priority, "policy": "accept"}}})
        chains[name] = (kind, hook, priority, "accept")
    for name in REGULAR_CHAINS:
        body.append({"add": {"chain": {**where, "name": name}}})
        chains[name] = ()
    counts = dict.fromkeys(chains, 0)
    for chain, expr, comment in _rules(_published(ruleset.published), ruleset.container_ports):
        body.append({"add": {"rule": {**where, "chain": chain, "expr": expr,
                                      "comment": comment}}})
        counts[chain] += 1
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    fingerprint = FINGERPRINT_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()
    body.append({"add": {"rule": {**where, "chain": FINGERPRINT_CHAIN, "expr": [RETURN],
                                  "comment": fingerprint}}})
    counts[FINGERPRINT_CHAIN] += 1
    table_ref = {"family": FAMILY, "name": table}
    # Adding before deleting makes the delete valid whether or not the table exists.
    commands = ({"add": {"table": table_ref}}, {"delete": {"table": table_ref}},
                {"add": {"table": table_ref}}, *body)
    return Rendered(commands, Summary(fingerprint, chains, counts, elements))


def _chain_spec(chain: Mapping[str, Any]) -> tuple[Any, ...]:
    if "hook" not in chain:
        return ()
    return (chain.get("type"), chain.get("hook"), chain.get("prio"), chain.get("policy"))


def summarize(listing: Iterable[Command]) -> Summary:
    """The summary of a table as ``Nft.list_table`` returns it."""
    fingerprint: str | None = None
    chains: dict[str, tuple[Any, ...]] = {}
    rules: dict[str, int] = {}
    elements: dict[str, int] = {}
    for item in listing:
        if "chain" in item:
            chains[item["chain"]["name"]] = _chain_spec(item["chain"])
            rules.setdefault(item["chain"]["name"], 0)
        elif "rule" in item:
            rule = item["rule"]
            rules[rule["chain"]] = rules.get(rule["chain"], 0) + 1
            if rule["chain"] == FINGERPRINT_CHAIN:
                fingerprint = rule.get("comment")
        elif "set" in item or "map" in item:
            named = item.get("set") or item["map"]
            elements[named["name"]] = len(named.get("elem", ()))
    return Summary(fingerprint, chains, rules, elements)


class Firewall:
    """The host firewall: the nftables table ``table`` (family inet) in this network namespace."""

    def __init__(self, table: str = "powerplane") -> None:
        self.table = table
        self._nft = Nft()
        # apply reads the table, then replaces it: two applies at once must not interleave.
        self._lock = asyncio.Lock()

    async def apply(self, ruleset: Ruleset) -> bool:
        """Make the kernel hold exactly ``ruleset``; True if that changed anything.

        Cheap when nothing changed: one listing of the table, compared with the rendered
        summary. An empty ruleset removes the table.
        """
        rendered = render(self.table, ruleset)
        async with self._lock:
            listing = await self._nft.list_table(FAMILY, self.table)
            if rendered is None:
                if listing is None:
                    return False
                await self._nft.delete_table(FAMILY, self.table)
                return True
            if listing is not None and summarize(listing) == rendered.summary:
                return False
            await self._nft.transaction(rendered.commands, f"replacing table {FAMILY} "
                                        f"{self.table}")
            return True

    async def remove(self) -> None:
        """Delete the table; nothing to do if it is absent."""
        async with self._lock:
            await self._nft.delete_table(FAMILY, self.table)
