"""Simulated hosts as network namespaces on an isolated underlay.

``Underlay(n)`` makes one ``underlay`` namespace holding a Linux bridge (``br0``, the lab's
switch, 192.168.50.1/24 by default) and ``n`` host namespaces, each joined to that bridge by a
veth whose host end is named ``eth0`` and carries 192.168.50.11, .12, ... Nothing links the lab to
the root namespace and no namespace has a route out, so lab traffic cannot leave the lab.

Names are random (``ppt`` + this run's tag + 4 hex digits + ``-h1`` ...) because several test
runs share the machine; the run's tag lets its end-of-session check find its own namespaces
(tests/support/netns.py).
Processes run in a namespace through ``nsenter --net=/run/netns/NAME``, not ``ip netns exec``:
the latter remounts /sys, which breaks dockerd.

``close()`` kills what it started, deletes the namespaces and then asserts that nothing is left:
no namespace file or mount, no process inside a lab namespace, no interface named after the lab.
Anything found is removed before the assertion is raised, so a failing test still leaves the
machine clean.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.netns import unique_prefix

NETNS_DIR = Path("/run/netns")
DEFAULT_SUBNET = "192.168.50"  # a /24 that exists only inside the lab
BRIDGE = "br0"
FIRST_HOST_OCTET = 11


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns_inode(name: str) -> int:
    return os.stat(NETNS_DIR / name).st_ino


def _pids_in_netns(inodes: set[int]) -> dict[int, int]:
    """Every live (non-zombie) process whose network namespace is one of ``inodes``: pid → inode."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            inode = os.stat(entry / "ns" / "net").st_ino
            if inode not in inodes:
                continue
            # PID 1 reaps orphans slowly here: a zombie is dead already, whatever kill -0 says.
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found[int(entry.name)] = inode
    return found


