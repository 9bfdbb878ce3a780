"""HTTP/1.1 on asyncio streams, exactly as much as a transparent Docker proxy needs.

Message heads are parsed into ``Head``; bodies are never decoded unless asked for: ``relay_body``
copies a body with its framing (Content-Length, chunked or until-close) byte for byte, so a
chunked upload stays chunked and nothing is held in memory beyond one read. ``read_body`` decodes
a body into bytes, with a size cap, for the few requests whose JSON hooks must see.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from adapter.errors import BadRequest, RequestTooLarge, UpstreamError

MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 256 * 1024

# Hop-by-hop headers (RFC 9110 7.6.1) concern one connection only; a proxy drops them.
# Transfer-Encoding is kept: bodies are relayed with their framing unchanged.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "upgrade",
})


class Framing(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


@dataclass(slots=True)
class Head:
    """A request line (``method``, ``target``) or status line (``status``, ``reason``) + headers."""

    start_line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    method: str = ""
    target: str = ""
    status: int = 0
    reason: str = ""
    version: str = "HTTP/1.1"

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every ``name`` header, lower-cased."""
        name = name.lower()
        return {
            token.strip().lower()
            for key, value in self.headers if key.lower() == name
            for token in value.split(",") if token.strip()
        }

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def upgrade_requested(self) -> bool:
        return "upgrade" in self.tokens("connection") and self.get("upgrade") is not None

    @property
    def keep_alive(self) -> bool:
        connection = self.tokens("connection")
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


def encode_head(start_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start_line, *(f"{key}: {value}" for key, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def _read_head_bytes(reader: asyncio.StreamReader) -> bytes | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise BadRequest("connection closed in the middle of a message head") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(f"message head larger than {MAX_HEAD_BYTES} bytes") from None
    return raw


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            raise BadRequest(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return headers


async def read_request_head(reader: asyncio.StreamReader) -> Head | None:
    """The next request head, or None when the client closed between requests."""
    raw = await _read_head_bytes(reader)
    if raw is None:
        return None
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable request head") from None
    lines = text.split("\r\n")[:-2]
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {lines[0][:80] if lines else ''!r}")
    method, target, version = parts
    if not target.startswith("/"):
        raise BadRequest(f"request target must be a path, got {target[:80]!r}")
    return Head(lines[0], _parse_headers(lines[1:]), method=method.upper(), target=target,
                version=version)


async def read_response_head(reader: asyncio.StreamReader) -> Head:
    """The upstream's next response head (an interim 1xx one included)."""
    try:
        raw = await _read_head_bytes(reader)
    except BadRequest as exc:
        raise UpstreamError(f"malformed response from dockerd: {exc}") from None
    if raw is None:
        raise UpstreamError("dockerd closed the connection without answering")
    lines = raw.decode("latin-1").split("\r\n")[:-2]
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"malformed status line from dockerd: {lines[0][:80]!r}")
    status = int(parts[1])
    try:
        headers = _parse_headers(lines[1:])
    except BadRequest as exc:
        raise UpstreamError(f"malformed response from dockerd: {exc}") from None
    return Head(lines[0], headers, status=status,
                reason=parts[2] if len(parts) > 2 else "", version=parts[0])


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


async def relay_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    framing: Framing,
    length: int,
) -> None:
    """Copy one body from ``reader`` to ``writer`` unchanged, a read at a time."""
    if framing is Framing.LENGTH:
        remaining = length
        while remaining:
            chunk = await reader.read(min(remaining, READ_SIZE))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(chunk)
            writer.write(chunk)
            await writer.drain()
    elif framing is Framing.CHUNKED:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = _chunk_size(size_line)
            if size == 0:
                # Trailer section: header lines up to an empty line.
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    writer.write(line)
                writer.write(b"\r\n")
                await writer.drain()
                return
            await relay_body(reader, writer, Framing.LENGTH, size + 2)
    elif framing is Framing.UNTIL_CLOSE:
        while chunk := await reader.read(READ_SIZE):
            writer.write(chunk)
            await writer.drain()


async def read_body(
    reader: asyncio.StreamReader, framing: Framing, length: int, limit: int
) -> bytes:
    """Decode one body into bytes; more than ``limit`` bytes raises ``RequestTooLarge``."""
    if framing is Framing.NONE:
        return b""
    if framing is Framing.LENGTH:
        if length > limit:
            raise RequestTooLarge(f"body larger than {limit} bytes")
        return await reader.readexactly(length)
    parts: list[bytes] = []
    total = 0
    if framing is Framing.UNTIL_CLOSE:
        while chunk := await reader.read(READ_SIZE):
            total += len(chunk)
            if total > limit:
                raise RequestTooLarge(f"body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)
    while size := _chunk_size(await reader.readuntil(b"\r\n")):
        total += size
        if total > limit:
            raise RequestTooLarge(f"body larger than {limit} bytes")
        parts.append((await reader.readexactly(size + 2))[:-2])
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass
    return b"".join(parts)


def _chunk_size(line: bytes) -> int:
    size_text = line.split(b";", 1)[0].strip()
    try:
        return int(size_text, 16)
    except ValueError:
        raise BadRequest(f"malformed chunk size line {line[:40]!r}") from None
