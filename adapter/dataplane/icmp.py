"""ICMP echo probes from this host's underlay address: is a peer reachable, and do packets of
the size VXLAN needs reach it whole?

A raw ICMP socket (``doctor`` runs as root; the kernel's unprivileged "ping sockets" need
``net.ipv4.ping_group_range``, which is off by default) with ``IP_MTU_DISCOVER`` set to
``IP_PMTUDISC_DO``: every probe leaves with Don't Fragment set and the kernel never fragments
it. A packet larger than the route's known MTU is refused at ``send`` (EMSGSIZE) and
``IP_MTU`` tells the MTU the kernel knows; one larger than a link further on is dropped
there (a switch says nothing; a router sends "fragmentation needed"), so it simply gets no
answer. That is how an overlay breaks: ping works, TCP stalls.

When the wanted size does not pass, the largest size that does is searched in a few rounds of
at most ``PROBES_PER_ROUND`` probes sent together, each round narrowing the range, so a
broken path costs about three waits rather than one per size. Sizes are whole IP packets
(IP header included), as MTUs are.

The socket is non-blocking and driven by the event loop: probing many peers at once costs no
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import socket
import struct
import time
from dataclasses import dataclass

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
IP_HEADER = 20
ICMP_HEADER = 8
# Small enough to pass any IPv4 link (RFC 791 guarantees 68 bytes; 576 is the usual floor).
SMALL_PROBE = 84
PROBES_PER_ROUND = 16
# Copies of each decisive probe: one lost packet on a busy host must not read as a verdict.
COPIES = 3
# Linux's own constants (the socket module lacks some of them on some builds).
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_MTU = getattr(socket, "IP_MTU", 14)


@dataclass(frozen=True, slots=True)
class PathReport:
    """What the probes to one peer found.

    ``passes``: a DF packet of ``size`` bytes came back answered. When it does not,
    ``largest`` is the largest size that did (the path MTU as far as probes can tell) and
    ``local_mtu`` the MTU of this host's own route to the peer when that refused the size.
    """

    target: str
    size: int
    reachable: bool
    passes: bool
    largest: int | None = None
    local_mtu: int | None = None
    rtt: float | None = None  # seconds, of the first small probe answered


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def echo_request(ident: int, sequence: int, size: int) -> bytes:
    """An ICMP echo request that makes an IP packet of ``size`` bytes."""
    payload = bytes((sequence + i) & 0xFF for i in range(max(0, size - IP_HEADER - ICMP_HEADER)))
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, sequence)
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum(header + payload), ident,
                         sequence)
    return header + payload


def parse_echo_reply(packet: bytes, ident: int) -> int | None:
    """The sequence number of an echo reply to ``ident`` (a raw socket's read, IP header
    included), or None for anything else."""
    if len(packet) < IP_HEADER:
        return None
    start = (packet[0] & 0x0F) * 4
    if len(packet) < start + ICMP_HEADER:
        return None
    kind, _, _, reply_ident, sequence = struct.unpack_from("!BBHHH", packet, start)
    if kind != ICMP_ECHO_REPLY or reply_ident != ident:
        return None
    return int(sequence)


class _Prober:
    """One connected raw socket to one peer; sequence numbers name the sizes sent."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._ident = (os.getpid() ^ int.from_bytes(os.urandom(2), "big")) & 0xFFFF
        self._sequence = 0
        self.local_mtu: int | None = None
        self.first_rtt: float | None = None

    async def exchange(self, sizes: list[int], seconds: float) -> set[int]:
        """Send one probe per entry of ``sizes``; the sizes answered within ``seconds``."""
        sent: dict[int, tuple[int, float]] = {}
        for size in sizes:
            self._sequence = (self._sequence + 1) & 0xFFFF
            try:
                await self._loop.sock_sendall(self._sock,
                                              echo_request(self._ident, self._sequence, size))
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                self.local_mtu = self._sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
                continue
            sent[self._sequence] = (size, time.monotonic())
        answered: set[int] = set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while sent:
                    packet = await self._loop.sock_recv(self._sock, 65535)
                    sequence = parse_echo_reply(packet, self._ident)
                    if sequence is None or sequence not in sent:
                        continue
                    size, at = sent.pop(sequence)
                    if self.first_rtt is None:
                        self.first_rtt = time.monotonic() - at
                    answered.add(size)
        return answered


async def probe_path(target: str, size: int, *, source: str | None = None,
                     wait: float = 2.0, search_wait: float = 1.0) -> PathReport:
    """Probe ``target`` from ``source``: reachable? do DF packets of ``size`` bytes pass?

    Takes at most ``2 * wait`` when the path is sound, plus a few ``search_wait`` rounds
    when it is not. Raises ``PermissionError`` without the right to open raw sockets and
    ``OSError`` when ``source`` is no address of this host or no route leads to ``target``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setblocking(False)
        if source:
            sock.bind((source, 0))
        # Connected: the kernel hands this socket only what comes from the peer.
        sock.connect((target, 0))
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        prober = _Prober(sock)
        if not await prober.exchange([SMALL_PROBE] * COPIES, wait):
            return PathReport(target, size, reachable=False, passes=False)
        if await prober.exchange([size] * COPIES, wait):
            return PathReport(target, size, True, True, rtt=prober.first_rtt)
        largest, too_big = SMALL_PROBE, size
        if prober.local_mtu is not None:
            too_big = min(too_big, prober.local_mtu + 1)
        while too_big - largest > 1:
            step = max(1, math.ceil((too_big - largest) / PROBES_PER_ROUND))
            candidates = list(range(largest + step, too_big, step))
            answered = await prober.exchange(candidates, search_wait)
            largest = max(answered, default=largest)
            too_big = min((c for c in candidates if c > largest and c not in answered),
                          default=too_big)
        return PathReport(target, size, True, False, largest=largest,
                          local_mtu=prober.local_mtu, rtt=prober.first_rtt)