class LabHost:
    """One namespace of the lab: a simulated host (or the underlay switch itself)."""

    def __init__(self, name: str, ip: str, index: int) -> None:
        self.name = name
        self.ip = ip
        self.index = index
        self._processes: list[subprocess.Popen[Any]] = []

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.name)

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` prefixed so they run inside this namespace."""
        return ["nsenter", f"--net={self.netns_path}", *args]

    def run(
        self, args: Sequence[str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` to completion in this namespace; output captured as text by default."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        result: subprocess.CompletedProcess[str] = subprocess.run(
            self.command(args), check=False, **kw
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(args)} exited {result.returncode}: "
                f"{result.stdout or ''}{result.stderr or ''}"
            )
        return result

    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``args`` in this namespace in its own process group; killed by ``close()``."""
        kw.setdefault("start_new_session", True)
        process: subprocess.Popen[Any] = subprocess.Popen(self.command(args), **kw)
        self._processes.append(process)
        return process

    def kill_processes(self, timeout: float = 5.0) -> None:
        """Terminate every process started with ``popen`` (and its group), then reap it."""
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self._processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self._processes.clear()

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, {self.ip!r})"


class Underlay:
    """N host namespaces on one isolated Linux bridge; a context manager that cleans up."""

    def __init__(
        self, n_hosts: int, *, name_prefix: str | None = None, subnet: str = DEFAULT_SUBNET
    ) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError("n_hosts must be between 1 and 200")
        self.prefix = name_prefix or unique_prefix()
        self.subnet = subnet
        self.underlay = LabHost(f"{self.prefix}-ul", f"{subnet}.1", 0)
        self.hosts = [
            LabHost(f"{self.prefix}-h{i}", f"{subnet}.{FIRST_HOST_OCTET + i - 1}", i)
            for i in range(1, n_hosts + 1)
        ]
        self._inodes: set[int] = set()
        self.extra: list[LabHost] = []
        self._created: list[LabHost] = []
        self._closed = False
        try:
            self._build()
        except BaseException:
            self.close(check=False)
            raise

    @property
    def namespaces(self) -> list[LabHost]:
        return [self.underlay, *self.hosts, *self.extra]

    def _add_netns(self, host: LabHost) -> None:
        _ip("netns", "add", host.name)
        self._created.append(host)
        self._inodes.add(_netns_inode(host.name))
        _ip("-n", host.name, "link", "set", "lo", "up")

    def add_namespace(self, suffix: str) -> LabHost:
        """An extra empty namespace (e.g. a container's), removed and checked by ``close()``."""
        host = LabHost(f"{self.prefix}-{suffix}", "", -1)
        self._add_netns(host)
        self.extra.append(host)
        return host

    def add_outside(self, octet: int = 250) -> LabHost:
        """A machine on the underlay that is no Powerplane host (the world outside the overlay).

        It has an address on the lab's isolated bridge and no route anywhere else; it knows
        nothing of the overlay networks, so whatever reaches it from a container came through
        a host's gateway and NAT.
        """
        host = LabHost(f"{self.prefix}-out", f"{self.subnet}.{octet}", -1)
        self._add_netns(host)
        self.extra.append(host)
        port = "pout"
        _ip("-n", self.underlay.name, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", host.name)
        _ip("-n", self.underlay.name, "link", "set", port, "master", BRIDGE, "up")
        self.underlay.run(["ethtool", "-K", port, "tx", "off"])
        _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", host.name, "link", "set", "eth0", "up")
        return host

    def _build(self) -> None:
        ul = self.underlay.name
        self._add_netns(self.underlay)
        _ip("-n", ul, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", ul, "addr", "add", f"{self.underlay.ip}/24", "dev", BRIDGE)
        _ip("-n", ul, "link", "set", BRIDGE, "up")
        for host in self.hosts:
            self._add_netns(host)
            # Both ends are born inside the lab: no interface ever appears in the root namespace.
            port = f"p{host.index}"
            _ip("-n", ul, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", host.name)
            _ip("-n", ul, "link", "set", port, "master", BRIDGE, "up")
            # A veth hands TCP on with checksums left to "hardware"; a userspace OVS reading the
            # host end never fills them in. Real NICs do: make the lab's wires behave like them.
            self.underlay.run(["ethtool", "-K", port, "tx", "off"])
            _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")

    def close(self, check: bool = True) -> None:
        """Kill started processes, delete every namespace; assert nothing is left (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for host in self.namespaces:
            host.kill_processes()
        leftovers: list[str] = []
        stray = self._kill_strays()
        if stray:
            leftovers.append(f"processes still inside lab namespaces: {sorted(stray)}")
        for host in reversed(self._created):
            subprocess.run(["ip", "netns", "delete", host.name], capture_output=True)
        leftovers.extend(self.leftovers())
        if check and leftovers:
            raise AssertionError("lab left things behind: " + "; ".join(leftovers))

    def _kill_strays(self, timeout: float = 5.0) -> set[int]:
        """SIGKILL every process still inside a lab namespace; return the pids that were found."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while (stray := _pids_in_netns(self._inodes)) and time.monotonic() < deadline:
            seen.update(stray)
            for pid in stray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        return seen

    def leftovers(self) -> list[str]:
        """What of this lab still exists on the machine (empty when fully cleaned up)."""
        found: list[str] = []
        for host in self.namespaces:
            if (NETNS_DIR / host.name).exists():
                found.append(f"namespace file {host.name}")
        mounts = Path("/proc/self/mountinfo").read_text()
        found.extend(f"mount of {h.name}" for h in self.namespaces if f"/{h.name} " in mounts)
        deadline = time.monotonic() + 5
        while (stray := _pids_in_netns(self._inodes)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if stray:
            found.append(f"processes {sorted(stray)}")
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        found.extend(f"interface {line.split(':')[1].strip()}" for line in links.splitlines()
                     if self.prefix in line)
        return found

    def __enter__(self) -> Underlay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # When the body already failed, clean up but let its error be the one reported.
        self.close(check=exc_type is None)
