"""The data plane of one host: the OVS integration bridge, container ports and VXLAN tunnels.

This is the façade the network hook and the tunnel reconciler use; it composes
``adapter.dataplane.ovs`` (OVSDB) and ``adapter.dataplane.links`` (netlink). OVS itself is the
record of what is plugged: every port
we own carries ``external_ids`` (``powerplane-kind`` = ``container`` or ``tunnel``, plus the
container, network, VNI, address...), so a restarted agent reads its state back from the bridge.

Networks are told apart on the bridge by a local VLAN tag per VNI, chosen here (the lowest tag
no other VNI uses) and read back from the ports that carry it; tags never leave the host.

Split horizon: one VXLAN port per (remote host, network), tagged with the network's local tag,
keyed with its VNI, and ``protected``. OVS's NORMAL action never forwards a frame from one
protected port to another, so a frame that came in on a tunnel never leaves on another tunnel,
and a full mesh of learning bridges cannot loop. See docs/dataplane.md for why this and not
``key=flow`` with explicit flows.

Distributed gateway: on every host with container ports on a network, an internal port holds
the network's gateway address with a MAC derived from the VNI, the same on every host. The
gateway port is ``protected`` too, which keeps it and the tunnels apart by the same rule: a
host's gateway never answers another host's containers, and its frames never cross a tunnel,
so each host routes for its own containers and no host ever learns the gateway MAC on a tunnel.
It exists while the network has container ports here: plugging the first makes it, unplugging
the last removes it, in the same OVSDB transaction. What may cross a gateway is the host
firewall's business (``adapter.dataplane.firewall``): its rules for a gateway are in place
before the gateway gets its address, and are dropped after the port is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from adapter.dataplane import arp, links, sysctl, underlay
from adapter.dataplane.firewall import (
    Firewall,
    FloatingAddress,
    GatewayRule,
    PublishedPort,
    Ruleset,
)
from adapter.dataplane.flows import Allow, FlowPort, RemoteEndpoint, render
from adapter.dataplane.openflow import OpenFlow
from adapter.dataplane.ovs import Ovs, OvsPort
from adapter.dataplane.vswitchd import Vswitchd
from adapter.errors import DataPlaneError
from adapter.model import Host, Network, gateway_mac, mac_for_ip, router_mac
from adapter.settings import Settings

log = logging.getLogger(__name__)

KIND = "powerplane-kind"
CONTAINER = "container"
TUNNEL = "tunnel"
GATEWAY = "gateway"
GATEWAY_PREFIX = "gw-"
GROUPS_ID = "powerplane-groups"
# OVS makes an internal port's device a moment after the transaction; more than this means
# vswitchd is stuck, and the plug fails naming it.
GATEWAY_DEVICE_WAIT = 10.0
VXLAN_OVERHEAD = 50
DEFAULT_UNDERLAY_MTU = 1500
MAX_TAG = 4094
CONTAINER_IFNAME = "eth0"
PORT_PREFIX = "ovs"


def port_name(container_id: str) -> str:
    """The host-side port of a container: ``ovs`` + 12 hex digits (fits IFNAMSIZ)."""
    short = container_id.lower()
    if len(short) < 12 or any(c not in "0123456789abcdef" for c in short[:12]):
        short = hashlib.sha256(container_id.encode()).hexdigest()
    return PORT_PREFIX + short[:12]


def gateway_name(network: str) -> str:
    """The gateway port of ``network``: ``gw-NAME``, or, past 15 characters, a head of the
    name and a digest (``gw-net-10-3fa2c``)."""
    name = GATEWAY_PREFIX + network
    if len(name) < links.IFNAMSIZ:
        return name
    return (GATEWAY_PREFIX + network[:6] + "-"
            + hashlib.sha256(network.encode()).hexdigest()[:5])


def tunnel_name(remote_ip: str, vni: int) -> str:
    """The tunnel port to ``remote_ip`` for ``vni``: ``vx`` + 12 hex digits of a digest."""
    return "vx" + hashlib.sha256(f"{remote_ip}/{vni}".encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class PluggedPort:
    """A container's port on this host's bridge, as the bridge records it."""

    container_id: str
    port: str
    network: str
    vni: int
    ip: str
    mac: str
    tag: int | None
    groups: tuple[str, ...] = ()  # security groups; () accepts everything of its network
    ofport: int | None = None  # OpenFlow port number, once ovs-vswitchd has made the port


@dataclass(frozen=True, slots=True)
class RemoteContainer:
    """A container on another host, as Consul records it: where routed packets for it go."""

    network: str
    host_id: str
    ip: str
    mac: str


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A VXLAN port to one remote host for one network."""

    port: str
    host_id: str
    remote_ip: str
    network: str
    vni: int


