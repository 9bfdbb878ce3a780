"""HTTP/1.1 syntax the relay depends on: head parsing, the plain fast path and body framing."""

from __future__ import annotations

import pytest

from adapter.errors import BadRequest, RequestTooLarge, UpstreamError
from adapter.proxy.http1 import (
    MAX_HEAD_BYTES,
    BodyFramer,
    Framing,
    find_head_end,
    parse_request_head,
    parse_response_head,
    plain_request,
    plain_response,
    request_framing,
    response_framing,
)


def _plain_request(raw: bytes):  # type: ignore[no-untyped-def]
    return plain_request(raw, len(raw))


def test_request_head_fields_and_hop_by_hop() -> None:
    head = parse_request_head(
        b"POST /v1.41/build?t=x HTTP/1.1\r\nHost: docker\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nContent-Length:  12 \r\nTE: trailers\r\n\r\n")
    assert (head.method, head.path, head.target) == ("POST", "/v1.41/build", "/v1.41/build?t=x")
    assert head.get("content-length") == "12"
    assert request_framing(head) == (Framing.LENGTH, 12)
    assert head.keep_alive
    # Connection, the fields it names and TE concern this hop only.
    assert head.end_to_end_headers() == [("Host", "docker"), ("Content-Length", "12")]
    assert b"X-Secret" not in head.relay_bytes(head.start_line)


def test_unchanged_head_is_relayed_as_received() -> None:
    raw = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nUser-Agent: Docker-Client/20.10\r\n\r\n"
    head = parse_request_head(raw)
    assert head.relay_bytes(head.start_line) == raw
    assert head.relay_bytes(head.start_line, close=True).endswith(b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
    b"GET /x HTTP/1.1\r\n: empty\r\n\r\n",
    b"GET /x HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    b"GET x HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/2\r\n\r\n",
    b"GET  /x HTTP/1.1\r\n\r\n",
])
def test_malformed_requests_are_refused(raw: bytes) -> None:
    assert _plain_request(raw) is None
    with pytest.raises(BadRequest):
        parse_request_head(raw)


def test_head_size_limit() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\n") == -1
    with pytest.raises(BadRequest):
        find_head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES)
    with pytest.raises(UpstreamError):
        find_head_end(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES, upstream=True)


def test_plain_request_reads_framing_in_one_match() -> None:
    plain = _plain_request(b"POST /containers/x/stop HTTP/1.1\r\nHost: d\r\n"
                           b"Content-Length: 7\r\nX: y\r\n\r\n")
    assert plain is not None
    assert (plain.head.method, plain.head.path, plain.framing, plain.length) == (
        "POST", "/containers/x/stop", Framing.LENGTH, 7)
    assert plain.head.headers == [("Host", "d"), ("Content-Length", "7"), ("X", "y")]


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/1.0\r\n\r\n",  # keep-alive rules differ
    b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /x HTTP/1.1\r\nconnection: Upgrade\r\nUpgrade: tcp\r\n\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 5x\r\n\r\n",
    b"GET /x HTTP/1.1\r\nTE: trailers\r\n\r\n",
])
def test_requests_needing_a_change_leave_the_fast_path(raw: bytes) -> None:
    assert _plain_request(raw) is None


def test_plain_response_framings() -> None:
    def plain(raw: bytes, method: str = "GET"):  # type: ignore[no-untyped-def]
        found = plain_response(raw, len(raw), method)
        return found and (found.framing, found.length)

    assert plain(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n") == (Framing.LENGTH, 2)
    assert plain(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "HEAD") == (Framing.NONE, 0)
    assert plain(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        Framing.CHUNKED, -1)
    assert plain(b"HTTP/1.1 204 No Content\r\n\r\n") == (Framing.NONE, 0)
    assert plain(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n") == (
        Framing.UNTIL_CLOSE, -1)
    # Interim answers, upgrades, raw streams and hop-by-hop fields need the full handling.
    assert plain(b"HTTP/1.1 100 Continue\r\n\r\n") is None
    assert plain(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n") is None
    assert plain(b"HTTP/1.1 200 OK\r\n"
                 b"Content-Type: application/vnd.docker.raw-stream\r\n\r\n") is None
    assert plain(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n") is None


def test_response_head_errors_blame_dockerd() -> None:
    with pytest.raises(UpstreamError):
        parse_response_head(b"HTTP/1.1 abc OK\r\n\r\n")
    with pytest.raises(UpstreamError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n")
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    with pytest.raises(UpstreamError):
        response_framing(head, "GET")


def _feed(framer: BodyFramer, stream: bytes, piece: int) -> int:
    """Offer ``stream`` in ``piece``-byte reads the way the relay does; bytes taken."""
    pending = b""
    taken = 0
    for start in range(0, len(stream), piece):
        pending += stream[start:start + piece]
        used = framer.take(pending)
        taken += used
        pending = pending[used:]
        if framer.done:
            break
    return taken


CHUNKED = b"5;ext=1\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: yes\r\n\r\n"


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_chunked_body_split_anywhere(piece: int) -> None:
    framer = BodyFramer(Framing.CHUNKED, limit=1000)
    assert _feed(framer, CHUNKED + b"GET /next", piece) == len(CHUNKED)
    assert framer.done
    assert framer.payload == b"hello" + b"x" * 26


def test_length_body_stops_at_its_end() -> None:
    framer = BodyFramer(Framing.LENGTH, 5, limit=10)
    assert framer.take(b"abc") == 3
    assert framer.take(b"defGET") == 2
    assert framer.done and framer.payload == b"abcde"


def test_body_limits_and_truncation() -> None:
    with pytest.raises(RequestTooLarge):
        BodyFramer(Framing.LENGTH, 11, limit=10)
    chunked = BodyFramer(Framing.CHUNKED, limit=4)
    with pytest.raises(RequestTooLarge):
        chunked.take(b"5\r\nhello\r\n")
    truncated = BodyFramer(Framing.LENGTH, 5)
    truncated.take(b"abc")
    with pytest.raises(BadRequest):
        truncated.end_of_stream()
    until_close = BodyFramer(Framing.UNTIL_CLOSE)
    assert until_close.take(b"anything") == 8
    until_close.end_of_stream()
    assert until_close.done


@pytest.mark.parametrize("line", [b"-1\r\n", b"+a\r\n", b"1_0\r\n", b"zz\r\n", b"\r\n"])
def test_malformed_chunk_size(line: bytes) -> None:
    with pytest.raises(BadRequest):
        BodyFramer(Framing.CHUNKED).take(line)


def test_endless_chunk_line_refused() -> None:
    with pytest.raises(BadRequest):
        BodyFramer(Framing.CHUNKED).take(b"1" * 10_000)
