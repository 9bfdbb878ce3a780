"""The DNS server on loopback: names per network, PTR, forwarding to an upstream this test runs
(UDP, TCP after a truncated answer, dead and silent upstreams), hostile input.

The server runs in the test's event loop on 127.0.0.x addresses standing in for two gateways;
the gateway list is a stub (the data plane's part is tested in the lab). The upstream is a
small dnslib server of the test's own on loopback: no query leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

import pytest
from dnslib import RR, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.model import Endpoint
from adapter.network import dns_server
from adapter.network.dns_forward import Forwarder, Upstream, resolv_conf_upstreams
from adapter.network.dns_server import DnsServer, Resolver, Scope
from adapter.network.dns_wire import Answer, parse_query, query_for, read_answer
from adapter.network.names import NameCache
from tests.support.consul import free_port

BLUE = "127.0.0.21"
RED = "127.0.0.22"


@dataclass(frozen=True)
class Gw:
    network: str
    address: str
    subnet: str


class Gateways:
    """A stub of the data plane's gateway list."""

    def __init__(self, gateways: Sequence[Gw]) -> None:
        self.list = list(gateways)
        self.generation = 0
        self.moved = asyncio.Event()

    async def gateways(self) -> Sequence[Gw]:
        return list(self.list)

    def gateway_generation(self) -> int:
        return self.generation

    async def gateways_changed(self, since: int, seconds: float) -> None:
        if since == self.generation:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.moved.wait()

    def set(self, gateways: Sequence[Gw]) -> None:
        self.list = list(gateways)
        self.generation += 1
        self.moved.set()
        self.moved = asyncio.Event()


