"""Kernel settings of this host's network namespace that the gateways need.

``/proc/sys`` files of the namespace ``serve`` runs in; a write is a few bytes to procfs that
the kernel handles synchronously, so it runs inline. Errors are translated into
``DataPlaneError``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adapter.errors import DataPlaneError

log = logging.getLogger(__name__)

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def ensure_ipv4_forwarding(path: Path = IP_FORWARD) -> bool:
    """Turn IPv4 forwarding on in this namespace (dockerd does the same); True if it was off.

    A gateway routes between its network and the host's other interfaces; what may cross is
    decided by Powerplane's nftables table, not by this switch.
    """
    try:
        if path.read_text().strip() == "1":
            return False
        path.write_text("1\n")
    except OSError as exc:
        raise DataPlaneError(f"cannot enable IPv4 forwarding ({path}): "
                             f"{exc.strerror or exc}") from exc
    log.info("enabled IPv4 forwarding (%s), as the gateways route for their networks", path)
    return True


def silence_port(ifname: str, root: Path = Path("/proc/sys/net")) -> None:
    """Keep this host's own stack off a container port's host-side veth.

    With the userspace datapath the kernel sees every frame a container sends on that veth,
    next to OVS. Once the host holds gateway addresses it would answer ARP for them there,
    with the veth's MAC, racing the real gateway (and winning: its reply skips the switch).
    ``arp_ignore=8`` answers no ARP on it and IPv6 off stops neighbour discovery and the
    link-local address; IP that still reaches the stack there is dropped by the firewall.
    """
    settings = ((root / "ipv4" / "conf" / ifname / "arp_ignore", "8"),
                (root / "ipv6" / "conf" / ifname / "disable_ipv6", "1"))
    for path, value in settings:
        try:
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
        except FileNotFoundError:
            continue  # IPv6 disabled on this host: nothing to silence
        except OSError as exc:
            raise DataPlaneError(f"cannot set {path}: {exc.strerror or exc}") from exc
