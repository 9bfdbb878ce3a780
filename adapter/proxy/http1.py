"""HTTP/1.1 for a transparent relay: llhttp parses, this module says where messages end.

Heads, requests and answers alike, are parsed and validated by llhttp (the C parser behind
Node.js, through ``httptools``): one ``MessageParser`` per connection and direction, reused for
every message, fed each head as soon as its blank line has arrived. The relay forwards bodies as
they are, so a chunked upload stays chunked; what it needs from a parser is how many bytes of a
read still belong to the current body.

llhttp says *that* a message ended (``on_message_complete``), not *where* in the bytes it was
given. That is enough for an answer: dockerd sends nothing after it until the next request, so
an answer ends with the read that completes it, and anything after is an error. A request can
be followed by the next one in the same read (pipelining), so the end must be exact: a
Content-Length body ends by arithmetic, and a chunked request body is framed by ``ChunkedBody``,
the one piece of framing written here (finding the end from llhttp instead would mean searching
every read for CRLF CRLF, measured at 320 µs per 256 KiB against 10 µs for the framer; see
docs/proxy.md).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

import httptools

from adapter.errors import BadRequest, RequestTooLarge, UpstreamError

MAX_HEAD_BYTES = 64 * 1024
# A chunk-size line is a hex number and optional extensions; anything longer is an attack.
MAX_CHUNK_LINE = 4096

# Hop-by-hop headers (RFC 9110 7.6.1) concern one connection only; a proxy drops them.
# Transfer-Encoding is kept: bodies are relayed with their framing unchanged.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "upgrade",
})
HEAD_END = b"\r\n\r\n"
HEX_DIGITS = b"0123456789abcdefABCDEF"
# Only to name the bad line in a refusal: llhttp says what is wrong, not where.
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*[^\x00-\x08\x0a-\x1f\x7f]*")

# The fields a relay decides on, read from the lower-cased head by one C-level scan once llhttp
# has validated it: a Python callback per field (llhttp's on_header) costs several times more.
_NOTABLE = re.compile(
    b"\r\n(" + b"|".join(name.encode() for name in sorted(
        HOP_BY_HOP | {"content-length", "transfer-encoding", "content-type"},
        key=len, reverse=True))
    + b")[ \t]*:[ \t]*([^\r\n]*)")
_HOP_NAMES = frozenset(name.encode() for name in HOP_BY_HOP)
_METHODS = {method.encode(): method for method in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")}

ErrorType = type[BadRequest] | type[UpstreamError]


class Framing(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


class Head:
    """A request line (``method``, ``target``) or status line (``status``) and its fields.

    ``raw`` is the head exactly as received; ``relay_bytes`` sends it on unchanged when nothing
    in it has to change. The fields are kept as llhttp gave them (bytes); the few a relay decides
    on are read once, while the head is parsed, and the rest are decoded only when asked for.
    """

    __slots__ = ("_all", "_headers", "chunked", "content_length", "content_type", "hop_by_hop",
                 "keep_alive", "method", "raw", "status", "target", "upgrade", "version")

    def __init__(
        self,
        raw: bytes,
        *,
        method: str = "",
        target: str = "",
        status: int = 0,
        version: str = "HTTP/1.1",
        keep_alive: bool = True,
        upgrade: bool = False,
    ) -> None:
        self.raw = raw
        self.method, self.target, self.status, self.version = method, target, status, version
        self.keep_alive = keep_alive
        # A request asking for an upgrade, or a 101 answer.
        self.upgrade = upgrade
        self._headers: list[tuple[str, str]] | None = None
        self._all: dict[str, str] | None = None
        self.hop_by_hop = False
        self.content_length = -1
        self.chunked = False
        self.content_type = ""
        for name, value in _NOTABLE.findall(raw.lower()):
            if name in _HOP_NAMES:
                self.hop_by_hop = True
            elif name == b"content-length":
                self.content_length = int(value)  # llhttp has checked it: digits, only once
            elif name == b"transfer-encoding":
                # The last coding decides (RFC 9112 6.3); llhttp refuses a request otherwise.
                self.chunked = value.rsplit(b",", 1)[-1].strip() == b"chunked"
            else:
                self.content_type = value.split(b";", 1)[0].strip().decode("latin-1")

    @classmethod
    def build(cls, start_line: str, headers: list[tuple[str, str]], *, method: str = "",
              target: str = "", keep_alive: bool = True) -> Head:
        """A request head made here (a hook's rewrite), not received."""
        head = cls(encode_head(start_line, headers), method=method, target=target,
                   keep_alive=keep_alive)
        head._headers = headers
        return head

    def __repr__(self) -> str:
        return f"Head({self.start_line!r})"

    @property
    def start_line(self) -> str:
        return self.raw[:self.raw.find(b"\r\n")].decode("latin-1")

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            # llhttp has validated every line: a name, a colon, a value without folding.
            lines = self.raw.decode("latin-1").split("\r\n")[1:-2]
            self._headers = [(key, value.strip(" \t"))
                             for key, _, value in (line.partition(":") for line in lines)]
        return self._headers

    def get(self, name: str, default: str | None = None) -> str | None:
        """A field's value, repeated fields joined with commas (RFC 9110 5.3)."""
        if self._all is None:
            joined: dict[str, str] = {}
            for key, value in self.headers:
                key = key.lower()
                joined[key] = f"{joined[key]}, {value}" if key in joined else value
            self._all = joined
        return self._all.get(name.lower(), default)

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every ``name`` header, lower-cased."""
        value = self.get(name)
        if not value:
            return set()
        return {token.strip().lower() for token in value.split(",") if token.strip()}

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def upgrade_requested(self) -> bool:
        return self.upgrade and self.status == 0

    def end_to_end_headers(self, *, keep_upgrade: bool = False) -> list[tuple[str, str]]:
        """Headers without the hop-by-hop ones (and without those the Connection header names).

        ``keep_upgrade`` keeps ``Connection: Upgrade`` and ``Upgrade``: the upstream must see an
        upgrade request to hijack the connection.
        """
        if not self.hop_by_hop:
            return list(self.headers)
        dropped = HOP_BY_HOP | self.tokens("connection")
        if keep_upgrade:
            dropped = dropped - {"upgrade"}
        kept = [(k, v) for k, v in self.headers if k.lower() not in dropped]
        if keep_upgrade:
            kept.append(("Connection", "Upgrade"))
        return kept

    def relay_bytes(self, *, keep_upgrade: bool = False, close: bool = False) -> bytes:
        """This head for the next hop: end-to-end headers only, ``Connection: close`` when
        ``close``, a request line in HTTP/1.1. The bytes as received when that changes nothing.
        """
        if not self.hop_by_hop and not close and not keep_upgrade \
                and self.version == "HTTP/1.1":
            return self.raw
        headers = self.end_to_end_headers(keep_upgrade=keep_upgrade)
        if close:
            headers.append(("Connection", "close"))
        start_line = f"{self.method} {self.target} HTTP/1.1" if self.method else self.start_line
        return encode_head(start_line, headers)

    def request_framing(self) -> tuple[Framing, int]:
        """How a request's body is delimited, and its length when known."""
        if self.chunked:
            return Framing.CHUNKED, -1
        if self.content_length > 0:
            return Framing.LENGTH, self.content_length
        return Framing.NONE, 0

    def response_framing(self, request_method: str) -> tuple[Framing, int]:
        """How an answer's body is delimited (RFC 9112 6.3)."""
        status = self.status
        if request_method == "HEAD" or status < 200 or status in (204, 304):
            return Framing.NONE, 0
        if self.chunked:
            return Framing.CHUNKED, -1
        if self.content_length > 0:
            return Framing.LENGTH, self.content_length
        if self.content_length == 0:
            return Framing.NONE, 0
        return Framing.UNTIL_CLOSE, -1


def encode_head(start_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start_line, *(f"{key}: {value}" for key, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def find_head_end(buffer: bytes | bytearray, *, upstream: bool = False) -> int:
    """Index just past the head's blank line, or -1 while the head is still incomplete.

    A head that grows past ``MAX_HEAD_BYTES`` without ending is refused.
    """
    end = buffer.find(HEAD_END, 0, MAX_HEAD_BYTES + len(HEAD_END))
    if end >= 0:
        return end + len(HEAD_END)
    if len(buffer) > MAX_HEAD_BYTES:
        message = f"message head larger than {MAX_HEAD_BYTES} bytes"
        raise UpstreamError(f"malformed response from dockerd: {message}") if upstream \
            else BadRequest(message)
    return -1


class MessageParser:
    """One direction of one connection, on one llhttp parser reused for every message.

    ``parse_head`` takes a complete head; then ``take`` (or ``take_answer``) is offered the
    bytes that follow and says how many belong to the body, until ``done``. The parser is fed
    exactly the bytes of each message, so it is ready for the next head when a body ends. With
    ``collect`` the decoded body is kept in ``payload`` (a hooked request or answer), up to
    ``limit`` bytes.
    """

    def __init__(self, *, answers: bool, collect: bool = False, limit: int = 0) -> None:
        self._answers = answers
        self._error: ErrorType = UpstreamError if answers else BadRequest
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._collect = collect
        if collect:
            # Only a collecting parser has on_body: llhttp would copy every relayed byte for it.
            self.on_body: Callable[[bytes], None] = self._keep
        self._parser = self._new_parser()
        self._url = b""
        self._in_head = False
        self._keep_alive = True
        self._complete = False
        self._begun = 0
        self._in_sync = True
        self.framing = Framing.NONE
        self.done = True
        self._left = 0
        self._chunked: ChunkedBody | None = None

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        if self._answers:
            return httptools.HttpResponseParser(self)
        return httptools.HttpRequestParser(self)

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self._begun += 1
        self._complete = False
        self._in_head = True
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url  # a target split across two feeds arrives in two pieces

    def on_headers_complete(self) -> None:
        self._in_head = False
        # Asked now: once a bodiless message is complete, llhttp has forgotten its fields.
        self._keep_alive = self._parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self._complete = True

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise RequestTooLarge(f"body larger than {self._limit} bytes")
        self._parts.append(data)

    # For the relay

    @property
    def payload(self) -> bytes:
        return b"".join(self._parts)

    def parse_head(self, raw: bytes) -> Head:
        """The head in ``raw`` (the bytes up to and including its blank line)."""
        if not self._in_sync:
            self._parser = self._new_parser()
            self._in_sync = True
        parser = self._parser
        upgrade = False
        try:
            parser.feed_data(raw)
        except httptools.HttpParserUpgrade:
            # The rest of the connection may be another protocol; llhttp has skipped any body.
            upgrade, self._in_sync = True, False
        except httptools.HttpParserError as exc:
            self._in_sync = False
            raise self._malformed(raw, exc) from None
        if self._in_head:
            raise self._error("malformed message head")
        keep_alive = self._keep_alive
        if self._answers:
            assert isinstance(parser, httptools.HttpResponseParser)
            status = parser.get_status_code()
            version = "HTTP/1.0" if raw.startswith(b"HTTP/1.0 ") else "HTTP/1.1"
            if not raw.startswith(b"HTTP/1."):
                raise UpstreamError(f"malformed status line from dockerd: {_first_line(raw)!r}")
            return Head(raw, status=status, version=version, keep_alive=keep_alive,
                        upgrade=upgrade)
        assert isinstance(parser, httptools.HttpRequestParser)
        method_bytes = parser.get_method()
        method = _METHODS.get(method_bytes) or method_bytes.decode("latin-1")
        url = self._url
        # llhttp takes more than RFC 9112 3 does: "GET  /x", absolute targets, HTTP/2.0.
        after_url = len(method_bytes) + 1 + len(url)
        if raw[len(method_bytes) + 1:len(method_bytes) + 2] != b"/":
            self._in_sync = False
            raise BadRequest(f"request target must be a path, got {_first_line(raw)!r}")
        if not raw.startswith(b" HTTP/1.", after_url):
            self._in_sync = False
            raise BadRequest(f"malformed request line {_first_line(raw)!r}")
        version = "HTTP/1.0" if raw[after_url + 8:after_url + 9] == b"0" else "HTTP/1.1"
        return Head(raw, method=method, target=url.decode("latin-1"), version=version,
                    keep_alive=keep_alive, upgrade=upgrade)

    def _malformed(self, raw: bytes, exc: httptools.HttpParserError) -> Exception:
        reason = str(exc) or type(exc).__name__
        if self._answers:
            return UpstreamError(f"malformed response from dockerd: {reason} "
                                 f"(status line {_first_line(raw)!r})")
        for line in raw.split(b"\r\n")[1:-2]:
            if _FIELD_LINE.fullmatch(line) is None:
                return BadRequest(f"malformed header line {line[:80].decode('latin-1')!r}: "
                                  f"{reason}")
        return BadRequest(f"malformed request: {reason} (request line {_first_line(raw)!r})")

    def begin_body(self, framing: Framing, length: int = 0) -> None:
        """The body of the head just parsed is delimited by ``framing``."""
        self.framing = framing
        self.done = framing is Framing.NONE
        self._left = length
        self._parts = []
        self._size = 0
        if self._limit and framing is Framing.LENGTH and length > self._limit:
            raise RequestTooLarge(f"body larger than {self._limit} bytes")
        if framing is Framing.CHUNKED and not self._answers:
            self._chunked = ChunkedBody()
        elif framing is Framing.UNTIL_CLOSE or (framing is Framing.NONE and not self._complete):
            # An answer to HEAD, or a stream until close: llhttp's idea of the body differs.
            self._in_sync = False

    def take(self, data: bytes | bytearray) -> int:
        """How many bytes at the start of ``data`` belong to the body; ``done`` on its last."""
        if self.done:
            return 0
        framing = self.framing
        if framing is Framing.LENGTH:
            used = min(self._left, len(data))
            piece = data if used == len(data) else memoryview(data)[:used]
            if self._collect and not self._in_sync:
                self._keep(bytes(piece))  # llhttp skipped it (an upgrade request's body)
            self._feed(piece)
            self._left -= used
            self.done = self._left == 0
            return used
        if framing is Framing.UNTIL_CLOSE:
            if self._collect:
                self._keep(bytes(data))
            return len(data)
        if self._chunked is not None:
            used = self._chunked.take(data)
            self._feed(data if used == len(data) else memoryview(data)[:used])
            self.done = self._chunked.done
            if self.done:
                self._chunked = None
            return used
        return self.take_answer(data)

    def take_answer(self, data: bytes | bytearray) -> int:
        """``take`` for an answer: dockerd sends nothing more until the next request, so the
        whole read is the body's and llhttp finds its end, chunked framing included."""
        begun = self._begun
        self._feed(data)
        if self._begun != begun:
            raise UpstreamError("dockerd sent more than one answer to one request")
        self.done = self._complete
        return len(data)

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        if not self._in_sync:
            # After an upgrade request llhttp has skipped the body (exec start carries JSON):
            # it is framed here alone, and llhttp starts afresh at the next head.
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._in_sync = False
            if isinstance(exc.__context__, RequestTooLarge):
                raise exc.__context__ from None
            raise self._error(f"malformed message body: {exc}") from None
        except httptools.HttpParserError as exc:
            self._in_sync = False
            raise self._error(f"malformed message body: {exc}") from None

    def forget_message(self) -> None:
        """Another parser reads the rest of this message (a hooked one): start afresh at the
        next head."""
        self.done, self._in_sync, self._chunked = True, False, None

    def end_of_stream(self) -> None:
        """The stream ended: fine for an until-close body, a truncated body otherwise."""
        if self.framing is Framing.UNTIL_CLOSE:
            self.done = True
        elif not self.done:
            raise self._error("connection closed in the middle of a message body")


class _Chunk(enum.Enum):
    SIZE_LINE = "size line"
    DATA = "data"
    DATA_END = "data end"
    TRAILER = "trailer"


class ChunkedBody:
    """Where a chunked request body ends in a stream that arrives in pieces.

    ``take(data)`` answers how many bytes at the start of ``data`` belong to the body; the rest
    is the next request. An incomplete chunk-size line is taken too and finished on the next
    piece. llhttp, fed the same bytes, validates them and decodes what hooks read.
    """

    __slots__ = ("_left", "_line", "_state", "done")

    def __init__(self) -> None:
        self.done = False
        self._state = _Chunk.SIZE_LINE
        self._left = 0
        self._line = b""

    def take(self, data: bytes | bytearray) -> int:
        used, size = 0, len(data)
        while used < size and not self.done:
            state = self._state
            if state is _Chunk.DATA or state is _Chunk.DATA_END:
                step = min(self._left, size - used)
                used += step
                self._left -= step
                if self._left == 0:
                    if state is _Chunk.DATA:
                        self._state, self._left = _Chunk.DATA_END, 2  # the CRLF after the data
                    else:
                        self._state = _Chunk.SIZE_LINE
                continue
            end = data.find(b"\n", used, used + MAX_CHUNK_LINE + 2)
            if end < 0:
                if size - used + len(self._line) > MAX_CHUNK_LINE:
                    raise BadRequest("chunk-size or trailer line too long")
                self._line += bytes(data[used:])
                return size
            line = self._line + bytes(data[used:end + 1])
            self._line = b""
            used = end + 1
            if len(line) > MAX_CHUNK_LINE + 2:
                raise BadRequest("chunk-size or trailer line too long")
            line = line.rstrip(b"\r\n")
            if state is _Chunk.TRAILER:
                self.done = line == b""
                continue
            chunk_size = _chunk_size(line)
            if chunk_size == 0:
                self._state = _Chunk.TRAILER
            else:
                self._state, self._left = _Chunk.DATA, chunk_size
        return used


def _chunk_size(line: bytes) -> int:
    size_text = line.split(b";", 1)[0].strip()
    # int(..., 16) alone would also take "-1", "+a" and "1_0".
    if not size_text or size_text.strip(HEX_DIGITS) or len(size_text) > 16:
        raise BadRequest(f"malformed chunk size line {line[:40]!r}")
    return int(size_text, 16)


def _first_line(raw: bytes) -> str:
    line_end = raw.find(b"\r\n")
    return raw[:line_end if line_end >= 0 else len(raw)][:80].decode("latin-1")
