"""HTTP/1.1 syntax the relay depends on: heads parsed by llhttp, and where bodies end."""

from __future__ import annotations

import pytest

from adapter.errors import BadRequest, RequestTooLarge, UpstreamError
from adapter.proxy.http1 import (
    MAX_HEAD_BYTES,
    Framing,
    Head,
    MessageParser,
    find_head_end,
)


def request(raw: bytes, parser: MessageParser | None = None) -> Head:
    return (parser or MessageParser(answers=False)).parse_head(raw)


def answer(raw: bytes, parser: MessageParser | None = None) -> Head:
    return (parser or MessageParser(answers=True)).parse_head(raw)


def test_request_head_fields_and_hop_by_hop() -> None:
    head = request(
        b"POST /v1.41/build?t=x HTTP/1.1\r\nHost: docker\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nContent-Length:  12 \r\nTE: trailers\r\n\r\n")
    assert (head.method, head.path, head.target) == ("POST", "/v1.41/build", "/v1.41/build?t=x")
    assert head.get("content-length") == "12"
    assert head.request_framing() == (Framing.LENGTH, 12)
    assert head.keep_alive
    # Connection, the fields it names and TE concern this hop only.
    assert head.end_to_end_headers() == [("Host", "docker"), ("Content-Length", "12")]
    assert b"X-Secret" not in head.relay_bytes()


def test_unchanged_head_is_relayed_as_received() -> None:
    raw = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nUser-Agent: Docker-Client/20.10\r\n\r\n"
    head = request(raw)
    assert head.relay_bytes() is raw
    assert head.relay_bytes(close=True).endswith(b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
    b"GET /x HTTP/1.1\r\n: empty\r\n\r\n",
    b"GET /x HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    b"GET x HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/2\r\n\r\n",
    b"GET /x HTTP/2.0\r\n\r\n",
    b"GET  /x HTTP/1.1\r\n\r\n",
    b"GET http://h/x HTTP/1.1\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 5x\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
])
def test_malformed_requests_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        request(raw)


def test_a_bad_header_line_is_named() -> None:
    with pytest.raises(BadRequest, match="malformed header line 'Bad Header: 1'"):
        request(b"GET /x HTTP/1.1\r\nHost: d\r\nBad Header: 1\r\n\r\n")


def test_head_size_limit() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\n") == -1
    with pytest.raises(BadRequest):
        find_head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES)
    with pytest.raises(UpstreamError):
        find_head_end(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES, upstream=True)


def test_request_framing_read_while_parsing() -> None:
    head = request(b"POST /containers/x/stop HTTP/1.1\r\nHost: d\r\n"
                   b"Content-Length: 7\r\nX: y\r\n\r\n")
    assert (head.method, head.path, head.request_framing()) == (
        "POST", "/containers/x/stop", (Framing.LENGTH, 7))
    assert head.headers == [("Host", "d"), ("Content-Length", "7"), ("X", "y")]
    assert request(b"GET /x HTTP/1.1\r\n\r\n").request_framing() == (Framing.NONE, 0)
    chunked = request(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked.request_framing() == (Framing.CHUNKED, -1)


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/1.0\r\n\r\n",  # the request line goes on as HTTP/1.1
    b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /x HTTP/1.1\r\nconnection: Upgrade\r\nUpgrade: tcp\r\n\r\n",
    b"GET /x HTTP/1.1\r\nTE: trailers\r\n\r\n",
])
def test_requests_needing_a_change_are_rewritten(raw: bytes) -> None:
    head = request(raw)
    relayed = head.relay_bytes(keep_upgrade=head.upgrade_requested)
    assert relayed != raw
    assert relayed.startswith(b"GET /x HTTP/1.1\r\n")
    assert b"TE:" not in relayed and b"close" not in relayed


