"""The transparent Docker API proxy: each client connection relayed to its own dockerd connection.

A request that matches no hook is relayed from inside the socket callbacks, with no task switch:
its head goes upstream without hop-by-hop headers, then body and response are copied with their
framing as they arrive. The upstream connection is opened on a client connection's first request
and kept while both sides keep the connection alive. A hijacked call (``101 Upgrade: tcp``, or a
Docker raw-stream answer with no framing) becomes a two-way pipe that honours half-close. Only a
hooked request with a JSON (or empty) body is handled by a coroutine: its body is read whole, up
to ``json_limit`` bytes, so its hooks can read and rewrite it.

Why callbacks rather than ``asyncio`` streams or ``aiohttp.web``: every task switch is a trip
round the event loop, and a proxy that adds two per request doubles dockerd's latency for small
calls; aiohttp's server re-parses the bytes after a non-websocket upgrade and de-chunks bodies,
which fights ``Upgrade: tcp`` and Docker's raw streams at every step. See docs/proxy.md.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from adapter.errors import (
    BadRequest,
    ConfigError,
    PowerplaneError,
    RequestTooLarge,
    UpstreamError,
)
from adapter.proxy.adapters_config import DEFAULT_ADAPTERS_CONFIG, AdaptersConfig
from adapter.proxy.connection import ConnectionSide
from adapter.proxy.docker_errors import error_response
from adapter.proxy.hookchain import ClientRequest, HookChain, MatchedHooks, ServerResponse
from adapter.proxy.http1 import (
    BodyFramer,
    Framing,
    Head,
    PlainMessage,
    encode_head,
    find_head_end,
    parse_request_head,
    parse_response_head,
    plain_request,
    plain_response,
    request_framing,
    response_framing,
)
from adapter.proxy.powerstrip import BuiltinHook
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

_Handler = Callable[[ConnectionSide], None]
_Work = Coroutine[Any, Any, None]


class _ClientGone(Exception):
    """The client left while a task was working for it; the task's result has nowhere to go."""


class _State(enum.Enum):
    IDLE = "waiting for a request"
    CONNECTING = "connecting to dockerd"
    EXCHANGE = "relaying a request and its answer"
    HOOKED = "running hooks"
    PIPE = "relaying a hijacked stream"
    CLOSING = "closing"


class DockerProxy:
    """Relays client connections to the Docker daemon at ``docker_url``, running hooks."""

    def __init__(self, docker_url: str, hook_chain: HookChain, *, json_limit: int = JSON_LIMIT):
        self.docker_url = docker_url
        self.hook_chain = hook_chain
        self.json_limit = json_limit
        self._sessions: set[_Session] = set()
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

    def accept(self) -> asyncio.Protocol:
        """A protocol for one new client connection (what a listener's server calls)."""
        session = _Session(self)
        self._sessions.add(session)
        return session.client

    def forget(self, session: _Session) -> None:
        self._sessions.discard(session)

    async def close(self) -> None:
        """Cut every open client connection (listeners must be closed first)."""
        sessions = list(self._sessions)
        tasks = [task for session in sessions for task in session.shut_down()]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sessions.clear()

    async def connect(self, protocol: ConnectionSide) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._upstream_path is not None:
                await loop.create_unix_connection(lambda: protocol, self._upstream_path)
            else:
                assert self._upstream_addr is not None
                await loop.create_connection(lambda: protocol, *self._upstream_addr)
        except OSError as exc:
            raise UpstreamError(
                f"cannot reach dockerd at {self.upstream_name}: {exc.strerror or exc}"
            ) from None


