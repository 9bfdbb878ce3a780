"""The transparent Docker API proxy: one client connection at a time, relayed to dockerd.

Each client connection gets its own upstream connection, opened on its first request and kept
while both sides keep the connection alive. A request that matches no hook is relayed as bytes:
head with hop-by-hop headers dropped, body and response copied with their framing while they
arrive. A hijacked call (``101 Upgrade: tcp``, or a Docker raw-stream answer with no framing)
becomes a two-way pipe that honours half-close. Only a hooked request with a JSON (or empty) body
is buffered, up to ``json_limit`` bytes, so its hooks can read and rewrite it.

Why asyncio streams and not ``aiohttp.web``: aiohttp's server owns the connection after the
handler, re-parses bytes after a non-websocket upgrade as HTTP and de-chunks bodies; a proxy that
must hand over the raw socket for ``Upgrade: tcp`` and Docker's raw streams fights it at every
step. See docs/proxy.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

import aiohttp

from adapter.adapters_config import DEFAULT_ADAPTERS_CONFIG, AdaptersConfig
from adapter.docker_errors import error_response
from adapter.errors import (
    BadRequest,
    ConfigError,
    PowerplaneError,
    RequestTooLarge,
    UpstreamError,
)
from adapter.hookchain import ClientRequest, HookChain, MatchedHooks, ServerResponse
from adapter.hooks import BuiltinHook
from adapter.http1 import (
    MAX_HEAD_BYTES,
    READ_SIZE,
    Framing,
    Head,
    encode_head,
    read_body,
    read_request_head,
    read_response_head,
    relay_body,
    request_framing,
    response_framing,
)
from adapter.settings import Settings

log = logging.getLogger(__name__)

JSON_LIMIT = 10 * 1024 * 1024
RESPONSE_LIMIT = 64 * 1024 * 1024
# Docker answers attach without an upgrade with these types and then owns the raw connection.
RAW_STREAM_TYPES = (
    "application/vnd.docker.raw-stream",
    "application/vnd.docker.multiplexed-stream",
)
DRAIN_AFTER_ERROR = 2.0
HIJACK_SETTLE = 0.01
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Outcome(Exception):
    """The exchange ended the connection; nothing more may be read from either side."""


class DockerProxy:
    """Relays client connections to the Docker daemon at ``docker_url``, running hooks."""

    def __init__(self, docker_url: str, hook_chain: HookChain, *, json_limit: int = JSON_LIMIT):
        self.docker_url = docker_url
        self.hook_chain = hook_chain
        self.json_limit = json_limit
        self._connections: set[asyncio.Task[None]] = set()
        parsed = urlsplit(docker_url)
        if parsed.scheme == "unix" and parsed.path:
            self._upstream_path: str | None = parsed.path
            self._upstream_addr: tuple[str, int] | None = None
        elif parsed.scheme in ("tcp", "http") and parsed.hostname and parsed.port:
            self._upstream_path, self._upstream_addr = None, (parsed.hostname, parsed.port)
        else:
            raise ConfigError(f"--docker: expected unix:///PATH or tcp://HOST:PORT, "
                              f"got {docker_url!r}")

    @property
    def upstream_name(self) -> str:
        return self._upstream_path or self.docker_url

    async def handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client connection until either side closes it (a listener callback)."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        client = _Connection(reader, writer)
        upstream: _Connection | None = None
        try:
            while True:
                head = await read_request_head(reader)
                if head is None:
                    return
                upstream = await self._exchange(head, client, upstream)
                if upstream is None:
                    return
        except _Outcome:
            pass
        except PowerplaneError as exc:
            await _reply_error(client, exc)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error relaying a client connection")
        finally:
            self._connections.discard(task)
            if upstream is not None:
                upstream.close()
            client.close()

    async def close(self) -> None:
        """Cut every open client connection (listeners must be closed first)."""
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self) -> _Connection:
        try:
            if self._upstream_path is not None:
                reader, writer = await asyncio.open_unix_connection(
                    self._upstream_path, limit=MAX_HEAD_BYTES)
            else:
                assert self._upstream_addr is not None
                reader, writer = await asyncio.open_connection(
                    *self._upstream_addr, limit=MAX_HEAD_BYTES)
        except OSError as exc:
            raise UpstreamError(
                f"cannot reach dockerd at {self.upstream_name}: {exc.strerror or exc}"
            ) from None
        return _Connection(reader, writer)

    async def _exchange(
        self, head: Head, client: _Connection, upstream: _Connection | None
    ) -> _Connection | None:
        """Relay one request and its response; return the upstream if both stay open."""
        framing, length = request_framing(head)
        hooks = self.hook_chain.match(head.method, head.path)
        if hooks is not None and _bufferable(head, framing):
            return await self._hooked_exchange(head, hooks, client, upstream)
        upstream = upstream or await self._connect()
        upgrade = head.upgrade_requested
        upstream.writer.write(encode_head(
            f"{head.method} {head.target} HTTP/1.1",
            head.end_to_end_headers(keep_upgrade=upgrade),
        ))
        body_task = None
        if framing is not Framing.NONE:
            body_task = asyncio.create_task(
                relay_body(client.reader, upstream.writer, framing, length))
        try:
            response = await self._response_head(upstream, client, body_task)
            keep = await self._relay_response(head, response, client, upstream)
            if body_task is not None and not body_task.done():
                # dockerd answered before reading the whole body: the connection is spent.
                keep = False
            elif body_task is not None:
                await body_task
        finally:
            if body_task is not None and not body_task.done():
                body_task.cancel()
        return _kept(upstream, keep)

    async def _response_head(
        self,
        upstream: _Connection,
        client: _Connection,
        body_task: asyncio.Task[None] | None,
    ) -> Head:
        """Wait for dockerd's final answer, passing interim 1xx answers on to the client."""
        while True:
            head_task = asyncio.create_task(read_response_head(upstream.reader))
            if body_task is not None and not body_task.done():
                await asyncio.wait({head_task, body_task}, return_when=asyncio.FIRST_COMPLETED)
                if body_task.done() and body_task.exception() is not None:
                    head_task.cancel()
                    raise _Outcome from body_task.exception()
            response = await head_task
            if response.status == 101 or not 100 <= response.status < 200:
                return response
            client.writer.write(encode_head(response.start_line, response.headers))

    async def _relay_response(
        self, request: Head, response: Head, client: _Connection, upstream: _Connection
    ) -> bool:
        """Send dockerd's answer to the client; True when both connections stay usable."""
        framing, length = response_framing(response, request.method)
        if response.status == 101 or _is_raw_stream(response, framing):
            client.writer.write(encode_head(
                response.start_line,
                response.end_to_end_headers(keep_upgrade=response.status == 101),
            ))
            await client.writer.drain()
            # Some clients (docker-py's attach_socket) read the head through a buffered reader
            # and lose any stream bytes that arrive in the same read. dockerd's own gap between
            # head and stream hides this; the proxy would read both at once, so it leaves one.
            await asyncio.sleep(HIJACK_SETTLE)
            await _pipe_both_ways(client, upstream)
            raise _Outcome
        keep = (request.keep_alive and response.keep_alive
                and framing is not Framing.UNTIL_CLOSE)
        headers = response.end_to_end_headers()
        if not keep:
            headers.append(("Connection", "close"))
        client.writer.write(encode_head(response.start_line, headers))
        await relay_body(upstream.reader, client.writer, framing, length)
        await client.writer.drain()
        return keep

    async def _hooked_exchange(
        self, head: Head, hooks: MatchedHooks, client: _Connection, upstream: _Connection | None
    ) -> _Connection | None:
        framing, length = request_framing(head)
        try:
            body = await read_body(client.reader, framing, length, self.json_limit)
        except RequestTooLarge:
            raise RequestTooLarge(
                f"request body of {head.method} {head.path} is larger than the "
                f"{self.json_limit} bytes accepted for hooked requests"
            ) from None
        original = ClientRequest(head.method, head.target, _json_text(head, body))
        sent = await self.hook_chain.run_pre(hooks.pre, original)
        upstream = upstream or await self._connect()
        payload = (sent.body or "").encode()
        headers = [(k, v) for k, v in head.end_to_end_headers(keep_upgrade=head.upgrade_requested)
                   if k.lower() not in FRAMING_HEADERS]
        if payload or framing is not Framing.NONE:
            headers.append(("Content-Length", str(len(payload))))
        upstream.writer.write(encode_head(f"{sent.method} {sent.request} HTTP/1.1", headers))
        upstream.writer.write(payload)
        response = await self._response_head(upstream, client, None)
        request_as_sent = Head(head.start_line, head.headers, method=sent.method,
                               target=sent.request, version=head.version)
        if not hooks.post:
            keep = await self._relay_response(request_as_sent, response, client, upstream)
            return _kept(upstream, keep)
        response_framing_, response_length = response_framing(response, sent.method)
        if response.status == 101 or _is_raw_stream(response, response_framing_):
            await self._relay_response(request_as_sent, response, client, upstream)
        try:
            raw = await read_body(upstream.reader, response_framing_, response_length,
                                  RESPONSE_LIMIT)
        except RequestTooLarge:
            raise UpstreamError(
                f"dockerd's answer to {sent.method} {sent.request} is too large for post-hooks"
            ) from None
        answer = ServerResponse(
            response.get("content-type", "") or "", raw.decode("utf-8", "replace") or None,
            response.status)
        answer = await self.hook_chain.run_post(hooks.post, sent, answer)
        keep = (head.keep_alive and response.keep_alive
                and response_framing_ is not Framing.UNTIL_CLOSE)
        await _write_full_response(client, answer, response, keep=keep)
        return _kept(upstream, keep)


