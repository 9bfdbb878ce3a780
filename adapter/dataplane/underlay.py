"""Host set-up for the userspace (``netdev``) datapath: the underlay address on an OVS bridge.

Userspace VXLAN needs to route its own tunnel packets, which it can only do when the underlay
address sits on an OVS bridge of the same datapath. With ``--datapath netdev`` and
``--underlay-ip IP`` the agent therefore changes the host like this (docs/dataplane.md):

1. an OVS bridge ``br-phy`` (``datapath_type=netdev``) with the MAC of the underlay interface;
2. the underlay interface becomes a port of ``br-phy`` of type ``afxdp-nonpmd`` (XDP in
   best-effort mode): OVS takes every frame before the kernel stack sees it, so the kernel no
   longer answers on that interface itself (it would send duplicate replies);
3. the underlay address (and the gateway routes through that interface) move to ``br-phy``;
4. tx checksum offload is turned off on ``br-phy`` (a tap read by userspace OVS).

Every step checks first, so re-running after a crash or a restart changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter.dataplane import links
from adapter.dataplane.ovs import Ovs, OvsPort
from adapter.errors import DataPlaneError
from adapter.settings import Settings

PHYSICAL_BRIDGE = "br-phy"
UNDERLAY_PORT_TYPE = "afxdp-nonpmd"
UNDERLAY_PORT_OPTIONS = {"xdp-mode": "best-effort"}


async def underlay_link(settings: Settings) -> tuple[int, str]:
    """MTU and MAC of the interface holding the underlay address (1500 and "" if unknown)."""
    name = settings.underlay_interface
    if name is None and settings.underlay_ip:
        found = await links.interface_with_address(settings.underlay_ip)
        name = found[0] if found else None
    if not name:
        return 1500, ""
    return await links.link_mtu_and_mac(name)


async def underlay_in_place(settings: Settings) -> bool:
    """Whether the underlay address still sits on ``br-phy`` (cheap: one netlink dump)."""
    if not settings.underlay_ip:
        return True
    found = await links.interface_with_address(settings.underlay_ip)
    return found is not None and found[0] == PHYSICAL_BRIDGE


@dataclass(frozen=True, slots=True)
class UnderlaySetup:
    """What an earlier run found: the underlay interface, the address's prefix length, the
    interface's MTU and MAC (br-phy takes it: tunnels to this host are sent to it)."""

    interface: str
    prefixlen: int
    mtu: int
    mac: str


async def ensure_netdev_underlay(ovs: Ovs, settings: Settings,
                                 known: UnderlaySetup | None = None) -> UnderlaySetup:
    """Put the underlay address on ``br-phy`` holding the underlay interface.

    ``known``: what an earlier run found, for when OVS lost ``br-phy`` (its device and the
    address with it, or the device still holding the address) and nothing else tells.
    """
    ip = settings.underlay_ip
    if not ip:
        raise DataPlaneError("the netdev datapath needs --underlay-ip")
    found = await links.interface_with_address(ip)
    holder: str | None
    if found is not None:
        holder, prefixlen = found
    elif known is not None:
        holder, prefixlen = None, known.prefixlen
    else:
        raise DataPlaneError(f"no interface holds the underlay address {ip}")
    interface = settings.underlay_interface or (known.interface if known else None)
    if interface is None:
        if holder is not None and holder != PHYSICAL_BRIDGE:
            interface = holder
        else:
            # A re-run: the address already moved; the underlay port is the one br-phy holds.
            ports = [p.name for p in await ovs.list_ports(PHYSICAL_BRIDGE)]
            if len(ports) != 1:
                raise DataPlaneError(f"{PHYSICAL_BRIDGE} holds {ports or 'no ports'}; name the "
                                     "underlay interface with --underlay-interface")
            interface = ports[0]
    mtu, mac = await links.link_mtu_and_mac(interface)
    await ovs.ensure_bridge(PHYSICAL_BRIDGE, datapath="netdev", hwaddr=mac)
    await ovs.apply(PHYSICAL_BRIDGE, ensure=[OvsPort(
        interface, UNDERLAY_PORT_TYPE, None, False,
        {"powerplane-kind": "underlay"}, UNDERLAY_PORT_OPTIONS,
    )])
    # vswitchd may re-create br-phy's device (without the address) once it reads the bridge
    # back: a reconciliation that finds the address gone puts it back from what we knew.
    if holder != PHYSICAL_BRIDGE:
        await links.move_address(f"{ip}/{prefixlen}", holder or interface, PHYSICAL_BRIDGE)
    await links.set_mtu(PHYSICAL_BRIDGE, mtu)
    # br-phy is a tap read by userspace OVS: with offload on, the host's own TCP over the
    # underlay (Consul!) leaves with unfinished checksums and is dropped by the peer.
    await links.set_tx_checksum(PHYSICAL_BRIDGE, False)
    return UnderlaySetup(interface, prefixlen, mtu, mac)
