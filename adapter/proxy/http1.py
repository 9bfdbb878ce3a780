"""HTTP/1.1 message syntax, exactly as much as a transparent Docker proxy needs.

Everything here is synchronous and works on bytes as they arrive: ``find_head_end`` locates a
complete message head, ``parse_request_head``/``parse_response_head`` turn it into a ``Head``, and a
``BodyFramer`` tells, piece by piece, which bytes of a stream still belong to the current body
(Content-Length, chunked or until-close). The relay forwards those bytes untouched, so a chunked
upload stays chunked; the few bodies hooks must read are decoded by the same framer.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

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
# RFC 9110 5.1/5.5: a field name is a token; the value is trimmed of surrounding blanks.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_LINE = re.compile(rf"({_TOKEN}):[ \t]*([^\r\n]*?)[ \t]*\r\n")
_HEADER_BLOCK = re.compile(rf"(?:{_TOKEN}:[^\r\n]*\r\n)*\r\n")
# The fields a relay decides on; everything hop-by-hop is among them.
SCANNED_FIELDS = HOP_BY_HOP | {"content-length", "transfer-encoding"}
# Run over the lower-cased block: a case-insensitive alternation is several times slower.
_SCANNED = re.compile(
    "\r\n(" + "|".join(re.escape(name) for name in sorted(SCANNED_FIELDS, key=len, reverse=True))
    + ")[ \t]*:[ \t]*([^\r\n]*)")
_BYTES_TOKEN = _TOKEN.encode()
_HOP_NAMES = "|".join(sorted(HOP_BY_HOP, key=len, reverse=True)).encode()
# A request or answer that can be relayed as it is: HTTP/1.1, well-formed fields, none of them
# hop-by-hop, at most one framing field. One C-level match reads all a relay needs from it
# (each field is checked to be none of the excluded names first).
_OTHER_FIELD = (rb"(?!(?i:" + _HOP_NAMES + rb"|content-length|transfer-encoding)[ \t]*:)"
                + _BYTES_TOKEN + rb":[^\r\n]*\r\n")
_LENGTH_FIELD = rb"(?i:content-length)[ \t]*:[ \t]*([0-9]{1,18})[ \t]*\r\n"
_CHUNKED_FIELD = rb"(?i:transfer-encoding)[ \t]*:[ \t]*(?i:(chunked))[ \t]*\r\n"
_PLAIN_REQUEST = re.compile(
    rb"([A-Z]+) (/[^ \x00-\x1f\x7f]*) HTTP/1\.1\r\n"
    rb"(?:" + _OTHER_FIELD + rb")*(?:" + _LENGTH_FIELD + rb"(?:" + _OTHER_FIELD + rb")*)?\r\n")
# An answer is not plain when it is a Docker raw stream: that needs the hijack handling.
_OTHER_ANSWER_FIELD = (rb"(?!(?i:content-type)[ \t]*:[ \t]*(?i:application/vnd\.docker\.))"
                       + _OTHER_FIELD)
_PLAIN_RESPONSE = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9]) [^\r\n]*\r\n"
    rb"(?:" + _OTHER_ANSWER_FIELD + rb")*"
    rb"(?:(?:" + _LENGTH_FIELD + rb"|" + _CHUNKED_FIELD + rb")(?:" + _OTHER_ANSWER_FIELD + rb")*)?"
    rb"\r\n")


class Framing(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


class Head:
    """A request line (``method``, ``target``) or status line (``status``, ``reason``) + headers.

    ``raw`` is the head exactly as received; ``relay_bytes`` sends it on unchanged when nothing
    in it has to change. Relaying a small call must cost little, so a parsed head reads only the
    fields that decide framing and hop-by-hop handling (``SCANNED_FIELDS``, values lower-cased,
    in ``fields``) until something asks for another header or the whole list.
    """

    __slots__ = ("_all", "_block", "_headers", "_malformed", "fields", "method", "raw",
                 "reason", "start_line", "status", "target", "version")

    def __init__(
        self,
        start_line: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        method: str = "",
        target: str = "",
        status: int = 0,
        reason: str = "",
        version: str = "HTTP/1.1",
        raw: bytes = b"",
        block: str | None = None,
        malformed: type[BadRequest] | type[UpstreamError] = BadRequest,
        fields: dict[str, str] | None = None,
    ) -> None:
        self.start_line = start_line
        self.method, self.target, self.version = method, target, version
        self.status, self.reason = status, reason
        self.raw = raw
        self._headers = headers
        self._block = block
        self._malformed = malformed
        self._all: dict[str, str] | None = None
        if fields is not None:
            self.fields = fields
        elif headers is None:
            self.fields = _joined((key, value.rstrip(" \t"))
                                  for key, value in _SCANNED.findall(self._text_block.lower()))
        else:
            self.fields = _joined((key.lower(), value.lower()) for key, value in headers
                                  if key.lower() in SCANNED_FIELDS)

    @property
    def _text_block(self) -> str:
        if self._block is None:
            self._block = _split_head(self.raw)[1] if self.raw else "\r\n\r\n"
        return self._block

    def __repr__(self) -> str:
        return f"Head({self.start_line!r})"

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._headers = _parse_headers(self._text_block, self._malformed)
        return self._headers

    def get(self, name: str, default: str | None = None) -> str | None:
        """A field's value, repeated fields joined with commas (RFC 9110 5.3)."""
        name = name.lower()
        if name in SCANNED_FIELDS:
            return self.fields.get(name, default)
        if self._all is None:
            self._all = _joined((key.lower(), value) for key, value in self.headers)
        return self._all.get(name, default)

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every ``name`` header, lower-cased."""
        value = self.get(name)
        if not value:
            return set()
        return {token.strip().lower() for token in value.split(",") if token.strip()}

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def upgrade_requested(self) -> bool:
        return "connection" in self.fields and "upgrade" in self.fields \
            and "upgrade" in self.tokens("connection")

    @property
    def keep_alive(self) -> bool:
        connection = self.tokens("connection") if "connection" in self.fields else set()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    def end_to_end_headers(self, *, keep_upgrade: bool = False) -> list[tuple[str, str]]:
        """Headers without the hop-by-hop ones (and without those the Connection header names).

        ``keep_upgrade`` keeps ``Connection: Upgrade`` and ``Upgrade``: the upstream must see an
        upgrade request to hijack the connection.
        """
        dropped = HOP_BY_HOP | self.tokens("connection")
        if keep_upgrade:
            dropped = dropped - {"upgrade"}
        kept = [(k, v) for k, v in self.headers if k.lower() not in dropped]
        if keep_upgrade:
            kept.append(("Connection", "Upgrade"))
        return kept

    def relay_bytes(self, start_line: str, *, keep_upgrade: bool = False,
                    close: bool = False) -> bytes:
        """This head for the next hop: ``start_line``, end-to-end headers, ``Connection: close``
        when ``close``. The bytes as received when that changes nothing."""
        if (self.raw and not keep_upgrade and not close and start_line == self.start_line
                and not HOP_BY_HOP & self.fields.keys()):
            return self.raw
        headers = self.end_to_end_headers(keep_upgrade=keep_upgrade)
        if close:
            headers.append(("Connection", "close"))
        return encode_head(start_line, headers)


def _joined(fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for key, value in fields:
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


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


def _split_head(raw: bytes | bytearray) -> tuple[str, str]:
    """(start line, the rest from the CRLF ending it) of a complete head."""
    text = bytes(raw).decode("latin-1")
    line_end = text.find("\r\n")
    return text[:line_end], text[line_end:]


def _valid_block(block: str) -> bool:
    return _HEADER_BLOCK.fullmatch(block, 2) is not None


def _parse_headers(
    block: str, malformed: type[BadRequest] | type[UpstreamError] = BadRequest
) -> list[tuple[str, str]]:
    # Regex passes run in C; a loop in Python costs more than relaying a small call.
    if not _valid_block(block):
        for line in block.split("\r\n")[1:-2]:
            if _HEADER_LINE.fullmatch(line + "\r\n") is None:
                raise malformed(f"malformed header line {line[:80]!r}")
        raise malformed("malformed header section")
    return _HEADER_LINE.findall(block, 2)


def parse_request_head(raw: bytes | bytearray) -> Head:
    """A client's request head (the bytes up to and including the blank line)."""
    start_line, block = _split_head(raw)
    parts = start_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {start_line[:80]!r}")
    method, target, version = parts
    if not target.startswith("/"):
        raise BadRequest(f"request target must be a path, got {target[:80]!r}")
    if not _valid_block(block):
        _parse_headers(block)  # names the bad line
    return Head(start_line, method=method.upper(), target=target, version=version,
                raw=bytes(raw), block=block)


