"""One client connection relayed to dockerd: the state machine behind its socket callbacks.

A request that matches no hook is relayed from inside the callbacks, with no task switch: its
head is parsed (llhttp), written upstream without hop-by-hop headers, and body and answer are
copied with their framing as they arrive. Only connecting to dockerd (when no idle connection
is at hand) and hooked requests (``hooked``) run as tasks, and the callbacks leave the bytes
alone while one runs. A hijacked answer hands both sockets to a ``HijackPipe`` (``pipe``).

Every callback catches its errors: a ``PowerplaneError`` before the answer started becomes a
Docker-shaped error reply, anything later cuts the connection.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from adapter.errors import BadRequest, PowerplaneError, UpstreamError
from adapter.logs import fields
from adapter.proxy.connection import ConnectionSide
from adapter.proxy.docker_errors import error_response
from adapter.proxy.hooked import hooked_exchange
from adapter.proxy.http1 import Framing, Head, MessageParser, find_head_end
from adapter.proxy.observer import HIJACKED, route_class
from adapter.proxy.pipe import HijackPipe, starts_raw_stream
from adapter.proxy.upstream import UpstreamSide

if TYPE_CHECKING:
    from adapter.proxy.relay import DockerProxy

SESSION_LOGGER = __name__
log = logging.getLogger(SESSION_LOGGER)

DRAIN_AFTER_ERROR = 2.0

_Work = Coroutine[Any, Any, None]


class ClientGone(Exception):
    """The client left while a task was working for it; the task's result has nowhere to go."""


class State(enum.Enum):
    IDLE = "waiting for a request"
    CONNECTING = "connecting to dockerd"
    EXCHANGE = "relaying a request and its answer"
    HOOKED = "running hooks"
    PIPE = "relaying a hijacked stream"
    CLOSING = "closing"