class Upstreams(asyncio.DatagramProtocol):
    """The test's own resolver: ``outside.test`` A 192.0.2.7; ``big.test`` 40 TXT records,
    truncated over UDP as a real server does; anything else NXDOMAIN."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.udp_queries = 0
        self.tcp_queries = 0

    def answer(self, data: bytes, *, udp: bool) -> bytes:
        query = DNSRecord.parse(data)
        reply = query.reply()
        name = str(query.q.qname).rstrip(".")
        if name == "outside.test":
            reply.add_answer(*RR.fromZone("outside.test. 60 A 192.0.2.7"))
        elif name == "big.test":
            for n in range(40):
                reply.add_answer(*RR.fromZone(f"big.test. 60 TXT {'x' * 60}{n}"))
        else:
            reply.header.rcode = 3
        packed = bytes(reply.pack())
        return bytes(reply.truncate().pack()) if udp and len(packed) > 512 else packed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.udp_queries += 1
        assert self.transport is not None
        self.transport.sendto(self.answer(data, udp=True), addr)

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                self.tcp_queries += 1
                reply = self.answer(await reader.readexactly(size), udp=False)
                writer.write(struct.pack("!H", len(reply)) + reply)
        writer.close()


@dataclass
class Lab:
    port: int
    server: DnsServer
    gateways: Gateways
    names: NameCache
    upstream: Upstreams


def endpoint(container: str, network: str, ip: str, name: str, hostname: str = "",
             aliases: tuple[str, ...] = ()) -> Endpoint:
    return Endpoint(container, network, ip, "", "h", "", "", name=name, hostname=hostname,
                    aliases=aliases)


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    loop = asyncio.get_running_loop()
    upstream_port = free_port()
    upstream = Upstreams()
    udp, _ = await loop.create_datagram_endpoint(lambda: upstream,
                                                 local_addr=("127.0.0.31", upstream_port))
    tcp = await asyncio.start_server(upstream.tcp, "127.0.0.31", upstream_port)
    names = NameCache(lambda: _never())
    names.replace([
        endpoint("a", "blue", "10.0.6.2", "web", "webhost", ("www",)),
        endpoint("b", "red", "10.0.7.2", "db"),
    ])
    # A dead upstream first: an ICMP refusal moves on to the next at once.
    forwarder = Forwarder([Upstream("127.0.0.32", free_port()),
                           Upstream("127.0.0.31", upstream_port)])
    gateways = Gateways([Gw("blue", f"{BLUE}/24", "10.0.6.0/24"),
                         Gw("red", f"{RED}/24", "10.0.7.0/24")])
    port = free_port()
    server = DnsServer(Resolver(names, forwarder), gateways, interval=30, port=port)
    task = asyncio.create_task(server.run())
    await _until(lambda: len(server.listening()) == 2)
    try:
        yield Lab(port, server, gateways, names, upstream)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        udp.close()
        tcp.close()


async def _never() -> AsyncIterator[list[Endpoint]]:
    await asyncio.Event().wait()
    yield []


async def _until(check: object, bound: float = 2.0) -> None:
    deadline = time.monotonic() + bound
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the bound"
        await asyncio.sleep(0.01)


async def ask_udp(address: str, port: int, message: bytes, seconds: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
            if not reply.done():
                reply.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(address, port))
    try:
        transport.sendto(message)
        async with asyncio.timeout(seconds):
            return await reply
    finally:
        transport.close()


async def ask_tcp(address: str, port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(address, port)
    try:
        writer.write(struct.pack("!H", len(message)) + message)
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        return await reader.readexactly(size)
    finally:
        writer.close()


async def resolve(lab: Lab, address: str, name: str, qtype: str = "A") -> Answer:
    return read_answer(await ask_udp(address, lab.port, query_for(name, qtype)))


async def test_names_answer_on_their_own_network_only(lab: Lab) -> None:
    """web, its hostname and alias resolve at blue's gateway; at red's they are NXDOMAIN;
    PTR gives the name; AAAA for a name we hold is an empty NOERROR."""
    assert await resolve(lab, BLUE, "web") == Answer("NOERROR", ("10.0.6.2",), False)
    assert await resolve(lab, BLUE, "WebHost") == Answer("NOERROR", ("10.0.6.2",), False)
    assert await resolve(lab, BLUE, "www.") == Answer("NOERROR", ("10.0.6.2",), False)
    assert (await resolve(lab, RED, "web")).rcode == "NXDOMAIN"
    assert (await resolve(lab, BLUE, "db")).rcode == "NXDOMAIN"
    assert await resolve(lab, RED, "db") == Answer("NOERROR", ("10.0.7.2",), False)
    ptr = await resolve(lab, BLUE, "2.6.0.10.in-addr.arpa", "PTR")
    assert ptr == Answer("NOERROR", ("web",), False)
    assert (await resolve(lab, BLUE, "9.6.0.10.in-addr.arpa", "PTR")).rcode == "NXDOMAIN"
    # Another network's address is not blue's to name.
    assert (await resolve(lab, BLUE, "2.7.0.10.in-addr.arpa", "PTR")).rcode == "NXDOMAIN"
    assert await resolve(lab, BLUE, "web", "AAAA") == Answer("NOERROR", (), False)
    over_tcp = read_answer(await ask_tcp(BLUE, lab.port, query_for("web")))
    assert over_tcp == Answer("NOERROR", ("10.0.6.2",), False)


async def test_forwarding_udp_then_tcp(lab: Lab) -> None:
    """A name that is no container's goes upstream (past a dead one); a truncated upstream
    answer is asked again over TCP; a UDP client then gets TC and the whole over TCP."""
    assert await resolve(lab, BLUE, "outside.test") == Answer(
        "NOERROR", ("192.0.2.7",), False)
    assert (await resolve(lab, BLUE, "nowhere.test")).rcode == "NXDOMAIN"
    before = lab.upstream.tcp_queries
    assert (await resolve(lab, BLUE, "big.test", "TXT")).truncated
    assert lab.upstream.tcp_queries == before + 1
    whole = read_answer(await ask_tcp(BLUE, lab.port, query_for("big.test", "TXT")))
    assert len(whole.answers) == 40 and not whole.truncated


async def test_no_upstream_answers_servfail_in_time() -> None:
    """A refusing upstream and a silent one: SERVFAIL, within the forward's deadline."""
    loop = asyncio.get_running_loop()
    silent_port = free_port()
    silent, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.33", silent_port))
    try:
        forwarder = Forwarder([Upstream("127.0.0.32", free_port()),
                               Upstream("127.0.0.33", silent_port)],
                              attempt_timeout=0.5, deadline=1.0)
        resolver = Resolver(NameCache(lambda: _never()), forwarder)
        scope = Scope("blue", BLUE, ipaddress.IPv4Network("10.0.6.0/24"))
        start = time.monotonic()
        reply = await resolver.answer(query_for("outside.test"), scope, udp=True)
        took = time.monotonic() - start
        assert reply is not None and read_answer(reply).rcode == "SERVFAIL"
        assert 0.4 < took < 1.5, took
    finally:
        silent.close()


async def test_follows_the_gateways(lab: Lab) -> None:
    """A gateway that goes stops answering; one that comes answers at once."""
    lab.gateways.set([Gw("blue", f"{BLUE}/24", "10.0.6.0/24"),
                      Gw("green", "127.0.0.23/24", "10.0.8.0/24")])
    await _until(lambda: {s.network for s in lab.server.listening()} == {"blue", "green"})
    assert (await resolve(lab, "127.0.0.23", "web")).rcode == "NXDOMAIN"
    with pytest.raises(TimeoutError):
        await ask_udp(RED, lab.port, query_for("db"), seconds=0.3)


def test_resolv_conf() -> None:
    text = ("# comment\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver bogus\n"
            "search example.test\nnameserver 192.0.2.1\n")
    assert resolv_conf_upstreams(text) == (Upstream("192.0.2.1"), Upstream("fe80::1"))


# -- hostile input -----------------------------------------------------------------------------

