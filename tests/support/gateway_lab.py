"""One host's gateways and an outside, built from network namespaces, for the host firewall.

    a  10.71.0.2 ── gwa 10.71.0.1 ─┐
    b  10.72.0.2 ── gwb 10.72.0.1 ─┼─ host ── uplink 192.0.2.1, .3 (+ .10/32) ── out 192.0.2.2
    c  10.73.0.2 ── gwc 10.73.0.1 ─┘

No OVS: each gateway port is the host end of a veth whose other end is a container's ``eth0``
(default route via its gateway). The host forwards, with reverse-path filtering off, so nothing
but the firewall decides what passes. ``out`` stands for the world: it reaches the host's
address and, through the host only, the overlay ranges (10.64.0.0/10), as a neighbour on the
underlay could; no namespace has a route anywhere else. ``a`` also holds two addresses it has no
right to (10.72.0.66 in b's subnet, 10.99.0.5 in none) to send forged packets from.

Every namespace runs echo servers (tests/support/echo.py) that log who reached them: a, b: tcp
8000, udp 8001; host: tcp 7000, udp 7001; out: tcp 9000, udp 9001. The firewall itself runs in
a separate process entered into the host namespace (tests/support/firewall_cli.py).
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support.netns import NETNS_DIR, add_netns, delete_netns

ROOT = Path(__file__).resolve().parents[2]
ECHO = str(Path(__file__).with_name("echo.py"))
FIREWALL_CLI = str(Path(__file__).with_name("firewall_cli.py"))
READY_WAIT = 10.0

CONTAINERS = {"a": "10.71.0", "b": "10.72.0", "c": "10.73.0"}  # role → its /24, gateway .1
OUTSIDE_HOST_IP = "192.0.2.1"
SECOND_HOST_IP = "192.0.2.3"  # another address of the host, on the same link
OUTSIDE_IP = "192.0.2.2"
FLOATING_IP = "192.0.2.10"
FORGED_IPS = ("10.72.0.66", "10.99.0.5")
SERVERS = {"a": (8000, 8001), "b": (8000, 8001), "host": (7000, 7001), "out": (9000, 9001)}


class EchoServer:
    """One echo server in a namespace, with the log of whom it heard."""

    def __init__(self, command: Sequence[str]) -> None:
        self._ready = threading.Event()
        self._seen: dict[str, str] = {}  # token → the source address it arrived from
        self._changed = threading.Condition()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip() == "ready":
                self._ready.set()
                continue
            peer, _, token = line.strip().partition(" ")
            with self._changed:
                self._seen.setdefault(token, peer)
                self._changed.notify_all()

    def wait_ready(self) -> None:
        if not self._ready.wait(READY_WAIT):
            raise RuntimeError(f"echo server never got ready: {self.process.args}")

    def saw(self, token: str, timeout: float = 0.0) -> str | None:
        """The source address ``token`` arrived from, waiting up to ``timeout``; None if not."""
        with self._changed:
            self._changed.wait_for(lambda: token in self._seen, timeout)
            return self._seen.get(token)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self._reader.join(timeout=5)


class GatewayLab:
    """The namespaces above, their servers, and the verbs tests use on them."""

    def __init__(self) -> None:
        self.netns: dict[str, str] = {}
        self.servers: dict[tuple[str, str], EchoServer] = {}
        self._tokens = itertools.count()

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(cls) -> GatewayLab:
        lab = cls()
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    def _build(self) -> None:
        for role in ("host", *CONTAINERS, "out"):
            self.netns[role] = add_netns(f"fw{role}")
        # Before any interface exists: new interfaces copy "default".
        self.run("host", ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward; "
                          "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; "
                          "echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter"])
        for role, net in CONTAINERS.items():
            self._veth(f"gw{role}", f"{net}.1/24", role, f"{net}.2/24")
            self.ip(role, "route", "add", "default", "via", f"{net}.1")
        self._veth("uplink", f"{OUTSIDE_HOST_IP}/24", "out", f"{OUTSIDE_IP}/24")
        self.ip("host", "addr", "add", f"{SECOND_HOST_IP}/24", "dev", "uplink")
        self.ip("host", "addr", "add", f"{FLOATING_IP}/32", "dev", "uplink")
        self.ip("out", "route", "add", "10.64.0.0/10", "via", OUTSIDE_HOST_IP)
        for forged in FORGED_IPS:
            self.ip("a", "addr", "add", f"{forged}/32", "dev", "eth0")
        for role, (tcp, udp) in SERVERS.items():
            for proto, port in (("tcp", tcp), ("udp", udp)):
                self.servers[role, proto] = EchoServer(
                    self.command(role, [sys.executable, ECHO, "serve", proto, str(port)]))
        for server in self.servers.values():
            server.wait_ready()

    def _veth(self, host_end: str, host_ip: str, role: str, peer_ip: str) -> None:
        self.ip("host", "link", "add", host_end, "type", "veth", "peer", "name", "eth0",
                "netns", self.netns[role])
        self.ip("host", "addr", "add", host_ip, "dev", host_end)
        self.ip("host", "link", "set", host_end, "up")
        self.ip(role, "addr", "add", peer_ip, "dev", "eth0")
        self.ip(role, "link", "set", "eth0", "up")

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        for name in self.netns.values():
            delete_netns(name)
        self.netns.clear()

    def __enter__(self) -> GatewayLab:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- running things inside ----------------------------------------------------------------

    def command(self, role: str, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.netns[role]}", *argv]

    def run(self, role: str, argv: Sequence[str], *, check: bool = True,
            stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(role, argv), input=stdin, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in {role} failed ({done.returncode}): "
                                 f"{done.stdout}{done.stderr}")
        return done

    def ip(self, role: str, *args: str) -> None:
        subprocess.run(["ip", "-n", self.netns[role], *args], check=True, capture_output=True,
                       timeout=30)

    def nft(self, *args: str) -> str:
        """``nft`` in the host namespace, as an administrator would run it by hand."""
        return self.run("host", ["nft", *args]).stdout

    def token(self) -> str:
        return f"t{next(self._tokens)}"

    def ask(self, role: str, proto: str, host: str, port: int, token: str, *,
            bind: str | None = None, timeout: float = 5.0) -> str | None:
        """From ``role``, send ``token`` to host:port; the source address the server reports
        in its answer, or None when no answer came within ``timeout``."""
        argv = [sys.executable, ECHO, "ask", proto, host, str(port), token,
                "--timeout", str(timeout), *(["--bind", bind] if bind else [])]
        done = self.run(role, argv, check=False, timeout=timeout + 30)
        return done.stdout.strip() or None

    def ping(self, role: str, address: str, count: int = 2, wait: float = 1.0) -> int:
        """How many of ``count`` echo requests from ``role`` got a reply."""
        done = self.run(role, ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait),
                               address], check=False, timeout=count + wait + 30)
        received = re.search(r"(\d+) (?:packets )?received", done.stdout)
        if received is None:
            raise AssertionError(f"ping in {role} printed no summary: {done.stdout}{done.stderr}")
        return int(received.group(1))

    # -- the firewall, run inside the host --------------------------------------------------

    def firewall(self, command: str, table: str, ruleset_json: str = "") -> str:
        done = self.run("host", [sys.executable, FIREWALL_CLI, command, table],
                        stdin=ruleset_json, check=False)
        if done.returncode != 0:
            raise AssertionError(f"firewall {command} failed: {done.stderr}")
        return done.stdout.strip()