def test_keep_alive_and_upgrade_requests() -> None:
    assert not request(b"GET /x HTTP/1.0\r\n\r\n").keep_alive
    assert request(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not request(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    upgrade = request(b"POST /x/attach HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
    assert upgrade.upgrade_requested
    assert upgrade.relay_bytes(keep_upgrade=True).endswith(
        b"Upgrade: tcp\r\nConnection: Upgrade\r\n\r\n")


def test_response_framings() -> None:
    def framing(raw: bytes, method: str = "GET") -> tuple[Framing, int]:
        return answer(raw).response_framing(method)

    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n") == (Framing.LENGTH, 2)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "HEAD") == (Framing.NONE, 0)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == (Framing.NONE, 0)
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        Framing.CHUNKED, -1)
    assert framing(b"HTTP/1.1 204 No Content\r\n\r\n") == (Framing.NONE, 0)
    assert framing(b"HTTP/1.1 100 Continue\r\n\r\n") == (Framing.NONE, 0)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n") == (
        Framing.UNTIL_CLOSE, -1)
    raw_stream = answer(b"HTTP/1.1 200 OK\r\n"
                        b"Content-Type: application/vnd.docker.raw-stream\r\n\r\n")
    assert raw_stream.content_type == "application/vnd.docker.raw-stream"
    upgraded = answer(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
    assert upgraded.status == 101 and upgraded.upgrade
    closing = answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert not closing.keep_alive
    assert b"Connection" not in closing.relay_bytes() and closing.hop_by_hop


def test_response_head_errors_blame_dockerd() -> None:
    for raw in (b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"):
        with pytest.raises(UpstreamError):
            answer(raw)


def feed(parser: MessageParser, stream: bytes, piece: int) -> int:
    """Offer ``stream`` in ``piece``-byte reads the way the relay does; bytes taken."""
    pending = b""
    taken = 0
    for start in range(0, len(stream), piece):
        pending += stream[start:start + piece]
        used = parser.take(pending)
        taken += used
        pending = pending[used:]
        if parser.done:
            break
    return taken


CHUNKED = b"5;ext=1\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: yes\r\n\r\n"
CHUNKED_HEAD = b"POST /build HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("piece", range(1, len(CHUNKED) + 2))
def test_chunked_request_body_split_anywhere(piece: int) -> None:
    """A chunked body ends exactly, wherever reads split it; the next request follows."""
    parser = MessageParser(answers=False, collect=True, limit=1000)
    parser.begin_body(*request(CHUNKED_HEAD, parser).request_framing())
    assert feed(parser, CHUNKED + b"GET /next HTTP/1.1\r\n\r\n", piece) == len(CHUNKED)
    assert parser.done
    assert parser.payload == b"hello" + b"x" * 26
    assert request(b"GET /next HTTP/1.1\r\n\r\n", parser).path == "/next"  # pipelining


@pytest.mark.parametrize("piece", range(1, len(CHUNKED) + 1))
def test_chunked_answer_split_anywhere(piece: int) -> None:
    """An answer's chunked body is framed by llhttp: done on its last byte, at any split."""
    parser = MessageParser(answers=True)
    head = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", parser)
    parser.begin_body(*head.response_framing("GET"))
    done_at = [start for start in range(0, len(CHUNKED), piece)
               if parser.take(CHUNKED[start:start + piece]) and parser.done]
    assert done_at == [(len(CHUNKED) - 1) // piece * piece]
    # The same parser reads the next answer on the connection.
    assert answer(b"HTTP/1.1 204 No Content\r\n\r\n", parser).status == 204


def test_answer_after_a_head_request_is_read_afresh() -> None:
    parser = MessageParser(answers=True)
    head = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", parser)
    parser.begin_body(*head.response_framing("HEAD"))
    assert parser.done
    assert answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", parser).content_length == 2


def test_a_second_answer_in_one_read_is_refused() -> None:
    parser = MessageParser(answers=True)
    head = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", parser)
    parser.begin_body(*head.response_framing("GET"))
    with pytest.raises(UpstreamError, match="more than one answer"):
        parser.take(b"0\r\n\r\nHTTP/1.1 200 OK\r\n")


def test_length_body_stops_at_its_end() -> None:
    parser = MessageParser(answers=False, collect=True, limit=10)
    parser.begin_body(*request(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n", parser)
                      .request_framing())
    assert parser.take(b"abc") == 3
    assert parser.take(b"defGET") == 2
    assert parser.done and parser.payload == b"abcde"


def test_body_limits_and_truncation() -> None:
    too_long = MessageParser(answers=False, collect=True, limit=10)
    too_long.parse_head(b"POST /x HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(RequestTooLarge):
        too_long.begin_body(Framing.LENGTH, 11)
    chunked = MessageParser(answers=False, collect=True, limit=4)
    chunked.begin_body(*request(CHUNKED_HEAD, chunked).request_framing())
    with pytest.raises(RequestTooLarge):
        chunked.take(b"5\r\nhello\r\n")
    truncated = MessageParser(answers=False)
    truncated.begin_body(*request(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n", truncated)
                         .request_framing())
    truncated.take(b"abc")
    with pytest.raises(BadRequest):
        truncated.end_of_stream()
    until_close = MessageParser(answers=True)
    until_close.begin_body(*answer(b"HTTP/1.1 200 OK\r\n\r\n", until_close)
                           .response_framing("GET"))
    assert until_close.take(b"anything") == 8
    until_close.end_of_stream()
    assert until_close.done


@pytest.mark.parametrize("line", [b"-1\r\n", b"+a\r\n", b"1_0\r\n", b"zz\r\n", b"\r\n",
                                  b"5 \r\nhello\r\n"])
@pytest.mark.parametrize("answers", [False, True])
def test_malformed_chunk_size(line: bytes, answers: bool) -> None:
    parser = MessageParser(answers=answers)
    if answers:
        parser.begin_body(*answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                  parser).response_framing("GET"))
    else:
        parser.begin_body(*request(CHUNKED_HEAD, parser).request_framing())
    with pytest.raises(UpstreamError if answers else BadRequest):
        parser.take(line)


def test_endless_chunk_line_refused() -> None:
    parser = MessageParser(answers=False)
    parser.begin_body(*request(CHUNKED_HEAD, parser).request_framing())
    with pytest.raises(BadRequest):
        parser.take(b"1" * 10_000)


def test_an_upgrade_request_keeps_its_body() -> None:
    """exec start asks for an upgrade and carries JSON: the body is framed all the same."""
    parser = MessageParser(answers=False)
    head = request(b"POST /exec/x/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 4\r\n\r\n", parser)
    assert head.upgrade_requested
    parser.begin_body(*head.request_framing())
    assert parser.take(b"{}\r\nGET") == 4 and parser.done
    assert request(b"GET /next HTTP/1.1\r\n\r\n", parser).path == "/next"


def test_a_hooked_upgrade_request_body_is_collected() -> None:
    parser = MessageParser(answers=False, collect=True, limit=100)
    head = request(b"POST /exec/x/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                   b"Content-Length: 11\r\n\r\n", parser)
    parser.begin_body(*head.request_framing())
    assert parser.take(b'{"Tty": 1}\n') == 11 and parser.done
    assert parser.payload == b'{"Tty": 1}\n'