SCOPE = Scope("blue", BLUE, ipaddress.IPv4Network("10.0.6.0/24"))
QUERY = query_for("web", message_id=0x1234)


def _resolver() -> Resolver:
    names = NameCache(lambda: _never())
    names.replace([endpoint("a", "blue", "10.0.6.2", "web")])
    return Resolver(names, Forwarder([]))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Whatever arrives, the answer is bytes to send, a query to forward, or nothing."""
    result = _resolver().immediate(data, SCOPE)
    assert result is None or isinstance(result, bytes) or result.name is not None


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(QUERY) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(QUERY)))
def test_mutated_queries_never_raise(changes: list[tuple[int, int]], cut: int) -> None:
    """A real query with bytes changed and its tail cut: headers that lie about their
    counts, labels running past the end, pointers anywhere."""
    data = bytearray(QUERY)
    for index, value in changes:
        data[index] = value
    result = _resolver().immediate(bytes(data[:cut] if cut > 2 else data), SCOPE)
    if isinstance(result, bytes):
        read_answer(result)  # what we send is always a readable DNS message


def test_compression_loops_and_lying_headers() -> None:
    """A name pointing at itself, pointers forwards, counts larger than the message, a
    deep pointer chain: each is FORMERR or dropped, quickly."""
    header = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    loops = [
        header + b"\xc0\x0c" + b"\x00\x01\x00\x01",  # points at itself
        header + b"\xc0\x10\x00\x01\x00\x01",  # points forwards
        struct.pack("!HHHHHH", 7, 0x0100, 65535, 65535, 65535, 65535) + b"\x03web\x00",
        header + b"\x3fabc",  # a label longer than the message
        # 1,000 answers, each a pointer to the one before: refused by the header alone,
        # before any name is followed.
        struct.pack("!HHHHHH", 7, 0x0100, 1, 1000, 0, 0) + b"\x01a\x00\x00\x01\x00\x01"
        + b"".join(struct.pack("!H", 0xC000 | (12 + 2 * n)) for n in range(1000)),
    ]
    resolver = _resolver()
    start = time.monotonic()
    for data in loops:
        result = resolver.immediate(data, SCOPE)
        assert result is None or read_answer(result).rcode == "FORMERR"  # type: ignore[arg-type]
    assert time.monotonic() - start < 1.0
    assert parse_query(b"") is None and parse_query(b"\x00" * 11) is None


async def test_hostile_traffic_leaves_it_answering(lab: Lab) -> None:
    """Garbage datagrams, TCP lengths of 64 KiB with nothing behind, more connections than
    allowed: the server keeps answering, and what it holds stays bounded."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(500):
            sock.sendto(bytes([n % 256]) * (n % 700), (BLUE, lab.port))
    finally:
        sock.close()
    writers = []
    for _ in range(dns_server.MAX_TCP_CONNECTIONS + 20):
        _, writer = await asyncio.open_connection(BLUE, lab.port)
        writer.write(b"\xff\xff" + b"x" * 100)  # claims 65,535 bytes: closed at once
        writers.append(writer)
    hold = []
    for _ in range(dns_server.MAX_TCP_CONNECTIONS + 20):
        _, writer = await asyncio.open_connection(BLUE, lab.port)
        writer.write(b"\x01\x00")  # a slow client: claims 256 bytes, sends none
        hold.append(writer)
    await asyncio.sleep(0.2)
    listener = next(iter(lab.server._listeners.values()))
    assert len(listener._connections) <= dns_server.MAX_TCP_CONNECTIONS
    assert await resolve(lab, BLUE, "web") == Answer("NOERROR", ("10.0.6.2",), False)
    udp = listener._udp
    assert udp is not None and not udp._tasks  # garbage never became a forward
    for writer in writers + hold:
        writer.close()


def test_answers_are_kept_by_query_until_the_names_change() -> None:
    """The same question again is the same answer with its own id; a change of names is
    answered at once; the kept answers never pass their bound."""
    resolver = _resolver()
    first = resolver.immediate(query_for("web", message_id=1), SCOPE)
    again = resolver.immediate(query_for("web", message_id=2), SCOPE)
    assert isinstance(first, bytes) and isinstance(again, bytes)
    assert again[:2] == b"\x00\x02" and again[2:] == first[2:]
    assert read_answer(again).answers == ("10.0.6.2",)
    resolver.names.replace([endpoint("b", "blue", "10.0.6.9", "web")])
    moved = resolver.immediate(query_for("web", message_id=3), SCOPE)
    assert isinstance(moved, bytes) and read_answer(moved).answers == ("10.0.6.9",)
    for n in range(dns_server.MAX_CACHED_ANSWERS + 10):
        resolver.immediate(query_for(f"n{n}"), SCOPE)
    assert len(resolver._answers) <= dns_server.MAX_CACHED_ANSWERS