def parse_response_head(raw: bytes | bytearray) -> Head:
    """dockerd's response head (an interim 1xx one included)."""
    start_line, block = _split_head(raw)
    parts = start_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"malformed status line from dockerd: {start_line[:80]!r}")
    if not _valid_block(block):
        try:
            _parse_headers(block)
        except BadRequest as exc:
            raise UpstreamError(f"malformed response from dockerd: {exc}") from None
    return Head(start_line, status=int(parts[1]), reason=parts[2] if len(parts) > 2 else "",
                version=parts[0], raw=bytes(raw), block=block, malformed=UpstreamError)


@dataclass(frozen=True, slots=True)
class PlainMessage:
    """What the relay needs from a head that goes on unchanged (see ``plain_request``)."""

    head: Head
    framing: Framing
    length: int


def plain_request(buffer: bytes | bytearray, end: int) -> PlainMessage | None:
    """The request whose head ends at ``end``, when that head can go upstream unchanged.

    That is HTTP/1.1, fields well formed, none hop-by-hop, no body or a Content-Length one.
    Anything else (None) takes the full parse. This runs between every call and dockerd, and
    Python code run right after a wake-up is slow: one regex match does all the work.
    """
    match = _PLAIN_REQUEST.fullmatch(buffer, 0, end)
    if match is None:
        return None
    method, target, length = match[1].decode(), match[2].decode("latin-1"), match[3]
    start_line = f"{method} {target} HTTP/1.1"
    fields = {"content-length": length.decode()} if length is not None else {}
    head = Head(start_line, method=method, target=target, raw=bytes(buffer[:end]),
                fields=fields)
    size = int(length) if length else 0
    return PlainMessage(head, Framing.LENGTH if size else Framing.NONE, size)