def _kept(upstream: _Connection, keep: bool) -> _Connection | None:
    """The upstream connection for the next request, or None after closing a spent one."""
    if keep:
        return upstream
    upstream.close()
    return None


def _bufferable(head: Head, framing: Framing) -> bool:
    """Hooks see JSON bodies only: a hooked build or image load still streams untouched."""
    if framing is Framing.NONE:
        return True
    content_type = (head.get("content-type") or "").split(";")[0].strip().lower()
    return content_type in ("", "application/json") or content_type.endswith("+json")


def _json_text(head: Head, body: bytes) -> str | None:
    if not body:
        return None
    try:
        text = body.decode("utf-8")
        json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"invalid JSON body for {head.method} {head.path}: {exc}") from None
    return text


def _is_raw_stream(response: Head, framing: Framing) -> bool:
    content_type = (response.get("content-type") or "").split(";")[0].strip().lower()
    return framing is Framing.UNTIL_CLOSE and content_type in RAW_STREAM_TYPES


async def _write_full_response(
    client: _Connection, answer: ServerResponse, original: Head, *, keep: bool
) -> None:
    body = (answer.body or "").encode()
    headers = [(k, v) for k, v in original.end_to_end_headers()
               if k.lower() not in FRAMING_HEADERS | {"content-type"}]
    headers += [("Content-Type", answer.content_type), ("Content-Length", str(len(body)))]
    if not keep:
        headers.append(("Connection", "close"))
    try:
        reason = HTTPStatus(answer.code).phrase
    except ValueError:
        reason = "Unknown"
    client.writer.write(encode_head(f"HTTP/1.1 {answer.code} {reason}", headers) + body)
    await client.writer.drain()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the half-close on (when the transport can)."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(READ_SIZE):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()