@dataclass(frozen=True, slots=True)
class Gateway:
    """A network's gateway port on this host, as the bridge records it."""

    port: str
    network: str
    vni: int
    address: str  # gateway/prefix, e.g. 10.0.6.1/24
    subnet: str
    internal: bool


@dataclass(frozen=True, slots=True)
class TunnelChange:
    added: tuple[Tunnel, ...]
    removed: tuple[Tunnel, ...]


def _plugged(port: OvsPort) -> PluggedPort | None:
    ids = port.external_ids
    if ids.get(KIND) != CONTAINER:
        return None
    return PluggedPort(
        container_id=ids.get("powerplane-container", ""),
        port=port.name,
        network=ids.get("powerplane-network", ""),
        vni=int(ids.get("powerplane-vni", "0")),
        ip=ids.get("powerplane-ip", ""),
        mac=ids.get("powerplane-mac", ""),
        tag=port.tag,
        groups=tuple(g for g in ids.get(GROUPS_ID, "").split(",") if g),
        ofport=port.ofport if port.ofport is not None and port.ofport > 0 else None,
    )


def _gateway(port: OvsPort) -> Gateway | None:
    ids = port.external_ids
    if ids.get(KIND) != GATEWAY:
        return None
    return Gateway(
        port=port.name,
        network=ids.get("powerplane-network", ""),
        vni=int(ids.get("powerplane-vni", "0")),
        address=ids.get("powerplane-address", ""),
        subnet=ids.get("powerplane-subnet", ""),
        internal=ids.get("powerplane-internal") == "true",
    )


def _tunnel(port: OvsPort) -> Tunnel | None:
    ids = port.external_ids
    if ids.get(KIND) != TUNNEL:
        return None
    return Tunnel(
        port=port.name,
        host_id=ids.get("powerplane-host", ""),
        remote_ip=port.options.get("remote_ip", ""),
        network=ids.get("powerplane-network", ""),
        vni=int(ids.get("powerplane-vni", "0")),
    )


