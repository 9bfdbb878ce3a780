"""Forwarding the names we do not hold to the host's upstream resolvers.

Each upstream in turn, over UDP (a socket of its own per query, so the source port is random
and only the upstream's reply can reach it), with a fresh message id; a truncated reply is
asked again over TCP. Every attempt has a timeout and the whole forward a deadline, so a
client hears SERVFAIL from the server before its own resolver gives up, never silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapter.network.dns_wire import is_reply_to, is_truncated, query_for, with_id
from adapter.settings import parse_host_port

log = logging.getLogger(__name__)

DNS_PORT = 53
ATTEMPT_TIMEOUT = 1.5  # one upstream, one transport
FORWARD_DEADLINE = 3.0  # all of them: glibc's resolver waits 5 s before it gives up
MAX_MESSAGE = 65535


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address; ValueError otherwise."""
    return Upstream(*parse_host_port(text, DNS_PORT))


def resolv_conf_upstreams(text: str) -> tuple[Upstream, ...]:
    """The ``nameserver`` lines of a resolv.conf, in order; lines that are no address are
    skipped (a resolv.conf is the host's, not ours to refuse)."""
    found: list[Upstream] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                upstream = parse_upstream(words[1].partition("%")[0])
                if upstream not in found:
                    found.append(upstream)
    return tuple(found)


async def host_upstreams(path: Path = Path("/etc/resolv.conf")) -> tuple[Upstream, ...]:
    """The host's resolvers, read once at start (off the event loop: it is a file)."""
    try:
        text = await asyncio.to_thread(path.read_text)
    except OSError as exc:
        log.warning("cannot read %s (%s): names that are not containers' will fail",
                    path, exc.strerror or exc)
        return ()
    return resolv_conf_upstreams(text)


class _OneReply(asyncio.DatagramProtocol):
    """A UDP socket that waits for the one reply to its query."""

    def __init__(self, message_id: int) -> None:
        self.message_id = message_id
        self.reply: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if is_reply_to(data, self.message_id) and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable: nobody listens there; the next upstream at once, not a timeout.
        if not self.reply.done():
            self.reply.set_result(None)


class Forwarder:
    """Asks the upstreams a query we do not answer ourselves."""

    def __init__(self, upstreams: Iterable[Upstream], *, attempt_timeout: float = ATTEMPT_TIMEOUT,
                 deadline: float = FORWARD_DEADLINE) -> None:
        self.upstreams = tuple(upstreams)
        self._attempt_timeout = attempt_timeout
        self._deadline = deadline

    async def forward(self, query: bytes) -> bytes | None:
        """The first upstream's reply, with the query's own id; None when none answered."""
        client_id = int.from_bytes(query[:2], "big")
        ends = time.monotonic() + self._deadline
        for upstream in self.upstreams:
            left = ends - time.monotonic()
            if left <= 0:
                break
            message_id = secrets.randbelow(65536)
            asked = with_id(query, message_id)
            reply = await self._udp(upstream, asked, message_id,
                                    min(left, self._attempt_timeout))
            if reply is not None and is_truncated(reply):
                left = ends - time.monotonic()
                if left > 0:
                    # No TCP answer: the truncated one still tells the client to use TCP.
                    reply = await self._tcp(upstream, asked, message_id,
                                            min(left, self._attempt_timeout)) or reply
            if reply is not None:
                return with_id(reply, client_id)
            log.debug("upstream %s did not answer", upstream)
        return None

    async def _udp(self, upstream: Upstream, query: bytes, message_id: int,
                   seconds: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _OneReply(message_id), remote_addr=(upstream.host, upstream.port))
        except OSError as exc:
            log.debug("upstream %s: %s", upstream, exc)
            return None
        try:
            transport.sendto(query)
            async with asyncio.timeout(seconds):
                return await protocol.reply
        except TimeoutError:
            return None
        finally:
            transport.close()

    async def _tcp(self, upstream: Upstream, query: bytes, message_id: int,
                   seconds: float) -> bytes | None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(seconds):
                reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
                writer.write(len(query).to_bytes(2, "big") + query)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(size)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("upstream %s over TCP: %s", upstream, exc)
            return None
        finally:
            if writer is not None:
                writer.close()
        return reply if is_reply_to(reply, message_id) else None


async def probe(address: str, port: int = DNS_PORT, seconds: float = 1.0) -> bool:
    """True when a DNS server answers at ``address`` (``powerplane status``'s check): a
    single-label name no container may have is answered by the server itself, never
    forwarded."""
    message_id = secrets.randbelow(65536)
    query = query_for("powerplane-status-probe", message_id=message_id)
    return await Forwarder([Upstream(address, port)], attempt_timeout=seconds,
                           deadline=seconds).forward(query) is not None
