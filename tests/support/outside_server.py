"""The lab's outside server: tells every client the address it came from.

Run inside the lab's outside namespace: ``python -m tests.support.outside_server PORT``. TCP
``PORT`` answers any HTTP request with ``from <client address>``; UDP ``PORT`` answers any
datagram the same way. Tests read the source a container's traffic had when it left the
overlay (its host's address after NAT, or its floating address).
"""

from __future__ import annotations

import asyncio
import sys


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert isinstance(self.transport, asyncio.DatagramTransport)
        self.transport.sendto(f"from {addr[0]}\n".encode(), addr)


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    body = f"from {writer.get_extra_info('peername')[0]}\n".encode()
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(_Echo, local_addr=("0.0.0.0", port))
    server = await asyncio.start_server(_http, "0.0.0.0", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
