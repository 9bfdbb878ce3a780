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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from adapter.dataplane import links, underlay
from adapter.dataplane.ovs import Ovs, OvsPort
from adapter.dataplane.vswitchd import Vswitchd
from adapter.errors import DataPlaneError
from adapter.model import Host, Network, mac_for_ip
from adapter.settings import Settings

log = logging.getLogger(__name__)

KIND = "powerplane-kind"
CONTAINER = "container"
TUNNEL = "tunnel"
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


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A VXLAN port to one remote host for one network."""

    port: str
    host_id: str
    remote_ip: str
    network: str
    vni: int


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
        # The MAC other hosts' tunnels send to, known once the underlay is up (start()).
        self.underlay_mac = ""
        # One change at a time: tags are chosen from what the bridge holds, so two concurrent
        # changes could otherwise pick the same tag for different networks.
        self._lock = asyncio.Lock()
        self._mtu: int | None = settings.mtu
        self._underlay: underlay.UnderlaySetup | None = None  # what start() found, if netdev

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
        await self.ovs.ensure_bridge(self.bridge, datapath=self.settings.datapath)
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
        self, *, container_id: str, netns: int | str, network: Network, ip: str
    ) -> PluggedPort:
        """Wire a container's namespace (pid or netns path) into ``network`` at ``ip``."""
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
        async with self._lock:
            tag = self._tag_for(network.vni, await self._ports())
            external_ids = {
                KIND: CONTAINER,
                "powerplane-container": container_id,
                "powerplane-network": network.name,
                "powerplane-vni": str(network.vni),
                "powerplane-ip": ip,
                "powerplane-mac": mac,
            }
            await self.ovs.apply(self.bridge, ensure=[OvsPort(port, "", tag, False, external_ids)])
        return PluggedPort(container_id, port, network.name, network.vni, ip, mac, tag)

    async def unplug(self, container_id: str) -> None:
        """Remove a container's OVS port and host-side veth; nothing if they are gone."""
        port = port_name(container_id)
        async with self._lock:
            await self.ovs.delete_port(port)
        await links.delete_link(port)

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


def _same(current: OvsPort | None, wanted: OvsPort) -> bool:
    return current is not None and (
        current.type, current.tag, current.protected, dict(current.external_ids),
        dict(current.options),
    ) == (wanted.type, wanted.tag, wanted.protected, dict(wanted.external_ids),
          dict(wanted.options))
