"""The least a Python relay can do: copy bytes between two unix sockets, no HTTP at all.

``python -m bench.byte_relay LISTEN_PATH UPSTREAM_PATH``: uvloop, one upstream connection per
client connection, every read written straight to the other side. bench/proxy.py runs it next
to the proxy to show what an asyncio process in the path costs before any HTTP work.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: Any) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_path: str) -> None:
        self.upstream_path = upstream_path
        self.upstream: Any = None
        self.early: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        upstream, _ = await asyncio.get_running_loop().create_unix_connection(
            lambda: _Upstream(self.transport), self.upstream_path)
        for data in self.early:
            upstream.write(data)
        self.upstream = upstream

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def _serve(listen: str, upstream: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(lambda: _Client(upstream),
                                                                 listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if os.path.exists(sys.argv[1]):
        os.unlink(sys.argv[1])
    uvloop.run(_serve(sys.argv[1], sys.argv[2]))
