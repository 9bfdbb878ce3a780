"""The underlay path to each peer: does it answer, and do packets of the size VXLAN needs pass?

A container sends frames of the overlay MTU; VXLAN wraps each in 50 bytes (outer IP, UDP,
VXLAN and inner Ethernet headers), so the underlay must carry IP packets of overlay MTU + 50
from this host's underlay address to each peer's, unfragmented. Where it cannot, small packets
pass (ping works) and full-size ones vanish (TCP stalls): the commonest reason an overlay
"does not work". Each peer is probed with ICMP echoes from the underlay address, Don't
Fragment set, of that size (adapter/dataplane/icmp.py); all peers at once.

The peers are the registered hosts (Consul) and, should Consul be unusable, the far ends of the
tunnels on the bridge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from adapter.dataplane import icmp, underlay
from adapter.dataplane.switch import VXLAN_OVERHEAD, Tunnel
from adapter.model import Host, Network
from adapter.network.findings import CHECK_SECONDS, Finding
from adapter.settings import Settings


def peers(settings: Settings, hosts: Iterable[Host]) -> list[Host]:
    """The registered hosts that this host builds tunnels to."""
    return [h for h in hosts if h.host_id != settings.host_id and h.underlay_ip
            and h.underlay_ip != settings.underlay_ip]


async def overlay_mtu(settings: Settings, serve_status: Mapping[str, Any] | None,
                      networks: Sequence[Network]) -> tuple[int, str]:
    """The largest frame a container may send here, and where that figure comes from."""
    reported = (serve_status or {}).get("overlay_mtu")
    if isinstance(reported, int):
        mtu, source = reported, "the overlay MTU serve uses"
    elif settings.mtu is not None:
        mtu, source = settings.mtu, "the overlay MTU (--mtu)"
    else:
        link_mtu, _ = await underlay.underlay_link(settings)
        mtu, source = link_mtu - VXLAN_OVERHEAD, "the overlay MTU (underlay MTU - 50)"
    widest = max(networks, key=lambda n: n.mtu or 0, default=None)
    if widest is not None and widest.mtu and widest.mtu > mtu:
        mtu, source = widest.mtu, f"network {widest.name}'s MTU"
    return mtu, source


def path_finding(name: str, report: icmp.PathReport, *, source_ip: str, mtu: int,
                 mtu_source: str) -> Finding:
    """One peer's probe results, in words."""
    check = f"peer {name}"
    where = f"{name} ({report.target})"
    if not report.reachable:
        return Finding.bad(
            check, f"peer {where} does not answer ping from {source_ip}: its tunnels carry "
            "nothing", "check the underlay between the two hosts (addresses, routes, "
            "firewalls: ICMP and UDP 4789 must pass) and that the peer is up")
    if report.passes:
        rtt = f", rtt {report.rtt * 1000:.1f} ms" if report.rtt is not None else ""
        return Finding.good(check, f"{where}: reachable, {report.size}-byte packets pass "
                            f"unfragmented{rtt}")
    largest = report.largest or 0
    if report.local_mtu is not None and report.local_mtu < report.size:
        limit = f"this host's own route to it allows only {report.local_mtu} bytes"
    else:
        limit = f"the largest that passes is {largest} bytes (the underlay path MTU)"
    return Finding.bad(
        check, f"peer {where} is reachable, but packets of {report.size} bytes ({mtu_source} "
        f"{mtu} + {VXLAN_OVERHEAD} of VXLAN) do not pass: {limit}. Small packets pass, full "
        "frames vanish: ping works, TCP stalls",
        f"lower the overlay MTU to {largest - VXLAN_OVERHEAD} (serve --mtu "
        f"{largest - VXLAN_OVERHEAD} on every host, and recreate the containers), or raise "
        f"the MTU of every underlay link between the hosts to {report.size}")


async def check_peers(settings: Settings, *, hosts: Sequence[Host] | None,
                      tunnels: Sequence[Tunnel], networks: Sequence[Network],
                      serve_status: Mapping[str, Any] | None) -> list[Finding]:
    """A finding per peer: reachable, and packets of overlay MTU + 50 bytes pass."""
    source_ip = settings.underlay_ip
    if not source_ip:
        return [Finding.skipped("peers", "no --underlay-ip: a single host has no tunnels")]
    targets = {h.underlay_ip: h.host_id for h in peers(settings, hosts or [])}
    for tunnel in tunnels:
        targets.setdefault(tunnel.remote_ip, tunnel.host_id or tunnel.remote_ip)
    if not targets:
        if hosts is None:
            return [Finding.skipped("peers", "Consul is unusable and no tunnel is on the "
                                    "bridge: the peers are unknown")]
        return [Finding.good("peers", "no other host is registered")]
    mtu, mtu_source = await overlay_mtu(settings, serve_status, networks)
    size = mtu + VXLAN_OVERHEAD

    async def probe(ip: str, name: str) -> Finding:
        try:
            async with asyncio.timeout(CHECK_SECONDS):
                report = await icmp.probe_path(ip, size, source=source_ip)
        except TimeoutError:
            return Finding.bad(f"peer {name}", f"probing {name} ({ip}) took over "
                               f"{CHECK_SECONDS:g} s", "is this host overloaded? run again")
        except PermissionError:
            return Finding.bad(f"peer {name}", "cannot probe peers: raw ICMP sockets need "
                               "root (CAP_NET_RAW)", "run powerplane doctor as root")
        except OSError as exc:
            return Finding.bad(f"peer {name}", f"cannot probe {name} ({ip}) from {source_ip}: "
                               f"{exc.strerror or exc}", f"check that {source_ip} is an "
                               "address of this host (--underlay-ip) and routes reach the peer")
        return path_finding(name, report, source_ip=source_ip, mtu=mtu,
                            mtu_source=mtu_source)

    return list(await asyncio.gather(*(probe(ip, name)
                                       for ip, name in sorted(targets.items(),
                                                              key=lambda t: t[1]))))
