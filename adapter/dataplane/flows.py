"""The OpenFlow tables of the integration bridge: port security and security groups.

Pure rendering: from what is plugged here and what the groups allow, the complete flow table as
``ovs-ofctl`` text, which ``adapter.dataplane.openflow`` installs with one atomic
``replace-flows`` (only the differences reach the switch, so flows that stay are never touched
and connections they carry are never cut). Forwarding itself stays OVS's NORMAL action (VLAN
tags per network, split horizon by ``protected`` ports, see ``adapter.dataplane.switch``); these
tables only decide what may reach NORMAL.

    table 0  port security: a frame from a container port passes only with the port's MAC and
             address as source (IPv4 and ARP; anything else, IPv6 included, is dropped). Frames
             from tunnels and gateway ports pass.
    table 1  IPv4 to or from a *guarded* container (one in a security group) goes through
             connection tracking, in a zone per network (the network's local tag); the rest
             goes to NORMAL.
    table 2  after tracking: replies and related packets pass; a new connection to a guarded
             container passes only if one of its groups allows it (and is committed, so its
             replies pass); a new connection from a guarded container is committed and passes.

Routing between connected networks (``powerplane network connect``) adds to table 1: the host
that routes a packet into a network hands it to that network's gateway port, and NORMAL never
sends a gateway's frames down a tunnel (both are ``protected``). So for every container of a
connected network on another host, a flow answers the gateway's ARP for it from Consul's
record, and another sends the gateway's frames for its MAC down the tunnel to its host.

Cookies say who owns a flow: ``0x7070`` in the top 16 bits, then a kind (0 base, 1 port,
2 group, 3 route) in the next 8, and a CRC-32 of the port's, group's or network's name in the
low 32 bits; so ``ovs-ofctl dump-flows BRIDGE cookie=0x7070010012345678/-1`` lists one port's
flows.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

COOKIE_PREFIX = 0x7070 << 48
COOKIE_PREFIX_MASK = 0xFFFF << 48
BASE, PORT, GROUP, ROUTE = 0, 1, 2, 3

PORT_SECURITY_TABLE = 0
TRACK_TABLE = 1
ALLOW_TABLE = 2


def cookie(kind: int, name: str = "") -> int:
    """The cookie of the flows a port (``PORT``) or a group (``GROUP``) owns; ``BASE`` for the
    flows every bridge has."""
    return COOKIE_PREFIX | kind << 40 | (zlib.crc32(name.encode()) if name else 0)


def is_ours(value: int) -> bool:
    return value & COOKIE_PREFIX_MASK == COOKIE_PREFIX


@dataclass(frozen=True, slots=True)
class Allow:
    """New connections that a group lets in: ``proto`` (tcp, udp, icmp, any) to ``ports`` from
    any of ``sources`` (IPv4 networks, e.g. "10.0.6.0/24" or "10.0.6.5/32")."""

    group: str
    proto: str
    ports: tuple[int, int] | None
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FlowPort:
    """A container port on this bridge with its OpenFlow number and identity; *guarded* when
    it is in a group."""

    name: str
    ofport: int
    mac: str
    ip: str
    zone: int  # conntrack zone: the network's local tag
    groups: tuple[str, ...] = ()  # () = accepts all its network sends it


@dataclass(frozen=True, slots=True)
class RemoteEndpoint:
    """A container on another host that this host's gateway for ``network`` routes to."""

    network: str
    gateway_ofport: int  # this host's gateway port for the container's network
    tunnel_ofport: int  # the tunnel to the container's host for that network
    mac: str
    ip: str
    router_mac: str  # this host's source MAC for routed frames (model.router_mac)


def port_masks(low: int, high: int) -> list[tuple[int, int]]:
    """The fewest value/mask pairs that together match exactly the ports low..high."""
    masks: list[tuple[int, int]] = []
    while low <= high:
        # The largest aligned block that starts at low and does not pass high.
        size = low & -low if low else 1 << 16
        while size > high - low + 1:
            size >>= 1
        masks.append((low, 0xFFFF & ~(size - 1)))
        low += size
    return masks


def _proto_matches(allow: Allow) -> list[str]:
    if allow.proto == "any":
        return ["ip"]
    if allow.proto == "icmp":
        return ["icmp"]
    if allow.ports is None:
        return [allow.proto]
    low, high = allow.ports
    if (low, high) == (1, 65535):
        return [allow.proto]
    return [f"{allow.proto},tp_dst={value}" if mask == 0xFFFF
            else f"{allow.proto},tp_dst={value:#x}/{mask:#x}"
            for value, mask in port_masks(low, high)]


