"""What the kernel offers the chosen OVS datapath, read from /sys, /proc and /dev.

``system`` (the kernel datapath) needs the ``openvswitch`` and ``vxlan`` modules. ``netdev``
(userspace) needs ``/dev/net/tun`` for the bridge's internal ports (the gateway ports, and the
tap that holds the underlay address) and AF_XDP sockets for the underlay port, which
Powerplane makes of type ``afxdp-nonpmd`` (adapter/dataplane/underlay.py).

A module counts as present when it is loaded (``/proc/modules``), or built in: a built-in module
shows in ``/sys/module`` only when it has parameters, so ``modules.builtin`` is read too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AF_XDP = getattr(socket, "AF_XDP", 44)


@dataclass(frozen=True, slots=True)
class KernelFeature:
    """One thing a datapath needs from the kernel, and whether this kernel has it."""

    name: str
    present: bool
    needed_for: str
    fix: str


def _module_present(name: str, root: Path) -> bool:
    if (root / "sys/module" / name).is_dir():
        return True
    try:
        loaded = (root / "proc/modules").read_text()
    except OSError:
        loaded = ""
    if any(line.split(" ", 1)[0] == name for line in loaded.splitlines()):
        return True
    try:
        builtin = (root / "lib/modules" / os.uname().release / "modules.builtin").read_text()
    except OSError:
        return False
    return any(Path(line).name.split(".ko")[0].replace("-", "_") == name
               for line in builtin.splitlines())


def _af_xdp_supported() -> bool:
    try:
        socket.socket(AF_XDP, socket.SOCK_RAW, 0).close()
    except OSError:
        return False
    return True


def datapath_features(datapath: str, *, root: Path = Path("/"),
                      af_xdp: Callable[[], bool] = _af_xdp_supported) -> list[KernelFeature]:
    """Every kernel feature ``datapath`` needs, present or not (``root`` and ``af_xdp``: for
    tests)."""
    if datapath == "system":
        return [
            KernelFeature(
                "openvswitch module", _module_present("openvswitch", root),
                "the kernel datapath itself",
                "modprobe openvswitch; if the kernel has no such module, run serve with "
                "--datapath netdev (userspace)"),
            KernelFeature(
                "vxlan module", _module_present("vxlan", root), "the VXLAN tunnel ports",
                "modprobe vxlan"),
        ]
    return [
        KernelFeature(
            "/dev/net/tun", (root / "dev/net/tun").exists(),
            "internal ports (gateways, br-phy) of the userspace datapath",
            "modprobe tun; in a container, pass --device /dev/net/tun"),
        KernelFeature(
            "AF_XDP sockets", af_xdp(),
            "the underlay port (type afxdp-nonpmd)",
            "use a kernel built with CONFIG_XDP_SOCKETS (4.18 or later)"),
    ]
