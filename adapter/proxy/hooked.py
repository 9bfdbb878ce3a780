"""A hooked exchange: the request's JSON body read whole, hooks run, the result relayed.

Runs as a task (hooks may call external adapters over HTTP) while the session's callbacks leave
the bytes alone. Pre-hooks see and may rewrite the request; it goes to dockerd with a fresh
Content-Length. Without post-hooks the answer is relayed by the session as for any request.
With post-hooks the answer body is read whole too (``RESPONSE_LIMIT``), the hooks rewrite it,
and the client gets their Code, ContentType and Body. A hijacked answer (attach through a hooked
path) becomes a pipe as usual.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING

from adapter import logs
from adapter.errors import BadRequest, RequestTooLarge, UpstreamError
from adapter.proxy.connection import ConnectionSide
from adapter.proxy.hookchain import ClientRequest, MatchedHooks, ServerResponse
from adapter.proxy.http1 import Framing, Head, MessageParser, encode_head
from adapter.proxy.pipe import starts_raw_stream
from adapter.proxy.upstream import UpstreamSide

if TYPE_CHECKING:
    from adapter.proxy.session import Session

RESPONSE_LIMIT = 64 * 1024 * 1024
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


async def hooked_exchange(
    session: Session, head: Head, hooks: MatchedHooks, framing: Framing, length: int
) -> None:
    """Relay ``head`` (its body still unread in the client's buffer) through ``hooks``.

    Runs as a task of its own: every line the hooks log names the request.
    """
    logs.bind(request=session.request_id)
    limit = session.proxy.json_limit
    try:
        body = await _read_whole_body(session.client, head, framing, length, limit=limit,
                                      answers=False)
    except RequestTooLarge:
        raise RequestTooLarge(
            f"request body of {head.method} {head.path} is larger than the "
            f"{limit} bytes accepted for hooked requests"
        ) from None
    except BadRequest as exc:
        raise BadRequest(f"body of {head.method} {head.path}: {exc}") from None
    chain = session.proxy.hook_chain
    sent = await chain.run_pre(hooks.pre, ClientRequest(head.method, head.target,
                                                        _json_text(head, body)))
    upstream = await session.ensure_upstream()
    payload = (sent.body or "").encode()
    headers = [(k, v) for k, v in head.end_to_end_headers(keep_upgrade=head.upgrade_requested)
               if k.lower() not in FRAMING_HEADERS]
    if payload or framing is not Framing.NONE:
        headers.append(("Content-Length", str(len(payload))))
    start_line = f"{sent.method} {sent.request} HTTP/1.1"
    upstream.write(encode_head(start_line, headers) + payload)
    request_as_sent = Head.build(start_line, head.headers, method=sent.method,
                                 target=sent.request, keep_alive=head.keep_alive)
    if not hooks.post:
        # From here on the session's callbacks relay the answer, as for any request.
        session.begin_exchange(request_as_sent)
        session.upstream_progress()
        return
    response = await _read_final_head(session, upstream)
    answer_framing, answer_length = response.response_framing(sent.method)
    if starts_raw_stream(response, answer_framing):
        session.begin_exchange(request_as_sent)
        session.start_response(response)  # a hijacked stream: the head is sent already
        return
    upstream.answers.forget_message()  # the answer's body is read here, not relayed
    try:
        raw = await _read_whole_body(upstream, response, answer_framing, answer_length,
                                     limit=RESPONSE_LIMIT, answers=True)
    except RequestTooLarge:
        raise UpstreamError(
            f"dockerd's answer to {sent.method} {sent.request} is too large for post-hooks"
        ) from None
    except (BadRequest, UpstreamError) as exc:
        raise UpstreamError(f"dockerd's answer was cut short: {exc}") from None
    answer = ServerResponse(response.get("content-type", "") or "",
                            raw.decode("utf-8", "replace") or None, response.status)
    answer = await chain.run_post(hooks.post, sent, answer)
    keep_alive = (head.keep_alive and response.keep_alive
                  and answer_framing is not Framing.UNTIL_CLOSE)
    session.begin_exchange(request_as_sent)
    session.deliver_answer(_full_response(answer, response, keep=keep_alive),
                           status=answer.code, keep_alive=keep_alive)


async def _read_final_head(session: Session, upstream: UpstreamSide) -> Head:
    """dockerd's final answer head, waiting for it; interim 1xx answers go on to the client."""
    while (head := session.take_final_head(upstream)) is None:
        if upstream.at_eof:
            raise UpstreamError("dockerd closed the connection without answering")
        await upstream.wait_readable()
    return head


async def _read_whole_body(side: ConnectionSide, head: Head, framing: Framing, length: int, *,
                           limit: int, answers: bool) -> bytes:
    """The decoded body that follows ``head`` on ``side``, at most ``limit`` bytes."""
    body = MessageParser(answers=answers, collect=True, limit=limit)
    body.parse_head(head.raw)
    body.begin_body(framing, length)
    while True:
        if side.buffer:
            side.consume(body.take(side.buffer))
        if body.done:
            return body.payload
        if side.at_eof:
            body.end_of_stream()
            return body.payload
        await side.wait_readable()


def _json_text(head: Head, body: bytes) -> str | None:
    if not body:
        return None
    try:
        text = body.decode("utf-8")
        json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"invalid JSON body for {head.method} {head.path}: {exc}") from None
    except RecursionError:
        raise BadRequest(f"JSON body for {head.method} {head.path} is nested too deeply") from None
    return text


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