class Session:
    """One client connection and the dockerd connection serving it."""

    def __init__(self, proxy: DockerProxy) -> None:
        self.proxy = proxy
        self.client = ConnectionSide("client", on_data=self._client_data,
                                     on_eof=self._client_eof, on_lost=self._client_lost)
        self.upstream: UpstreamSide | None = None
        self.state = State.IDLE
        self.requests = MessageParser(answers=False)
        self.request: Head | None = None
        self.response: Head | None = None
        self.answer_started = False
        self.keep_alive = True
        self._pipe: HijackPipe | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.request_number = 0
        # The request being timed until its answer's head (only with an observer or at debug
        # level), and when its head arrived.
        self._timed: Head | None = None
        self._started = 0.0

    @property
    def request_id(self) -> str:
        """The current request's id, as log lines about it name it."""
        return f"{self.proxy.request_tag}-{self.request_number}"

    # Socket callbacks: each dispatches on the state and turns an error into an ending.

    def _client_data(self, client: ConnectionSide) -> None:
        try:
            state = self.state
            if state is State.IDLE:
                self._next_request()
            elif state is State.EXCHANGE:
                self._relay_request_body()
            elif state is State.PIPE:
                assert self._pipe is not None
                self._pipe.relay(client)
            elif state is State.CLOSING:
                client.consume()
        except Exception as exc:
            self._failed(exc)

    def _upstream_data(self, upstream: ConnectionSide) -> None:
        if upstream is not self.upstream:
            return
        try:
            state = self.state
            if state is State.EXCHANGE:
                self._relay_response()
            elif state is State.PIPE:
                assert self._pipe is not None
                self._pipe.relay(upstream)
            elif state is State.IDLE:
                # dockerd never speaks between exchanges; a connection that does is not trusted.
                self._drop_upstream()
        except Exception as exc:
            self._failed(exc)

    def _client_eof(self, client: ConnectionSide) -> None:
        try:
            self._client_ended()
        except Exception as exc:
            self._failed(exc)

    def _client_ended(self) -> None:
        state = self.state
        if state is State.IDLE:
            if self.client.buffer:
                raise BadRequest("connection closed in the middle of a message head")
            self._finish(reuse_upstream=True)
        elif state is State.EXCHANGE and not self.requests.done:
            self.requests.end_of_stream()  # a truncated upload: BadRequest, or cut
        elif state is State.PIPE:
            assert self._pipe is not None
            self._pipe.relay(self.client)
        elif state is State.CLOSING:
            self._finish()

    def _upstream_eof(self, upstream: ConnectionSide) -> None:
        if upstream is not self.upstream:
            return
        try:
            self._upstream_ended(upstream)
        except Exception as exc:
            self._failed(exc)

    def _upstream_ended(self, upstream: ConnectionSide) -> None:
        state = self.state
        if state is State.IDLE:
            self._drop_upstream()
        elif state is State.EXCHANGE:
            if self.response is None and not self.answer_started:
                raise UpstreamError("dockerd closed the connection without answering")
            self._relay_response()
            if self.state is State.EXCHANGE:
                # The answer was cut short: the client must not take it for a whole one.
                self._abort()
        elif state is State.PIPE:
            assert self._pipe is not None
            self._pipe.relay(upstream)

    def _client_lost(self, client: ConnectionSide) -> None:
        if self.state is State.IDLE and not client.buffer:
            self._finish(reuse_upstream=True)
        self._abort()
        self.proxy.forget(self)

    def _upstream_lost(self, upstream: ConnectionSide) -> None:
        if upstream is self.upstream and self.state in (State.EXCHANGE, State.PIPE):
            self._upstream_eof(upstream)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, PowerplaneError):
            self.refuse(exc)
        else:
            log.error("unexpected error relaying a client connection", exc_info=exc)
            self._abort()

    # Requests

    def _next_request(self) -> None:
        client = self.client
        end = find_head_end(client.buffer)
        if end < 0:
            return
        proxy = self.proxy
        self.request_number = next(proxy.request_numbers)
        head = self.requests.parse_head(bytes(client.consume(end)))
        if proxy.observer is not None or proxy.log_requests:
            self._timed, self._started = head, time.perf_counter()
        framing, length = head.request_framing()
        self.requests.begin_body(framing, length)
        hooks = self.proxy.hook_chain.match(head.method, head.path)
        if hooks is not None and _bufferable(head, framing):
            self.requests.forget_message()  # the hooked exchange reads the body itself
            self.state = State.HOOKED
            self._spawn(hooked_exchange(self, head, hooks, framing, length))
        elif self._upstream_at_hand():
            self._send_request(head)
        else:
            self.state = State.CONNECTING
            self._spawn(self._connect_and_send(head))

    async def _connect_and_send(self, head: Head) -> None:
        await self.ensure_upstream()
        if self.state is State.CONNECTING:
            self._send_request(head)
            self.upstream_progress()

    def _send_request(self, head: Head) -> None:
        upstream = self.upstream
        assert upstream is not None
        upstream.write(head.relay_bytes(keep_upgrade=head.upgrade_requested))
        self.begin_exchange(head)
        self._relay_request_body()
        if self.client.at_eof:
            self._client_ended()

    def begin_exchange(self, request: Head) -> None:
        """``request`` is on its way to dockerd: relay the answer from here on."""
        self.state = State.EXCHANGE
        self.request, self.response, self.answer_started = request, None, False

    def _relay_request_body(self) -> None:
        body, client = self.requests, self.client
        if body.done or not client.buffer:
            return
        used = body.take(client.buffer)
        if used and self.upstream is not None:
            self.upstream.write(client.consume(used))

    # Answers

    def upstream_progress(self) -> None:
        """Handle what dockerd sent while nobody was relaying it (a task was running)."""
        upstream = self.upstream
        if self.state is not State.EXCHANGE or upstream is None:
            return
        if upstream.at_eof:
            self._upstream_ended(upstream)
        elif upstream.buffer:
            self._relay_response()

    def _relay_response(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        head_bytes = b""
        if self.response is None:
            head = self.take_final_head(upstream)
            if head is None:
                return
            head_bytes = self.start_response(head)
            if self.state is not State.EXCHANGE:
                return
        body = upstream.answers
        if upstream.buffer and not body.done:
            used = body.take(upstream.buffer)
            if used:
                chunk = upstream.consume(used)
                # One write for head and body: a small answer reaches the client in one read.
                self.client.write(head_bytes + chunk if head_bytes else chunk)
                head_bytes = b""
        self.client.write(head_bytes)
        if upstream.at_eof and not body.done and body.framing is Framing.UNTIL_CLOSE:
            body.end_of_stream()
        if body.done:
            self._end_exchange()

    def take_final_head(self, upstream: UpstreamSide) -> Head | None:
        """dockerd's final answer head from the buffer, interim 1xx ones passed on to the
        client; None while it has not arrived whole."""
        while (end := find_head_end(upstream.buffer, upstream=True)) >= 0:
            head = upstream.answers.parse_head(bytes(upstream.consume(end)))
            if head.status == 101 or head.status >= 200:
                return head
            self.client.write(head.relay_bytes())
        return None

    def start_response(self, head: Head) -> bytes:
        """Take dockerd's final answer head; the head to send the client (written already for
        a hijacked stream, which has begun)."""
        request = self.request
        assert request is not None and self.upstream is not None
        framing, length = head.response_framing(request.method)
        self.answer_started = True
        hijacked = starts_raw_stream(head, framing)
        if self._timed is not None:
            self._answered(head.status, hijacked=hijacked)
        if hijacked:
            self.client.write(head.relay_bytes(keep_upgrade=head.status == 101))
            self._start_pipe()
            return b""
        keep = request.keep_alive and head.keep_alive and framing is not Framing.UNTIL_CLOSE
        self.upstream.answers.begin_body(framing, length)
        self.response, self.keep_alive = head, keep
        return head.relay_bytes(close=not keep)

    def deliver_answer(self, answer: bytes, *, status: int, keep_alive: bool) -> None:
        """A whole answer made here (post-hooks ran) ends the exchange."""
        if self._timed is not None:
            self._answered(status)
        self.answer_started = True
        self.keep_alive = keep_alive
        self.client.write(answer)
        self.state = State.EXCHANGE
        self._end_exchange()

    def _answered(self, status: int, *, hijacked: bool = False) -> None:
        """The timed request has its answer's head: tell the observer (and the debug log)."""
        head, self._timed = self._timed, None
        assert head is not None
        seconds = time.perf_counter() - self._started
        route = HIJACKED if hijacked else route_class(head.method, head.path)
        proxy = self.proxy
        if proxy.observer is not None:
            proxy.observer.answered(route, status, seconds)
        if proxy.log_requests:
            log.debug("%s %s: %d in %.2f ms (%s)", head.method, head.path, status,
                      seconds * 1000, route, extra=fields(request=self.request_id))

    def _end_exchange(self) -> None:
        # dockerd may answer before reading the whole body: that connection is spent.
        if not self.keep_alive or not self.requests.done:
            self._finish()
            return
        if self.client.at_eof:
            self._finish(reuse_upstream=True)
            return
        self.state = State.IDLE
        self.request = self.response = None
        self.answer_started = False
        if self.client.buffer:
            self._next_request()

    def _start_pipe(self) -> None:
        assert self.upstream is not None
        self.state = State.PIPE
        self._pipe = HijackPipe(self.client, self.upstream, on_finished=self._finish,
                                on_error=self._abort)

    # dockerd connections

    def _upstream_at_hand(self) -> bool:
        """A dockerd connection ready for a request without waiting: ours, or an idle one."""
        upstream = self.upstream
        if upstream is not None and not upstream.at_eof and not upstream.buffer:
            return True
        self._drop_upstream()
        idle = self.proxy.pool.take_idle()
        if idle is None:
            return False
        self._adopt(idle)
        return True

    async def ensure_upstream(self) -> UpstreamSide:
        if not self._upstream_at_hand():
            upstream = UpstreamSide(on_data=self._upstream_data, on_eof=self._upstream_eof,
                                    on_lost=self._upstream_lost)
            await self.proxy.pool.connect(upstream)
            if self._closed:
                upstream.abort()
                raise ClientGone
            self._adopt(upstream)
        assert self.upstream is not None
        return self.upstream

    def _adopt(self, upstream: UpstreamSide) -> None:
        upstream.bind(on_data=self._upstream_data, on_eof=self._upstream_eof,
                      on_lost=self._upstream_lost)
        upstream.link(source=self.client)
        self.client.link(source=upstream)
        self.upstream = upstream

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.unlink()
            self.client.unlink()
            self.upstream.close()
            self.upstream = None

    def _release_upstream(self) -> None:
        """Give a dockerd connection between exchanges back to the pool."""
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            self.client.unlink()
            self.proxy.pool.give_back(upstream)

    # Tasks

    def _spawn(self, work: _Work) -> None:
        task = asyncio.get_running_loop().create_task(self._run(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, work: _Work) -> None:
        try:
            await work
        except PowerplaneError as exc:
            self.refuse(exc)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            self._abort()
        except Exception:
            log.exception("unexpected error relaying a client connection")
            self._abort()

    # Endings

    def refuse(self, error: PowerplaneError) -> None:
        """Answer with a Docker-shaped error, then let the client finish sending before closing.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        error answer before the client reads it; a short drain avoids that. An error after the
        answer started cannot be told to the client any more: the connection is cut.
        """
        if self._closed:
            return
        if self.answer_started:
            log.info("relay stopped (%s): %s", error.status, error.message,
                     extra=fields(request=self.request_id))
            self._abort()
            return
        if self._timed is not None:
            self._answered(error.status)
        log.info("request refused (%s): %s", error.status, error.message,
                 extra=fields(request=self.request_id))
        self.state = State.CLOSING
        self._drop_upstream()
        client = self.client
        client.consume()
        client.write(error_response(error.status, error.message, close=True))
        client.write_eof()
        if client.at_eof:
            self._finish()
        else:
            asyncio.get_running_loop().call_later(DRAIN_AFTER_ERROR, self._finish)

    def _finish(self, *, reuse_upstream: bool = False) -> None:
        """Close both connections once what was written to them is sent; ``reuse_upstream``
        offers a dockerd connection between exchanges to the next client instead."""
        if reuse_upstream:
            self._release_upstream()
        self._closed = True
        self.state = State.CLOSING
        if self.upstream is not None:
            self.upstream.close()
        self.client.close()

    def _abort(self) -> None:
        """Cut both connections now."""
        self._closed = True
        self.state = State.CLOSING
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


def _bufferable(head: Head, framing: Framing) -> bool:
    """Hooks see JSON bodies only: a hooked build or image load still streams untouched."""
    if framing is Framing.NONE:
        return True
    content_type = head.content_type
    return content_type in ("", "application/json") or content_type.endswith("+json")
