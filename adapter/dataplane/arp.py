"""Gratuitous ARP: tell the underlay that an address now lives behind this host's MAC.

When a floating address moves to another host, neighbours (routers, the outside machine) still
hold the old host's MAC for it; one broadcast ARP announcement from the new owner updates them
at once instead of after their cache times out. The frame is 42 bytes of fixed layout (RFC 5227
announcement: an ARP request whose sender and target address are both the announced one),
sent on a raw packet socket; no library we use builds ARP frames.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

from adapter.errors import DataPlaneError

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ARP_REQUEST = 1


def announcement(ip: str, mac: str) -> bytes:
    """The Ethernet frame announcing ``ip`` at ``mac``."""
    sender = bytes.fromhex(mac.replace(":", ""))
    address = ipaddress.IPv4Address(ip).packed
    ethernet = BROADCAST + sender + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, ARP_REQUEST)
    return ethernet + arp + sender + address + b"\x00" * 6 + address


def _send(ifname: str, frame: bytes, count: int) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, 0))
        for _ in range(count):
            sock.send(frame)


async def announce(ifname: str, ip: str, mac: str, *, count: int = 2) -> None:
    """Send ``count`` gratuitous ARPs for ``ip`` at ``mac`` out of ``ifname``."""
    try:
        await asyncio.to_thread(_send, ifname, announcement(ip, mac), count)
    except OSError as exc:
        raise DataPlaneError(f"gratuitous ARP for {ip} on {ifname}: "
                             f"{exc.strerror or exc}") from exc