class DataPlane:
    """This host's bridge, container ports and tunnels; constructing it touches nothing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bridge = settings.bridge
        self.ovs = Ovs(settings.ovsdb)
        self.vswitchd = Vswitchd(settings.ovsdb)
        self.openflow = OpenFlow(settings.ovsdb, settings.bridge)
        # What each security group lets in, compiled to addresses by the network layer; a
        # port in a group not (yet) listed here accepts nothing new through it.
        self._allows: dict[str, tuple[Allow, ...]] = {}
        # The ovs-vswitchd our flows were installed into: flows live in its memory only, so a
        # different one (restarted) has lost them.
        self._flows_installed_in: int | None = None
        # Networks joined by `network connect` (pairs of names), and the containers on other
        # hosts that this host's gateways may have to route to.
        self._connections: frozenset[tuple[str, str]] = frozenset()
        self._remote: tuple[RemoteContainer, ...] = ()
        self._networks: dict[str, Network] | None = None  # as set_gateways last listed them
        # The MAC other hosts' tunnels send to, known once the underlay is up (start()).
        self.underlay_mac = ""
        # One change at a time: tags are chosen from what the bridge holds, so two concurrent
        # changes could otherwise pick the same tag for different networks.
        self._lock = asyncio.Lock()
        self._mtu: int | None = settings.mtu
        self._underlay: underlay.UnderlaySetup | None = None  # what start() found, if netdev
        self.firewall = Firewall()
        # What the network layer publishes on this host; gateways come from the bridge itself.
        self._published: tuple[PublishedPort, ...] = ()
        self._floating: tuple[FloatingAddress, ...] = ()
        self._overlays: tuple[str, ...] = ()  # every network's subnet, as last listed
        # Bumped whenever a gateway port is made or removed, for whoever follows them (the
        # DNS server listens on their addresses); the event is replaced after each change.
        self._gateway_generation = 0
        self._gateway_moved = asyncio.Event()

    async def start(self) -> None:
        """Connect to OVS; ensure the bridge (and, with netdev, the underlay bridge)."""
        await self.ovs.connect()
        underlay_mtu = DEFAULT_UNDERLAY_MTU
        if self.settings.datapath == "netdev" and self.settings.underlay_ip:
            self._underlay = await underlay.ensure_netdev_underlay(self.ovs, self.settings,
                                                                   self._underlay)
            underlay_mtu = self._underlay.mtu
            self.underlay_mac = self._underlay.mac
        elif self.settings.underlay_ip:
            underlay_mtu, self.underlay_mac = await underlay.underlay_link(self.settings)
        # Secure: a vswitchd (re)started without our flows forwards nothing rather than
        # everything, so no guarded port is ever open while its flows are being put back (not
        # with a remote OVS, whose flow tables this host cannot reach to fill). Flows already
        # installed stay: a restarted serve does not know the groups yet; the security
        # reconciler installs its own once it does, or after a grace time.
        await self.ovs.ensure_bridge(self.bridge, datapath=self.settings.datapath,
                                     fail_mode="secure" if self.openflow.reachable else None)
        if self.settings.mtu is None:
            self._mtu = underlay_mtu - VXLAN_OVERHEAD

    async def ensure(self) -> bool:
        """Put back what OVS or the kernel lost since ``start``; True when something was lost.

        Our whole switch lives in OVSDB, so a vswitchd restarted on its database rebuilds it by
        itself; a database started afresh (or a bridge deleted by hand) loses the bridge, and
        with it every port. Checking costs one read of OVSDB's replica and, with netdev, one
        netlink dump; the ports and tunnels are put back by their own reconcilers.
        """
        lost = not await self.ovs.bridge_exists(self.bridge)
        if not lost and self.settings.datapath == "netdev":
            lost = not await underlay.underlay_in_place(self.settings)
        if lost:
            log.warning("Open vSwitch lost bridge %s or the underlay set-up; putting it back",
                        self.bridge)
            await self.start()
            async with self._lock:  # a bridge made again has no flows, and forwards nothing
                await self._apply_flows(await self._ports())
        return lost

    async def close(self) -> None:
        await self.ovs.close()

    def overlay_mtu(self) -> int:
        """The MTU container interfaces get unless their network sets one."""
        return self._mtu or DEFAULT_UNDERLAY_MTU - VXLAN_OVERHEAD

    async def _ports(self) -> list[OvsPort]:
        return await self.ovs.list_ports(self.bridge)

    @staticmethod
    def _tag_for(vni: int, ports: Iterable[OvsPort]) -> int:
        used: dict[int, int] = {}
        for port in ports:
            port_vni = port.external_ids.get("powerplane-vni")
            if port.tag is not None and port_vni is not None:
                used[port.tag] = int(port_vni)
        for tag, tag_vni in used.items():
            if tag_vni == vni:
                return tag
        for tag in range(1, MAX_TAG + 1):
            if tag not in used:
                return tag
        raise DataPlaneError(f"no free local VLAN tag on {len(used)} networks")

    # -- container ports -----------------------------------------------------------------------

    async def plug(
        self, *, container_id: str, netns: int | str, network: Network, ip: str,
        groups: Iterable[str] = (),
    ) -> PluggedPort:
        """Wire a container's namespace (pid or netns path) into ``network`` at ``ip``.

        Its port security (and, in ``groups``, its closed inbound) is in the switch before this
        returns, so the container's first packet already meets them.
        """
        groups = tuple(groups)
        port = port_name(container_id)
        mac = mac_for_ip(ip)
        mtu = network.mtu or self.overlay_mtu()
        # The veth is this container's alone; only the bridge's tag choice is shared.
        await links.ensure_veth(
            port,
            netns,
            links.ContainerLink(CONTAINER_IFNAME, mac, f"{ip}/{network.prefixlen}", mtu,
                                network.gateway),
            tx_checksum_off=self.settings.datapath == "netdev",
        )
        sysctl.silence_port(port)
        async with self._lock:
            ports = await self._ports()
            tag = self._tag_for(network.vni, ports)
            external_ids = {
                KIND: CONTAINER,
                "powerplane-container": container_id,
                "powerplane-network": network.name,
                "powerplane-vni": str(network.vni),
                "powerplane-ip": ip,
                "powerplane-mac": mac,
            }
            if groups:
                external_ids[GROUPS_ID] = ",".join(groups)
            wanted = [OvsPort(port, "", tag, False, external_ids)]
            gateway = self._gateway_port(network, tag)
            if not _same(next((p for p in ports if p.name == gateway.name), None), gateway):
                wanted.append(gateway)
                # The rules first: a gateway is never up without its network's isolation.
                await self._apply_firewall([*(p for p in ports if p.name != gateway.name),
                                            gateway])
            await self.ovs.apply(self.bridge, ensure=wanted)
            if len(wanted) > 1:
                self._gateways_moved()
            ofport = await self._ofport(port)
            await self._apply_flows(await self._ports())
        await self._gateway_up(gateway)
        return PluggedPort(container_id, port, network.name, network.vni, ip, mac, tag, groups,
                           ofport)

    async def unplug(self, container_id: str) -> None:
        """Remove a container's OVS port and host-side veth; nothing if they are gone.

        The last container port of a network takes the network's gateway port with it.
        """
        port = port_name(container_id)
        async with self._lock:
            ports = await self._ports()
            mine = next((p for p in ports if p.name == port), None)
            delete = [port]
            if mine is not None and (vni := mine.external_ids.get("powerplane-vni")):
                others = [p for p in ports if p.name != port and _plugged(p) is not None
                          and p.external_ids.get("powerplane-vni") == vni]
                network = mine.external_ids.get("powerplane-network", "")
                if not others and network not in self._needed_networks(
                        [p for p in ports if p.name != port]):
                    delete += [p.name for p in ports if (g := _gateway(p)) is not None
                               and str(g.vni) == vni]
            await self.ovs.apply(self.bridge, delete=delete)
            if len(delete) > 1:
                self._gateways_moved()
                await self._apply_firewall([p for p in ports if p.name not in delete])
            await self._apply_flows([p for p in ports if p.name not in delete])
        await links.delete_link(port)

    async def _ofport(self, port: str) -> int:
        """The OpenFlow number ovs-vswitchd gives ``port``, a moment after the transaction."""
        async with asyncio.timeout(GATEWAY_DEVICE_WAIT):
            while True:
                found = next((p for p in await self._ports() if p.name == port), None)
                if found is not None and found.ofport is not None and found.ofport > 0:
                    return found.ofport
                if found is not None and found.ofport == -1:
                    raise DataPlaneError(f"Open vSwitch could not add port {port} to "
                                         f"{self.bridge}")
                await asyncio.sleep(0.01)

    # -- port security and groups --------------------------------------------------------------

    async def set_security(self, allows: Mapping[str, Iterable[Allow]]) -> None:
        """What each security group lets in; the flow tables follow at once."""
        async with self._lock:
            self._allows = {group: tuple(rules) for group, rules in allows.items()}
            await self._apply_flows(await self._ports())

    async def set_routes(self, connections: Iterable[tuple[str, str]],
                         remote: Iterable[RemoteContainer]) -> None:
        """Networks joined by ``network connect``, and every container on another host of a
        network that may be routed to: gateways, firewall and flows follow at once."""
        async with self._lock:
            self._connections = frozenset((min(a, b), max(a, b)) for a, b in connections)
            self._remote = tuple(sorted(set(remote), key=lambda r: (r.network, r.ip)))
            if self._networks is not None:
                await self._set_gateways(self._networks)
            await self._apply_firewall(await self._ports())
            await self._apply_flows(await self._ports())

    def _routes(self, ports: Iterable[OvsPort]) -> list[RemoteEndpoint]:
        """The remote containers this host's gateways route to, with the ports to use."""
        gateways: dict[str, tuple[int, int]] = {}  # network → (ofport, vni)
        tunnels: dict[tuple[str, int], int] = {}  # (host, vni) → ofport
        for port in ports:
            if port.ofport is None or port.ofport <= 0:
                continue
            if (gateway := _gateway(port)) is not None:
                gateways[gateway.network] = (port.ofport, gateway.vni)
            elif (far_end := _tunnel(port)) is not None:
                tunnels[(far_end.host_id, far_end.vni)] = port.ofport
        connected = {name for pair in self._connections for name in pair}
        routes = []
        for container in self._remote:
            if container.network not in connected or container.network not in gateways:
                continue
            gateway_ofport, vni = gateways[container.network]
            tunnel = tunnels.get((container.host_id, vni))
            if tunnel is not None:
                routes.append(RemoteEndpoint(container.network, gateway_ofport, tunnel,
                                             container.mac, container.ip,
                                             router_mac(self.settings.host_id)))
        return routes

    async def ensure_flows(self) -> bool:
        """Install the flow tables again if ovs-vswitchd is not the one that has them (it was
        restarted, and flows live in its memory only); True when they were installed."""
        if not self.openflow.reachable or self._flows_installed_in == self.vswitchd.pid():
            return False
        async with self._lock:
            await self._apply_flows(await self._ports())
        return True

    async def _apply_flows(self, ports: Iterable[OvsPort]) -> None:
        if not self.openflow.reachable:
            return
        ports = list(ports)
        container_ports = [FlowPort(plugged.port, plugged.ofport, plugged.mac, plugged.ip,
                               plugged.tag, plugged.groups)
                   for port in ports if (plugged := _plugged(port)) is not None
                   and plugged.ofport is not None and plugged.tag is not None]
        pid = self.vswitchd.pid()
        await self.openflow.replace(render(container_ports, self._allows,
                                           self._routes(ports)))
        self._flows_installed_in = pid

    async def flows(self) -> list[str]:
        """The bridge's flows as installed (for status and tests)."""
        return await self.openflow.dump()

    # -- gateways ------------------------------------------------------------------------------

    def _gateway_port(self, network: Network, tag: int) -> OvsPort:
        return OvsPort(
            gateway_name(network.name), "internal", tag, True,
            {KIND: GATEWAY, "powerplane-network": network.name,
             "powerplane-vni": str(network.vni), "powerplane-address": network.gateway_cidr,
             "powerplane-subnet": network.cidr,
             "powerplane-internal": "true" if network.internal else "false"},
            mac=gateway_mac(network.vni), mtu_request=network.mtu or self.overlay_mtu(),
        )

    async def _gateway_up(self, port: OvsPort) -> bool:
        """The kernel side of a gateway port: its address, link up; True if it changed."""
        # The MAC goes in OVSDB (the kernel datapath's internal ports take it from there) and
        # on the device itself (the userspace datapath's taps do not).
        changed = await links.ensure_interface_address(
            port.name, port.external_ids["powerplane-address"], wait=GATEWAY_DEVICE_WAIT,
            mac=port.mac)
        if changed and self.settings.datapath == "netdev":
            # The host's own packets to containers enter the userspace datapath here.
            await links.set_tx_checksum(port.name, False)
        if port.external_ids.get("powerplane-internal") != "true":
            sysctl.ensure_ipv4_forwarding()
        return changed

    async def set_published(self, published: Iterable[PublishedPort]) -> bool:
        """Publish exactly these ports on this host; True if the rules changed."""
        async with self._lock:
            self._published = tuple(sorted(set(published), key=_published_key))
            return await self._apply_firewall(await self._ports())

    async def set_floating(self, floating: Iterable[FloatingAddress]) -> list[str]:
        """Answer for exactly these floating addresses on the underlay; the ones newly taken.

        Each address is added (/32) to the interface holding the underlay address, so the
        kernel answers ARP for it, and is announced with a gratuitous ARP, so neighbours that
        knew it at another host follow at once; the firewall rewrites it 1:1 to its container.
        Addresses of ``--floating-range`` that are no longer ours are removed.
        """
        wanted = tuple(sorted(set(floating), key=lambda f: f.address))
        async with self._lock:
            if wanted != self._floating:
                # Otherwise the rules are the reconciler's to repair (set_gateways), not ours
                # to rewrite every time the floating list is looked at again.
                self._floating = wanted
                await self._apply_firewall(await self._ports())
        if not self.settings.floating_range:
            if wanted:
                raise DataPlaneError("floating addresses are attached to containers on this "
                                     "host but serve runs without --floating-range")
            return []
        interface = await self._underlay_interface()
        if interface is None:
            if wanted:
                raise DataPlaneError("floating addresses need this host's underlay address "
                                     "(--underlay-ip): none is set or no interface holds it")
            return []
        added, removed = await links.set_host_addresses(
            interface, {f.address for f in wanted}, within=self.settings.floating_range)
        for ip in removed:
            log.info("floating address %s left this host", ip)
        for ip in added:
            log.info("floating address %s is now answered by this host (%s)", ip, interface)
            if self.underlay_mac:
                await arp.announce(interface, ip, self.underlay_mac)
        return added

    async def _underlay_interface(self) -> str | None:
        if not self.settings.underlay_ip:
            return None
        if self._underlay is not None:
            return underlay.PHYSICAL_BRIDGE
        found = await links.interface_with_address(self.settings.underlay_ip)
        return found[0] if found else None

    async def remove_way_out(self) -> None:
        """Gateway ports and firewall rules gone from this host (``serve --cleanup``)."""
        async with self._lock:
            if await self.ovs.bridge_exists(self.bridge):
                await self.ovs.apply(self.bridge, delete=[
                    p.name for p in await self._ports() if _gateway(p) is not None])
                self._gateways_moved()
            await self.firewall.remove()

    def _needed_networks(self, ports: Iterable[OvsPort]) -> set[str]:
        """Networks that need a gateway here: those with container ports, and those connected
        to one of them (the gateway that routes into a network is on the sender's host)."""
        local = {c.network for p in ports if (c := _plugged(p)) is not None}
        return local | {other for pair in self._connections for network, other in
                        (pair, pair[::-1]) if network in local}

    async def _apply_firewall(self, ports: Iterable[OvsPort]) -> bool:
        gateways = sorted({g for p in ports if (g := _gateway(p)) is not None},
                          key=lambda g: g.port)
        connected = tuple((gateway_name(a), gateway_name(b)) for first, second in
                          sorted(self._connections) for a, b in ((first, second),
                                                                 (second, first)))
        rules = tuple(GatewayRule(interface=g.port, subnet=g.subnet,
                                  gateway=g.address.partition("/")[0], egress=not g.internal)
                      for g in gateways)
        return await self.firewall.apply(Ruleset(
            rules, self._published, self._floating, self._overlays,
            container_ports=PORT_PREFIX + "*", connected=connected))

    async def gateways(self) -> list[Gateway]:
        """Every gateway port the bridge holds."""
        return [g for port in await self._ports() if (g := _gateway(port)) is not None]

    def gateway_generation(self) -> int:
        """A number that changes whenever a gateway port is made or removed here."""
        return self._gateway_generation

    async def gateways_changed(self, since: int, seconds: float) -> None:
        """Return once the gateways changed after ``since`` (a ``gateway_generation``), or
        after ``seconds``: ports removed behind our back are only seen by looking."""
        if self._gateway_generation != since:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._gateway_moved.wait()

    def _gateways_moved(self) -> None:
        self._gateway_generation += 1
        moved, self._gateway_moved = self._gateway_moved, asyncio.Event()
        moved.set()

    async def set_gateways(self, networks: Iterable[Network]) -> list[str]:
        """Gateway ports for exactly the networks with container ports here, each addressed.

        ``networks`` are the networks as Consul knows them. The reconciler's repair: ``plug``
        and ``unplug`` keep gateways in step as containers come and go; this puts back what OVS
        or the kernel lost (a device re-made without its address after a vswitchd restart),
        follows a network whose record changed, and removes gateways no container port needs.
        Decided under the switch's lock from the ports as they are then, so a plug racing with
        it never loses its gateway. Returns the gateway ports it changed, made or removed.
        """
        by_name = {n.name: n for n in networks}
        async with self._lock:
            self._networks = by_name
            return await self._set_gateways(by_name)

    async def _set_gateways(self, by_name: Mapping[str, Network]) -> list[str]:
        self._overlays = tuple(sorted(n.cidr for n in by_name.values()))
        ports = await self._ports()
        current = {p.name: p for p in ports}
        in_use = {(c.network, c.vni) for p in ports if (c := _plugged(p)) is not None}
        in_use |= {(name, by_name[name].vni) for name in self._needed_networks(ports)
                   if name in by_name}
        wanted: dict[str, OvsPort] = {}
        for name, vni in sorted(in_use):
            network = by_name.get(name)
            if network is None or network.vni != vni:
                # Not in the caller's listing (made since): keep what plug made, if any.
                kept = current.get(gateway_name(name))
                if kept is not None and _gateway(kept) is not None:
                    wanted[kept.name] = kept
                continue
            port = self._gateway_port(network, self._tag_for(vni, ports))
            wanted[port.name] = port
        to_ensure = [p for name, p in wanted.items() if not _same(current.get(name), p)]
        to_delete = [p.name for p in ports if _gateway(p) is not None and p.name not in wanted]
        # Rules for the gateways that stay or come before any is made; a gateway removed
        # loses its rules only after its port is gone. Applying what the kernel already
        # holds changes nothing, and puts back a table someone deleted.
        await self._apply_firewall({**current, **{p.name: p for p in to_ensure}}.values())
        await self.ovs.apply(self.bridge, ensure=to_ensure, delete=to_delete)
        if to_delete:
            await self._apply_firewall(wanted.values())
        if to_ensure or to_delete:
            self._gateways_moved()
        changed = {p.name for p in to_ensure} | set(to_delete)
        for port in wanted.values():
            if await self._gateway_up(port):
                changed.add(port.name)
        return sorted(changed)

    async def plugged(self) -> list[PluggedPort]:
        """Every container port the bridge holds."""
        return [p for port in await self._ports() if (p := _plugged(port)) is not None]

    async def port_links(self) -> set[str]:
        """Host-side container veths that exist in the kernel, plugged or not, by name.

        A port whose veth is missing here lost its device (the container's namespace died with
        the container: a daemon restart, a reboot); a veth no port holds was left by a plug
        that never finished.
        """
        return await links.veth_names(PORT_PREFIX)

    async def remove_port_link(self, port: str) -> None:
        """Remove a container port's host-side veth that no OVS port holds (both ends go)."""
        await links.delete_link(port)

    # -- tunnels -------------------------------------------------------------------------------

    async def tunnels(self) -> list[Tunnel]:
        return [t for port in await self._ports() if (t := _tunnel(port)) is not None]

    async def set_tunnels(self, peers: Iterable[Host], networks: Iterable[Network]) -> TunnelChange:
        """Make the tunnels exactly (peers x networks), in one transaction; report the change."""
        # A host registered without an underlay address (a single-host setup) has nowhere
        # for a tunnel to end.
        peer_list = [h for h in peers if h.host_id != self.settings.host_id and h.underlay_ip
                     and h.underlay_ip != self.settings.underlay_ip]
        network_list = list(networks)
        async with self._lock:
            ports = await self._ports()
            existing = {t.port: t for port in ports if (t := _tunnel(port)) is not None}
            wanted: dict[str, tuple[Tunnel, OvsPort]] = {}
            tags = list(ports)
            for network in network_list:
                tag = self._tag_for(network.vni, tags)
                # Remember the tag, so a second new network does not pick the same one.
                tags.append(OvsPort("", tag=tag, external_ids={"powerplane-vni": str(network.vni)}))
                for host in peer_list:
                    name = tunnel_name(host.underlay_ip, network.vni)
                    tunnel = Tunnel(name, host.host_id, host.underlay_ip, network.name,
                                    network.vni)
                    wanted[name] = (tunnel, OvsPort(
                        name, "vxlan", tag, True,
                        {KIND: TUNNEL, "powerplane-host": host.host_id,
                         "powerplane-network": network.name,
                         "powerplane-vni": str(network.vni)},
                        {"remote_ip": host.underlay_ip, "key": str(network.vni)},
                    ))
            current = {p.name: p for p in ports}
            to_ensure = [port for name, (_, port) in wanted.items()
                         if not _same(current.get(name), port)]
            to_delete = [name for name in existing if name not in wanted]
            await self.ovs.apply(self.bridge, ensure=to_ensure, delete=to_delete)
        return TunnelChange(
            added=tuple(wanted[p.name][0] for p in to_ensure if p.name not in existing),
            removed=tuple(existing[name] for name in to_delete),
        )


    async def set_tunnel_neighbors(self, peers: Iterable[Host]) -> int:
        """Give the userspace datapath each peer's underlay MAC it lacks; return how many.

        Only the netdev datapath resolves tunnel ends itself (the kernel's VXLAN queues a frame
        while it resolves); peers that publish no MAC are left to resolution as before.
        """
        if self.settings.datapath != "netdev" or not self.vswitchd.reachable:
            return 0
        known = await self.vswitchd.tunnel_neighbors()
        count = 0
        for peer in peers:
            if (peer.underlay_mac and peer.underlay_ip
                    and peer.underlay_ip != self.settings.underlay_ip
                    and known.get(peer.underlay_ip) != peer.underlay_mac.lower()):
                try:
                    await self.vswitchd.set_tunnel_neighbor(underlay.PHYSICAL_BRIDGE,
                                                            peer.underlay_ip, peer.underlay_mac)
                except DataPlaneError as exc:
                    # One peer's entry refused must not hold up the others'.
                    log.warning("tunnel neighbour %s: %s", peer.underlay_ip, exc)
                    continue
                count += 1
        return count


def _published_key(port: PublishedPort) -> tuple[str, str, int]:
    return port.proto, port.host_ip, port.host_port


def _same(current: OvsPort | None, wanted: OvsPort) -> bool:
    return current is not None and (
        current.type, current.tag, current.protected, dict(current.external_ids),
        dict(current.options), current.mac, current.mtu_request,
    ) == (wanted.type, wanted.tag, wanted.protected, dict(wanted.external_ids),
          dict(wanted.options), wanted.mac, wanted.mtu_request)