def render(ports: Iterable[FlowPort], allows: Mapping[str, Iterable[Allow]],
           routes: Iterable[RemoteEndpoint] = ()) -> list[str]:
    """The whole flow table, one ``ovs-ofctl`` flow per line, in a stable order.

    ``allows`` maps a group's name to what it allows; a port in a group missing from it
    accepts nothing new through that group (closed until the group is known). ``routes`` are
    the remote containers this host's gateways route to.
    """
    base = f"cookie={cookie(BASE):#x}"
    flows = [
        f"{base},table={PORT_SECURITY_TABLE},priority=0,actions=goto_table:{TRACK_TABLE}",
        f"{base},table={TRACK_TABLE},priority=0,actions=NORMAL",
        f"{base},table={ALLOW_TABLE},priority=200,ct_state=+trk+est-inv,actions=NORMAL",
        f"{base},table={ALLOW_TABLE},priority=200,ct_state=+trk+rel-inv,actions=NORMAL",
        f"{base},table={ALLOW_TABLE},priority=190,ct_state=+trk+inv,actions=drop",
        f"{base},table={ALLOW_TABLE},priority=0,actions=drop",
    ]
    seen: set[str] = set()
    for port in sorted(ports, key=lambda p: p.name):
        owner = f"cookie={cookie(PORT, port.name):#x}"
        source = f"in_port={port.ofport},dl_src={port.mac}"
        flows += [
            f"{owner},table={PORT_SECURITY_TABLE},priority=100,{source},ip,nw_src={port.ip},"
            f"actions=goto_table:{TRACK_TABLE}",
            f"{owner},table={PORT_SECURITY_TABLE},priority=100,{source},arp,arp_spa={port.ip},"
            f"arp_sha={port.mac},actions=goto_table:{TRACK_TABLE}",
            f"{owner},table={PORT_SECURITY_TABLE},priority=90,in_port={port.ofport},actions=drop",
        ]
        if not port.groups:
            continue
        track = f"ct(zone={port.zone},table={ALLOW_TABLE})"
        commit = f"ct(commit,zone={port.zone}),NORMAL"
        flows += [
            f"{owner},table={TRACK_TABLE},priority=110,ip,dl_dst={port.mac},actions={track}",
            f"{owner},table={TRACK_TABLE},priority=100,ip,in_port={port.ofport},actions={track}",
            f"{owner},table={ALLOW_TABLE},priority=50,ct_state=+trk+new,ip,dl_dst={port.mac},"
            "actions=drop",
            f"{owner},table={ALLOW_TABLE},priority=40,ct_state=+trk+new,ip,"
            f"in_port={port.ofport},actions={commit}",
        ]
        for group in port.groups:
            for allow in allows.get(group, ()):
                owner_group = f"cookie={cookie(GROUP, group):#x}"
                for proto in _proto_matches(allow):
                    for network in allow.sources:
                        match = (f"table={ALLOW_TABLE},priority=100,ct_state=+trk+new,{proto},"
                                 f"dl_dst={port.mac},nw_src={network}")
                        if match in seen:  # two groups allowing the same: one flow is enough
                            continue
                        seen.add(match)
                        flows.append(f"{owner_group},{match},actions={commit}")
    for route in sorted(routes, key=lambda r: (r.network, r.ip)):
        flows += _route_flows(route)
    return flows


def _route_flows(route: RemoteEndpoint) -> list[str]:
    owner = f"cookie={cookie(ROUTE, route.network):#x},table={TRACK_TABLE},priority=120"
    mac_hex = "0x" + route.mac.replace(":", "")
    ip_hex = "0x" + "".join(f"{int(part):02x}" for part in route.ip.split("."))
    # The ARP reply is the request turned around, with the container's MAC and address.
    answer = ",".join((
        "move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[]", f"mod_dl_src:{route.mac}",
        "load:0x2->NXM_OF_ARP_OP[]", "move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[]",
        "move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[]", f"load:{mac_hex}->NXM_NX_ARP_SHA[]",
        f"load:{ip_hex}->NXM_OF_ARP_SPA[]", FORGET_IN_PORT, f"output:{route.gateway_ofport}"))
    return [
        f"{owner},in_port={route.gateway_ofport},arp,arp_op=1,arp_tpa={route.ip},"
        f"actions={answer}",
        f"{owner},in_port={route.gateway_ofport},dl_dst={route.mac},"
        f"actions=mod_dl_src:{route.router_mac},{FORGET_IN_PORT},output:{route.tunnel_ofport}",
    ]


# OVS refuses any output between two protected ports (gateways and tunnels both are, so that
# NORMAL keeps them apart) and any output back to the input port. These two flows are the
# deliberate exceptions: they forget the input port first, which ends both checks for them only.
FORGET_IN_PORT = "load:0->NXM_OF_IN_PORT[]"