def plain_response(
    buffer: bytes | bytearray, end: int, request_method: str
) -> PlainMessage | None:
    """Likewise for dockerd's final answer (2xx-5xx, not a Docker raw stream)."""
    match = _PLAIN_RESPONSE.fullmatch(buffer, 0, end)
    if match is None:
        return None
    status, length, chunked = int(match[1]), match[2], match[3]
    fields = ({"content-length": length.decode()} if length is not None
              else {"transfer-encoding": "chunked"} if chunked is not None else {})
    raw = bytes(buffer[:end])
    head = Head(raw[:raw.find(b"\r\n")].decode("latin-1"), status=status, raw=raw,
                fields=fields, malformed=UpstreamError)
    if request_method == "HEAD" or status in (204, 304):
        return PlainMessage(head, Framing.NONE, 0)
    if chunked is not None:
        return PlainMessage(head, Framing.CHUNKED, -1)
    if length is None:
        return PlainMessage(head, Framing.UNTIL_CLOSE, -1)
    size = int(length)
    return PlainMessage(head, Framing.LENGTH if size else Framing.NONE, size)


def request_framing(head: Head) -> tuple[Framing, int]:
    """How the request body is delimited, and its length when known."""
    if "chunked" in head.tokens("transfer-encoding"):
        return Framing.CHUNKED, -1
    return _length_framing(head, BadRequest, otherwise=Framing.NONE)


def response_framing(head: Head, request_method: str) -> tuple[Framing, int]:
    """How the response body is delimited (RFC 9112 6.3)."""
    if request_method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return Framing.NONE, 0
    if "chunked" in head.tokens("transfer-encoding"):
        return Framing.CHUNKED, -1
    return _length_framing(head, UpstreamError, otherwise=Framing.UNTIL_CLOSE)