class _Session:
    """One client connection and the upstream connection that serves it.

    Relaying is a state machine driven by both sides' callbacks; only connecting upstream and
    hooked exchanges run as tasks (``_task``), and the callbacks leave the bytes alone while one
    runs. Every callback catches its errors: a ``PowerplaneError`` before the answer started
    becomes a Docker-shaped error reply, anything later cuts the connection.
    """

    def __init__(self, proxy: DockerProxy) -> None:
        self.proxy = proxy
        self.client = ConnectionSide("client", on_data=self._guard(self._client_data),
                                     on_eof=self._guard(self._client_eof),
                                     on_lost=self._guard(self._lost))
        self.upstream: ConnectionSide | None = None
        self.state = _State.IDLE
        self._tasks: set[asyncio.Task[None]] = set()
        self._request: Head | None = None
        self._request_body = BodyFramer(Framing.NONE)
        self._response: Head | None = None
        self._response_body = BodyFramer(Framing.NONE)
        self._answer_started = False
        self._keep_alive = True
        self._settling = False
        self._closed = False

    # Callbacks

    def _guard(self, handler: _Handler) -> _Handler:
        def guarded(side: ConnectionSide) -> None:
            try:
                handler(side)
            except PowerplaneError as exc:
                self._refuse(exc)
            except Exception:
                log.exception("unexpected error relaying a client connection")
                self._abort()
        return guarded

    def _client_data(self, client: ConnectionSide) -> None:
        if self.state is _State.IDLE:
            self._next_request()
        elif self.state is _State.EXCHANGE:
            self._relay_request_body()
        elif self.state is _State.PIPE:
            self._pipe(client)
        elif self.state is _State.CLOSING:
            client.consume()

    def _upstream_data(self, upstream: ConnectionSide) -> None:
        if upstream is not self.upstream:
            return
        if self.state is _State.EXCHANGE:
            self._relay_response()
        elif self.state is _State.PIPE:
            self._pipe(upstream)
        elif self.state is _State.IDLE:
            # dockerd never speaks between exchanges; a connection that does is not trusted.
            self._drop_upstream()

    def _client_eof(self, client: ConnectionSide) -> None:
        if self.state is _State.IDLE:
            if client.buffer:
                raise BadRequest("connection closed in the middle of a message head")
            self._finish()
        elif self.state is _State.EXCHANGE and not self._request_body.done:
            self._request_body.end_of_stream()  # a truncated upload: BadRequest, or cut
        elif self.state is _State.PIPE:
            self._pipe(client)
        elif self.state is _State.CLOSING:
            self._finish()

    def _upstream_eof(self, upstream: ConnectionSide) -> None:
        if upstream is not self.upstream:
            return
        if self.state is _State.IDLE:
            self._drop_upstream()
        elif self.state is _State.EXCHANGE:
            if self._response is None:
                raise UpstreamError("dockerd closed the connection without answering")
            self._relay_response()
            if self.state is _State.EXCHANGE:
                # The answer was cut short: the client must not take it for a whole one.
                self._abort()
        elif self.state is _State.PIPE:
            self._pipe(upstream)

    def _lost(self, side: ConnectionSide) -> None:
        if side is self.client:
            self._abort()
            self.proxy.forget(self)
        elif side is self.upstream and self.state in (_State.EXCHANGE, _State.PIPE):
            self._upstream_eof(side)

    # Plain requests

    def _next_request(self) -> None:
        client = self.client
        end = find_head_end(client.buffer)
        if end < 0:
            return
        if self._upstream_usable() and self._relay_plain_request(end):
            return
        head = parse_request_head(client.consume(end))
        framing, length = request_framing(head)
        hooks = self.proxy.hook_chain.match(head.method, head.path)
        if hooks is not None and _bufferable(head, framing):
            self.state = _State.HOOKED
            self._spawn(self._hooked_exchange(head, hooks, framing, length))
        elif self._upstream_usable():
            self._send_request(head, framing, length)
        else:
            self.state = _State.CONNECTING
            self._spawn(self._connect_and_send(head, framing, length))

    def _relay_plain_request(self, end: int) -> bool:
        """Send a request that needs no change upstream before parsing it; False if it needs one.

        Every step before the write costs the caller latency (Python code run right after a
        wake-up is slow), so the parse that sets up the body relay comes after it.
        """
        plain = plain_request(self.client.buffer, end)
        if plain is None:
            return False
        head = plain.head
        if self.proxy.hook_chain.match(head.method, head.path) is not None:
            return False
        upstream = self.upstream
        assert upstream is not None
        upstream.write(self.client.consume(end))
        self._request_sent(head, BodyFramer(plain.framing, plain.length))
        return True

    async def _connect_and_send(self, head: Head, framing: Framing, length: int) -> None:
        await self._ensure_upstream()
        if self.state is _State.CONNECTING:
            self._send_request(head, framing, length)

    def _send_request(self, head: Head, framing: Framing, length: int) -> None:
        upstream = self.upstream
        assert upstream is not None
        upstream.write(head.relay_bytes(f"{head.method} {head.target} HTTP/1.1",
                                        keep_upgrade=head.upgrade_requested))
        self._request_sent(head, BodyFramer(framing, length))
        self._upstream_progress()

    def _request_sent(self, head: Head, body: BodyFramer) -> None:
        """The head is upstream: relay the body bytes at hand and what follows them."""
        self._begin_exchange(head, body)
        self._relay_request_body()
        if self.client.at_eof:
            self._client_eof(self.client)

    def _begin_exchange(self, request: Head, request_body: BodyFramer) -> None:
        self.state = _State.EXCHANGE
        self._request, self._request_body = request, request_body
        self._response, self._answer_started = None, False

    def _relay_request_body(self) -> None:
        body, client = self._request_body, self.client
        if body.done or not client.buffer:
            return
        used = body.take(client.buffer)
        if used and self.upstream is not None:
            self.upstream.write(client.consume(used))

    def _upstream_progress(self) -> None:
        """Handle what dockerd sent while nobody was relaying it (a task was running)."""
        upstream = self.upstream
        if self.state is not _State.EXCHANGE or upstream is None:
            return
        if upstream.at_eof:
            self._upstream_eof(upstream)
        elif upstream.buffer:
            self._relay_response()

    def _relay_response(self) -> None:
        upstream = self.upstream
        assert upstream is not None and self._request is not None
        head_bytes = b""
        if self._response is None:
            end = find_head_end(upstream.buffer, upstream=True)
            if end < 0:
                return
            if self._request.keep_alive:
                plain = plain_response(upstream.buffer, end, self._request.method)
                if plain is not None:
                    self._relay_plain_response(plain, end)
                    return
            head = self._take_final_head(upstream)
            if head is None:
                return
            head_bytes = self._start_response(head)
            if self.state is not _State.EXCHANGE:
                return
        body = self._response_body
        if upstream.buffer and not body.done:
            used = body.take(upstream.buffer)
            if used:
                chunk = upstream.consume(used)
                # One write for head and body: a small answer reaches the client in one read.
                self.client.write(head_bytes + chunk if head_bytes else chunk)
                head_bytes = b""
        self.client.write(head_bytes)
        self._end_response_if_done()

    def _take_final_head(self, upstream: ConnectionSide) -> Head | None:
        """dockerd's final answer head from the buffer, interim 1xx ones passed on to the
        client; None while it has not arrived whole."""
        while (end := find_head_end(upstream.buffer, upstream=True)) >= 0:
            head = parse_response_head(upstream.consume(end))
            if head.status == 101 or not 100 <= head.status < 200:
                return head
            self.client.write(encode_head(head.start_line, head.headers))
        return None

    def _relay_plain_response(self, plain: PlainMessage, end: int) -> None:
        """Pass on an answer that needs no change before parsing it (see _relay_plain_request).

        dockerd sends nothing but this answer until it is complete, so everything buffered goes.
        """
        upstream = self.upstream
        assert upstream is not None and self._request is not None
        chunk = upstream.consume()
        self.client.write(chunk)
        self._answer_started = True
        self._response, self._response_body = plain.head, BodyFramer(plain.framing, plain.length)
        self._keep_alive = plain.framing is not Framing.UNTIL_CLOSE
        rest = memoryview(chunk)[end:]
        if self._response_body.take(rest) < len(rest):
            raise UpstreamError("dockerd sent more than one answer to one request")
        self._end_response_if_done()

    def _end_response_if_done(self) -> None:
        upstream, body = self.upstream, self._response_body
        assert upstream is not None
        if upstream.at_eof and not body.done and body.framing is Framing.UNTIL_CLOSE:
            body.end_of_stream()
        if body.done:
            self._end_exchange()

    def _start_response(self, head: Head) -> bytes:
        """Take dockerd's final answer head; the head to send the client (written already for
        a hijacked stream, which has begun)."""
        assert self._request is not None
        framing, length = response_framing(head, self._request.method)
        self._answer_started = True
        if head.status == 101 or _is_raw_stream(head, framing):
            self.client.write(head.relay_bytes(head.start_line,
                                               keep_upgrade=head.status == 101))
            self._start_pipe()
            return b""
        keep = (self._request.keep_alive and head.keep_alive
                and framing is not Framing.UNTIL_CLOSE)
        self._response, self._response_body = head, BodyFramer(framing, length)
        self._keep_alive = keep
        return head.relay_bytes(head.start_line, close=not keep)

    def _end_exchange(self) -> None:
        # dockerd may answer before reading the whole body: that connection is spent.
        if not self._keep_alive or not self._request_body.done or self.client.at_eof:
            self._finish()
            return
        self.state = _State.IDLE
        self._request = self._response = None
        self._answer_started = False
        if self.client.buffer:
            self._next_request()

    # Hijacked streams

    def _start_pipe(self) -> None:
        """Become a byte pipe both ways, passing each side's half-close on to the other.

        Some clients (docker-py's attach_socket) read the head through a buffered reader and
        lose any stream bytes that arrive in the same read. dockerd's own gap between head and
        stream hides this; the proxy would read both at once, so it leaves one.
        """
        self.state = _State.PIPE
        self._settling = True
        asyncio.get_running_loop().call_later(HIJACK_SETTLE, self._guarded_settled)
        self._pipe(self.client)

    def _guarded_settled(self) -> None:
        self._settling = False
        if self.state is _State.PIPE and self.upstream is not None:
            self._guard(self._pipe)(self.upstream)

    def _pipe(self, source: ConnectionSide) -> None:
        upstream = self.upstream
        assert upstream is not None
        if source is upstream and self._settling:
            return
        sink = upstream if source is self.client else self.client
        if source.buffer:
            sink.write(source.consume())
        if source.at_eof:
            sink.write_eof()
            if self.client.at_eof and upstream.at_eof and not upstream.buffer:
                self._finish()

    # Hooked requests

    async def _hooked_exchange(
        self, head: Head, hooks: MatchedHooks, framing: Framing, length: int
    ) -> None:
        try:
            body = await self._read_client_body(head, framing, length)
        except RequestTooLarge:
            raise RequestTooLarge(
                f"request body of {head.method} {head.path} is larger than the "
                f"{self.proxy.json_limit} bytes accepted for hooked requests"
            ) from None
        chain = self.proxy.hook_chain
        sent = await chain.run_pre(hooks.pre, ClientRequest(head.method, head.target,
                                                            _json_text(head, body)))
        upstream = await self._ensure_upstream()
        payload = (sent.body or "").encode()
        headers = [(k, v) for k, v in head.end_to_end_headers(keep_upgrade=head.upgrade_requested)
                   if k.lower() not in FRAMING_HEADERS]
        if payload or framing is not Framing.NONE:
            headers.append(("Content-Length", str(len(payload))))
        upstream.write(encode_head(f"{sent.method} {sent.request} HTTP/1.1", headers) + payload)
        request_as_sent = Head(head.start_line, head.headers, method=sent.method,
                               target=sent.request, version=head.version)
        if not hooks.post:
            # From here on the callbacks relay the answer, as for any request.
            self._begin_exchange(request_as_sent, BodyFramer(Framing.NONE))
            self._upstream_progress()
            return
        response = await self._read_response_head(upstream)
        framing_, length_ = response_framing(response, sent.method)
        self._begin_exchange(request_as_sent, BodyFramer(Framing.NONE))
        if response.status == 101 or _is_raw_stream(response, framing_):
            self._start_response(response)  # a hijacked stream: the head is sent already
            return
        self.state = _State.HOOKED
        try:
            raw = await _read_whole_body(upstream, BodyFramer(framing_, length_,
                                                              limit=RESPONSE_LIMIT))
        except RequestTooLarge:
            raise UpstreamError(
                f"dockerd's answer to {sent.method} {sent.request} is too large for post-hooks"
            ) from None
        except BadRequest as exc:
            raise UpstreamError(f"dockerd's answer was cut short: {exc}") from None
        answer = ServerResponse(response.get("content-type", "") or "",
                                raw.decode("utf-8", "replace") or None, response.status)
        answer = await chain.run_post(hooks.post, sent, answer)
        self._answer_started = True
        self._keep_alive = (head.keep_alive and response.keep_alive
                            and framing_ is not Framing.UNTIL_CLOSE)
        self.client.write(_full_response(answer, response, keep=self._keep_alive))
        self.state = _State.EXCHANGE
        self._end_exchange()

    async def _read_client_body(self, head: Head, framing: Framing, length: int) -> bytes:
        try:
            return await _read_whole_body(
                self.client, BodyFramer(framing, length, limit=self.proxy.json_limit))
        except RequestTooLarge:
            raise
        except BadRequest as exc:
            raise BadRequest(f"body of {head.method} {head.path}: {exc}") from None

    async def _read_response_head(self, upstream: ConnectionSide) -> Head:
        """dockerd's final answer head, waiting for it; interim 1xx answers go on to the client."""
        while (head := self._take_final_head(upstream)) is None:
            if upstream.at_eof:
                raise UpstreamError("dockerd closed the connection without answering")
            await upstream.wait_readable()
        return head

    # Connections

    def _upstream_usable(self) -> bool:
        upstream = self.upstream
        return upstream is not None and not upstream.at_eof and not upstream.buffer

    async def _ensure_upstream(self) -> ConnectionSide:
        if self._upstream_usable():
            assert self.upstream is not None
            return self.upstream
        self._drop_upstream()
        upstream = ConnectionSide("dockerd", on_data=self._guard(self._upstream_data),
                                  on_eof=self._guard(self._upstream_eof),
                                  on_lost=self._guard(self._lost))
        await self.proxy.connect(upstream)
        if self._closed:
            upstream.abort()
            raise _ClientGone
        upstream.link(source=self.client)
        self.client.link(source=upstream)
        self.upstream = upstream
        return upstream

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.unlink()
            self.client.unlink()
            self.upstream.close()
            self.upstream = None

    def _spawn(self, work: _Work) -> None:
        task = asyncio.get_running_loop().create_task(self._run(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, work: _Work) -> None:
        try:
            await work
        except PowerplaneError as exc:
            self._refuse(exc)
        except _ClientGone:
            pass
        except asyncio.CancelledError:
            self._abort()
        except Exception:
            log.exception("unexpected error relaying a client connection")
            self._abort()

    # Endings

    def _refuse(self, error: PowerplaneError) -> None:
        """Answer with a Docker-shaped error, then let the client finish sending before closing.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        error answer before the client reads it; a short drain avoids that. An error after the
        answer started cannot be told to the client any more: the connection is cut.
        """
        if self._closed:
            return
        if self._answer_started:
            log.info("relay stopped (%s): %s", error.status, error.message)
            self._abort()
            return
        log.info("request refused (%s): %s", error.status, error.message)
        self.state = _State.CLOSING
        self._drop_upstream()
        client = self.client
        client.consume()
        client.write(error_response(error.status, error.message, close=True))
        client.write_eof()
        if client.at_eof:
            self._finish()
        else:
            asyncio.get_running_loop().call_later(DRAIN_AFTER_ERROR, self._finish)

    def _finish(self) -> None:
        """Close both connections once what was written to them is sent."""
        self._closed = True
        self.state = _State.CLOSING
        if self.upstream is not None:
            self.upstream.close()
        self.client.close()

    def _abort(self) -> None:
        """Cut both connections now."""
        self._closed = True
        self.state = _State.CLOSING
        if self.upstream is not None:
            self.upstream.abort()
        self.client.abort()

    def shut_down(self) -> list[asyncio.Task[None]]:
        """Cut the connections and cancel running work (proxy shutdown); the tasks to await."""
        self._abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks


async def _read_whole_body(side: ConnectionSide, framer: BodyFramer) -> bytes:
    while True:
        if side.buffer:
            side.consume(framer.take(side.buffer))
        if framer.done:
            return framer.payload
        if side.at_eof:
            framer.end_of_stream()
            return framer.payload
        await side.wait_readable()


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
    if framing is not Framing.UNTIL_CLOSE:
        return False
    content_type = (response.get("content-type") or "").split(";")[0].strip().lower()
    return content_type in RAW_STREAM_TYPES


def _full_response(answer: ServerResponse, original: Head, *, keep: bool) -> bytes:
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
    return encode_head(f"HTTP/1.1 {answer.code} {reason}", headers) + body


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


