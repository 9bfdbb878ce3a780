"""The DNS server on every gateway address of this host (UDP and TCP, port 53).

The gateway a query arrives at decides its network, and so which names it may see: a
container asks its own gateway (the firewall drops what one network sends to another's
gateway), and a name of another network is NXDOMAIN, like two Docker networks.

    single-label name (web, its hostname, an alias)  → the network's addresses, or NXDOMAIN
    PTR of an address inside the network's subnet    → the name holding it, or NXDOMAIN
    anything else                                    → the upstreams (adapter.network.dns_forward)

Names come from memory (``adapter.network.names``), so an answer never waits on Consul. The
server follows the gateway ports: it listens on a gateway address as soon as the data plane
makes the port, and stops when the port goes. Its sockets are bound with IP_FREEBIND, so a
gateway whose device is made again (a vswitchd restart) keeps its listener.

Bounds, so hostile input costs little and holds nothing: a query is looked at only through its
header until it has proved to be one short question (``adapter.network.dns_wire``); forwards
in flight are capped; TCP connections are capped per address, each has an idle timeout, a
length over ``MAX_QUERY`` closes it, and its one buffer is the message being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from adapter.errors import PowerplaneError
from adapter.network.dns_forward import DNS_PORT, Forwarder
from adapter.network.dns_wire import (
    MAX_QUERY,
    Query,
    answer_addresses,
    answer_pointer,
    no_such_name,
    parse_query,
    server_failure,
    truncated,
)
from adapter.network.names import NameCache

log = logging.getLogger(__name__)

TTL = 5  # seconds: containers come and go; a cache must not outlive one for long
MAX_FORWARDS = 256  # forwards in flight at once, all addresses together
# Our own answers kept packed, by network and query (less its id); dropped whole when the names
# change or it is full, so no input makes it grow past this.
MAX_CACHED_ANSWERS = 4096
MAX_TCP_CONNECTIONS = 64  # per address
TCP_IDLE_TIMEOUT = 10.0
TCP_READ_TIMEOUT = 5.0  # a message announced by its length must arrive in this time
# Linux's IP_FREEBIND, which Python's socket module names only from 3.12.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


@dataclass(frozen=True, slots=True)
class Scope:
    """The network a gateway address answers for."""

    network: str
    address: str
    subnet: ipaddress.IPv4Network


class GatewayLike(Protocol):
    @property
    def network(self) -> str: ...

    @property
    def address(self) -> str: ...  # gateway/prefix

    @property
    def subnet(self) -> str: ...


class GatewaySource(Protocol):
    """What the server needs of ``adapter.dataplane.switch.DataPlane``."""

    async def gateways(self) -> Sequence[GatewayLike]: ...

    def gateway_generation(self) -> int: ...

    async def gateways_changed(self, since: int, seconds: float) -> None: ...


def scope_of(gateway: GatewayLike) -> Scope | None:
    try:
        return Scope(gateway.network, gateway.address.partition("/")[0],
                     ipaddress.IPv4Network(gateway.subnet))
    except ValueError:
        return None


class Resolver:
    """Answers one query within one network's scope."""

    def __init__(self, names: NameCache, forwarder: Forwarder) -> None:
        self.names = names
        self.forwarder = forwarder
        self._forwards = 0
        # dnslib parses and packs in pure Python (some 0.3 ms a query); a container asks the
        # same few names again and again, and the answer to the same bytes on the same network
        # is the same bytes, but for the id, until the names change.
        self._answers: dict[tuple[str, bytes], bytes] = {}
        self._answers_generation = -1

    def local(self, query: Query, scope: Scope) -> bytes | None:
        """Our answer, or None when the query is for the upstreams."""
        address = query.reverse_address
        if address is not None and ipaddress.IPv4Address(address) in scope.subnet:
            name = self.names.name_of(scope.network, address)
            return no_such_name(query) if name is None else answer_pointer(query, name, TTL)
        if query.name and "." not in query.name:
            found = self.names.addresses(scope.network, query.name)
            return answer_addresses(query, found, TTL) if found else no_such_name(query)
        return None

    def immediate(self, data: bytes, scope: Scope) -> Query | bytes | None:
        """What to send at once, or the query to forward, or None (dropped)."""
        if self._answers_generation != self.names.generation:
            self._answers.clear()
            self._answers_generation = self.names.generation
        key = (scope.network, data[2:])
        cached = self._answers.get(key)
        if cached is not None:
            return data[:2] + cached
        parsed = parse_query(data)
        if not isinstance(parsed, Query):
            return parsed
        answer = self.local(parsed, scope)
        if answer is None:
            return parsed
        if len(self._answers) >= MAX_CACHED_ANSWERS:
            self._answers.clear()
        self._answers[key] = answer[2:]
        return answer

    async def forward(self, query: Query, data: bytes, *, udp: bool) -> bytes:
        if self._forwards >= MAX_FORWARDS:
            return server_failure(query)
        self._forwards += 1
        try:
            reply = await self.forwarder.forward(data)
        finally:
            self._forwards -= 1
        if reply is None:
            return server_failure(query)
        return truncated(query) if udp and len(reply) > query.udp_limit else reply

    async def answer(self, data: bytes, scope: Scope, *, udp: bool) -> bytes | None:
        first = self.immediate(data, scope)
        if isinstance(first, Query):
            return await self.forward(first, data, udp=udp)
        return first


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, scope: Scope) -> None:
        self._resolver = resolver
        self._scope = scope
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The loop's class need not derive from DatagramTransport (3.11's selector one does
        # not); it has sendto all the same.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        # A container's name is answered here and now, without a task.
        first = self._resolver.immediate(data, self._scope)
        if isinstance(first, bytes):
            self._send(first, addr)
        elif isinstance(first, Query):
            task = asyncio.create_task(self._forward(first, data, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _forward(self, query: Query, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._send(await self._resolver.forward(query, data, udp=True), addr)

    def _send(self, reply: bytes, addr: tuple[str | int, ...]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a reply to a client that left: nothing to do

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        for task in self._tasks:
            task.cancel()


def _bound_socket(kind: int, address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """UDP and TCP on one gateway address."""

    def __init__(self, resolver: Resolver, scope: Scope, port: int) -> None:
        self.scope = scope
        self._resolver = resolver
        self._port = port
        self._udp: _Udp | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        udp_socket = _bound_socket(socket.SOCK_DGRAM, self.scope.address, self._port)
        try:
            tcp_socket = _bound_socket(socket.SOCK_STREAM, self.scope.address, self._port)
        except OSError:
            udp_socket.close()
            raise
        _, self._udp = await loop.create_datagram_endpoint(
            lambda: _Udp(self._resolver, self.scope), sock=udp_socket)
        self._tcp = await asyncio.start_server(self._serve_connection, sock=tcp_socket,
                                               limit=MAX_QUERY + 2)

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                if not 0 < size <= MAX_QUERY:
                    break  # no query is that long: whatever follows is not DNS
                async with asyncio.timeout(TCP_READ_TIMEOUT):
                    data = await reader.readexactly(size)
                reply = await self._resolver.answer(data, self.scope, udp=False)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(TCP_READ_TIMEOUT):
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._connections):
            task.cancel()
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):  # not wait_for: it can lose a cancellation
                    await self._tcp.wait_closed()


@dataclass(frozen=True, slots=True)
class ListenerState:
    network: str
    address: str
    error: str = ""


class DnsServer:
    """Listens on every gateway of this host; follows them as they come and go."""

    def __init__(self, resolver: Resolver, gateways: GatewaySource, *, interval: float,
                 port: int = DNS_PORT,
                 on_change: Callable[[list[ListenerState]], None] | None = None) -> None:
        self.resolver = resolver
        self._gateways = gateways
        self._interval = interval
        self._port = port
        self._listeners: dict[Scope, Listener] = {}
        self._failed: dict[Scope, str] = {}
        self._on_change = on_change

    def listening(self) -> list[ListenerState]:
        return sorted([ListenerState(s.network, s.address) for s in self._listeners]
                      + [ListenerState(s.network, s.address, e) for s, e in self._failed.items()],
                      key=lambda state: (state.network, state.address))

    async def run(self) -> None:
        try:
            while True:
                generation = self._gateways.gateway_generation()
                try:
                    gateways = await self._gateways.gateways()
                except PowerplaneError as exc:
                    log.warning("DNS: cannot list the gateways (%s); keeping what listens", exc)
                else:
                    await self.follow(gateways)
                await self._gateways.gateways_changed(generation, self._interval)
        finally:
            await asyncio.shield(self.close())

    async def follow(self, gateways: Sequence[GatewayLike]) -> None:
        """Listen on exactly these gateways' addresses."""
        wanted = {scope for g in gateways if (scope := scope_of(g)) is not None}
        before = self.listening()
        for scope in [s for s in self._listeners if s not in wanted]:
            await self._listeners.pop(scope).close()
            log.info("DNS: stopped on %s (%s)", scope.address, scope.network)
        self._failed = {s: e for s, e in self._failed.items() if s in wanted}
        for scope in wanted - set(self._listeners):
            listener = Listener(self.resolver, scope, self._port)
            try:
                await listener.start()
            except OSError as exc:
                await listener.close()
                error = exc.strerror or str(exc)
                if self._failed.get(scope) != error:
                    log.warning("DNS: cannot listen on %s:%d (%s): %s", scope.address,
                                self._port, scope.network, error)
                self._failed[scope] = error
                continue
            self._failed.pop(scope, None)
            self._listeners[scope] = listener
            log.info("DNS: answering %s on %s:%d", scope.network, scope.address, self._port)
        if self._on_change is not None and self.listening() != before:
            self._on_change(self.listening())

    async def close(self) -> None:
        listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            await listener.close()