async def _pipe_both_ways(client: _Connection, upstream: _Connection) -> None:
    await asyncio.gather(_pipe(client.reader, upstream.writer),
                         _pipe(upstream.reader, client.writer))


async def _reply_error(client: _Connection, error: PowerplaneError) -> None:
    """Answer with a Docker-shaped error, then let the client finish sending before closing.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the
    error answer before the client reads it; a short drain avoids that.
    """
    log.info("request refused (%s): %s", error.status, error.message)
    with contextlib.suppress(ConnectionError, OSError):
        client.writer.write(error_response(error.status, error.message, close=True))
        await client.writer.drain()
        if client.writer.can_write_eof():
            client.writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_AFTER_ERROR):
                while await client.reader.read(READ_SIZE):
                    pass


@asynccontextmanager
async def make_proxy(
    settings: Settings,
    *,
    builtin_hooks: Mapping[str, BuiltinHook],
    adapters_config: AdaptersConfig | None = None,
    json_limit: int = JSON_LIMIT,
) -> AsyncIterator[DockerProxy]:
    """A proxy for ``settings.docker_url`` with hooks from ``adapters_config``.

    Without a config the built-in default is used, skipping hooks that are not registered. The
    HTTP client session for external adapters lives exactly as long as the proxy.
    """
    config = adapters_config or DEFAULT_ADAPTERS_CONFIG
    async with aiohttp.ClientSession() as session:
        chain = HookChain.build(config, builtin_hooks, session,
                                skip_unknown=adapters_config is None)
        proxy = DockerProxy(settings.docker_url, chain, json_limit=json_limit)
        try:
            yield proxy
        finally:
            await proxy.close()
