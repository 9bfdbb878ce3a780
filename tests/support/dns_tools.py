"""DNS helpers that run inside lab namespaces: a tiny upstream resolver and a poller.

    python -m tests.support.dns_tools serve PORT NAME=IP...
        UDP and TCP on PORT: each NAME answers A IP; ``big.example`` answers 40 TXT records
        (truncated over UDP, as a real server does); anything else is NXDOMAIN. Prints
        ``ready`` once listening. The lab's upstream: only it knows these names.
    python -m tests.support.dns_tools poll SERVER NAME (present IP | absent) BOUND
        Asks SERVER:53 for NAME every 5 ms until the answer holds IP (present; * for any
        address) or is NXDOMAIN
        (absent); prints the wall-clock time (time.time()) it first held, exit 0; exit 1
        after BOUND seconds.
    python -m tests.support.dns_tools tcp SERVER NAME TYPE
        Asks SERVER:53 over TCP; prints the rcode and each answer's data, one a line.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time

from dnslib import RR, DNSRecord


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.transport: asyncio.DatagramTransport | None = None

    def answer(self, data: bytes, *, udp: bool) -> bytes:
        query = DNSRecord.parse(data)
        reply = query.reply()
        name = str(query.q.qname).rstrip(".").lower()
        if name in self.names:
            reply.add_answer(*RR.fromZone(f"{name}. 60 A {self.names[name]}"))
        elif name == "big.example":
            for n in range(40):
                reply.add_answer(*RR.fromZone(f"big.example. 60 TXT {'x' * 60}{n}"))
        else:
            reply.header.rcode = 3
        packed = bytes(reply.pack())
        return bytes(reply.truncate().pack()) if udp and len(packed) > 512 else packed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.answer(data, udp=True), addr)

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = self.answer(await reader.readexactly(size), udp=False)
                writer.write(struct.pack("!H", len(reply)) + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def serve(port: int, names: dict[str, str]) -> None:
    loop = asyncio.get_running_loop()
    upstream = _Upstream(names)
    await loop.create_datagram_endpoint(lambda: upstream, local_addr=("0.0.0.0", port))
    server = await asyncio.start_server(upstream.tcp, "0.0.0.0", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def poll(server: str, name: str, want: str, ip: str | None, bound: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.05)
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        query = DNSRecord.question(name)
        sock.sendto(bytes(query.pack()), (server, 53))
        try:
            while True:
                reply = DNSRecord.parse(sock.recv(4096))
                if reply.header.id == query.header.id:
                    break
        except TimeoutError:
            continue
        addresses = {str(rr.rdata) for rr in reply.rr}
        present = ip in addresses or (ip == "*" and bool(addresses))
        if (want == "present" and present) or (want == "absent" and reply.header.rcode == 3):
            print(f"{time.time():.6f}", flush=True)
            return 0
        time.sleep(0.005)
    return 1


def ask_tcp(server: str, name: str, qtype: str) -> None:
    query = bytes(DNSRecord.question(name, qtype).pack())
    with socket.create_connection((server, 53), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(query)) + query)
        stream = sock.makefile("rb")
        size = struct.unpack("!H", stream.read(2))[0]
        reply = DNSRecord.parse(stream.read(size))
    print(reply.header.rcode)
    for rr in reply.rr:
        print(rr.rdata)


if __name__ == "__main__":
    if sys.argv[1] == "tcp":
        ask_tcp(*sys.argv[2:5])
    elif sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2]),
                          dict(item.split("=", 1) for item in sys.argv[3:])))
    else:
        server, name, want = sys.argv[2:5]
        ip = sys.argv[5] if want == "present" else None
        sys.exit(poll(server, name, want, ip, float(sys.argv[-1])))