def _length_framing(
    head: Head, error: type[BadRequest] | type[UpstreamError], otherwise: Framing
) -> tuple[Framing, int]:
    value = head.get("content-length")
    if value is None:
        return otherwise, -1
    if not value.isdigit():
        raise error(f"invalid Content-Length {value[:40]!r}")
    length = int(value)
    return (Framing.LENGTH, length) if length else (Framing.NONE, 0)


class _Chunk(enum.Enum):
    SIZE_LINE = "size line"
    DATA = "data"
    DATA_END = "data end"
    TRAILER = "trailer"


class BodyFramer:
    """Where one body ends in a stream that arrives in pieces.

    ``take(data)`` answers how many bytes at the start of ``data`` belong to the body; the rest
    is the next message (or, for an incomplete chunk-size line, bytes to offer again with more
    appended). With ``limit`` set, the decoded body is kept in ``payload`` (chunked framing
    removed) and a body larger than ``limit`` raises ``RequestTooLarge``. ``done`` turns true on
    the body's last byte; an until-close body is done at ``end_of_stream``.
    """

    def __init__(self, framing: Framing, length: int = -1, *, limit: int | None = None) -> None:
        self.framing = framing
        self.done = framing is Framing.NONE
        self._left = length if framing is Framing.LENGTH else 0
        self._chunk = _Chunk.SIZE_LINE
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        if limit is not None and framing is Framing.LENGTH and length > limit:
            raise RequestTooLarge(f"body larger than {limit} bytes")

    @property
    def payload(self) -> bytes:
        return b"".join(self._parts)

    def take(self, data: bytes | bytearray | memoryview) -> int:
        if self.done:
            return 0
        if self.framing is Framing.UNTIL_CLOSE:
            self._keep(data)
            return len(data)
        if self.framing is Framing.LENGTH:
            used = min(self._left, len(data))
            self._keep(data[:used] if used < len(data) else data)
            self._left -= used
            self.done = self._left == 0
            return used
        return self._take_chunked(data)

    def end_of_stream(self) -> None:
        """The stream ended: fine for an until-close body, a truncated body otherwise."""
        if self.framing is Framing.UNTIL_CLOSE:
            self.done = True
        elif not self.done:
            raise BadRequest("connection closed in the middle of a message body")

    def _keep(self, data: bytes | bytearray | memoryview) -> None:
        if self._limit is None or not data:
            return
        self._size += len(data)
        if self._size > self._limit:
            raise RequestTooLarge(f"body larger than {self._limit} bytes")
        self._parts.append(bytes(data))

    def _take_chunked(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        used = 0
        while used < len(view) and not self.done:
            if self._chunk is _Chunk.DATA:
                step = min(self._left, len(view) - used)
                self._keep(view[used:used + step])
                self._left -= step
                used += step
                if self._left == 0:
                    self._chunk, self._left = _Chunk.DATA_END, 2
                continue
            if self._chunk is _Chunk.DATA_END:
                # The CRLF after a chunk's data, possibly split across pieces.
                step = min(self._left, len(view) - used)
                used += step
                self._left -= step
                if self._left == 0:
                    self._chunk = _Chunk.SIZE_LINE
                continue
            end = bytes(view[used:used + MAX_CHUNK_LINE + 2]).find(b"\r\n")
            if end < 0:
                if len(view) - used > MAX_CHUNK_LINE:
                    raise BadRequest("chunk-size or trailer line too long")
                break  # an incomplete line: offered again once more bytes arrive
            line = bytes(view[used:used + end])
            used += end + 2
            if self._chunk is _Chunk.TRAILER:
                self.done = line == b""
                continue
            size = _chunk_size(line)
            if size == 0:
                self._chunk = _Chunk.TRAILER
            else:
                self._chunk, self._left = _Chunk.DATA, size
        return used


def _chunk_size(line: bytes) -> int:
    size_text = line.split(b";", 1)[0].strip()
    # int(..., 16) alone would also take "-1", "+a" and "1_0".
    if not size_text or size_text.strip(HEX_DIGITS) or len(size_text) > 16:
        raise BadRequest(f"malformed chunk size line {line[:40]!r}")
    return int(size_text, 16)
