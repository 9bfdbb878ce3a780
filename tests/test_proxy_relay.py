"""The relay's edge cases, against a scripted upstream standing in for dockerd (fault injection).

The real dockerd and docker CLI are in test_proxy_docker_cli.py; dockerd cannot be made to send
a truncated answer or close an idle connection on cue, so these cases script the upstream side.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from adapter.proxy.adapters_config import DEFAULT_ADAPTERS_CONFIG
from adapter.proxy.hookchain import HookChain
from adapter.proxy.relay import DockerProxy

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A unix-socket server running ``script`` for every connection; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        finally:
            writer.close()


@asynccontextmanager
async def relay(tmp_path: Path, script: Script) -> AsyncIterator[tuple[Path, Upstream]]:
    """(proxy socket, upstream) with a proxy in front of a scripted upstream."""
    upstream = Upstream(script)
    upstream_path, proxy_path = tmp_path / "dockerd.sock", tmp_path / "proxy.sock"
    server = await asyncio.start_unix_server(upstream.handle, path=str(upstream_path))
    chain = HookChain.build(DEFAULT_ADAPTERS_CONFIG, {}, None, skip_unknown=True)
    proxy = DockerProxy(f"unix://{upstream_path}", chain)
    listener = await asyncio.get_running_loop().create_unix_server(proxy.accept,
                                                                   path=str(proxy_path))
    try:
        yield proxy_path, upstream
    finally:
        listener.close()
        await proxy.close()
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            head += await reader.readexactly(int(line.split(b":")[1]))
    return head


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout=10)


async def answer_ok_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """dockerd answering one request, then closing (as it may an idle keep-alive connection)."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
    await writer.drain()


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET /_ping on an open connection; the whole answer."""
    writer.write(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\nOK"), timeout=10)


async def test_chunked_answer_then_keep_alive_on_one_upstream(tmp_path: Path) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nTrailer: 1\r\n\r\n")

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # Split across writes, inside a size line and inside the data.
        for piece in (chunked[:52], chunked[52:58], chunked[58:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
        await writer.drain()
        await reader.read()

    async with relay(tmp_path, script) as (path, upstream):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /events HTTP/1.1\r\nHost: d\r\n\r\n")
        got = await asyncio.wait_for(reader.readexactly(len(chunked)), timeout=10)
        assert got == chunked  # byte for byte: the framing is relayed, not re-encoded
        writer.write(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nOK"), timeout=10)
        assert second.endswith(b"Content-Length: 2\r\n\r\nOK")
        writer.close()
        assert upstream.connections == 1


async def test_pipelined_requests_answered_in_order(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for body in (b"first", b"second!"):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        await reader.read()

    async with relay(tmp_path, script) as (path, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /a HTTP/1.1\r\nHost: d\r\n\r\nPOST /b HTTP/1.1\r\nHost: d\r\n"
                     b"Content-Length: 3\r\n\r\nxyz")
        got = await asyncio.wait_for(reader.readuntil(b"second!"), timeout=10)
        assert got.index(b"first") < got.index(b"second!")


async def test_answer_before_the_body_closes_the_connection(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = json.dumps({"message": "too big"}).encode()
        writer.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        await reader.read()

    async with relay(tmp_path, script) as (path, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"POST /build HTTP/1.1\r\nHost: d\r\nContent-Length: 1000000\r\n\r\npartial")
        answer = await read_all(reader)  # ends: the spent connection is closed
        assert answer.startswith(b"HTTP/1.1 413")
        assert answer.endswith(b'{"message": "too big"}')


async def test_interim_continue_is_passed_on(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await reader.readexactly(4)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n" + body)
        await writer.drain()
        await reader.read()

    async with relay(tmp_path, script) as (path, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"POST /x HTTP/1.1\r\nHost: d\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 4\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ping")
        final = await asyncio.wait_for(reader.readuntil(b"ping"), timeout=10)
        assert final.startswith(b"HTTP/1.1 200 OK")


async def test_idle_upstream_closed_is_reopened(tmp_path: Path) -> None:
    async with relay(tmp_path, answer_ok_once) as (path, upstream):
        reader, writer = await asyncio.open_unix_connection(str(path))
        for _ in range(3):
            assert (await ping(reader, writer)).startswith(b"HTTP/1.1 200 OK")
            await asyncio.sleep(0.05)
        assert upstream.connections == 3


async def test_upstream_silent_close_is_a_502(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async with relay(tmp_path, script) as (path, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /info HTTP/1.1\r\nHost: d\r\n\r\n")
        answer = await read_all(reader)
        assert answer.startswith(b"HTTP/1.1 502")
        assert b"dockerd closed the connection without answering" in answer


async def test_truncated_answer_cuts_the_client(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async with relay(tmp_path, script) as (path, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /x HTTP/1.1\r\nHost: d\r\n\r\n")
        answer = await read_all(reader)
        # The client sees a body shorter than announced, never a complete-looking answer.
        assert b"\r\nContent-Length: 100\r\n" in answer
        assert answer.endswith(b"\r\n\r\nonly this")


async def test_upgrade_becomes_a_pipe_with_half_close(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Upgrade: tcp" in head and b"Connection: Upgrade" in head
        writer.write(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
                     b"hello from the container\n")
        await writer.drain()
        stdin = await reader.read()  # until the client's half-close arrives
        writer.write(b"echo: " + stdin)
        await writer.drain()

    async with relay(tmp_path, script) as (path, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"POST /containers/x/attach?stream=1 HTTP/1.1\r\nHost: d\r\n"
                     b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\nline one\nline two\n")
        writer.write_eof()
        answer = await read_all(reader)
        assert answer.startswith(b"HTTP/1.1 101")
        assert answer.endswith(b"hello from the container\necho: line one\nline two\n")


async def test_malformed_request_is_a_400_and_the_proxy_serves_on(tmp_path: Path) -> None:
    async with relay(tmp_path, answer_ok_once) as (path, upstream):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n")
        answer = await read_all(reader)
        assert answer.startswith(b"HTTP/1.1 400")
        assert b"malformed header line" in answer
        assert upstream.connections == 0  # nothing of it reached dockerd
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert (await ping(reader, writer)).startswith(b"HTTP/1.1 200")
