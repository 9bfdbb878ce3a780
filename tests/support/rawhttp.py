"""One HTTP/1.1 exchange over a unix socket, written and read byte for byte.

Hostile-input tests need requests no well-behaved client would send (a body that is not JSON, a
lying Content-Length, a broken chunk), so the request is built by hand and the answer parsed here,
without a client library that would refuse or repair them.
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: status, headers (lower-case names) and the body with chunked framing removed."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> str:
        """The ``message`` of a Docker-shaped error body, or "" when the body is not one."""
        try:
            document = json.loads(self.body)
        except ValueError:
            return ""
        return str(document.get("message", "")) if isinstance(document, dict) else ""


def encode_request(method: str, target: str, body: bytes | None = None, *,
                   content_type: str | None = "application/json", chunked: bool = False,
                   headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete request; ``chunked`` sends the body as two chunks instead of a Content-Length."""
    lines = [f"{method} {target} HTTP/1.1", "Host: docker", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in headers]
    payload = b""
    if body is not None and chunked:
        lines.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        payload = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                           for part in (body[:half], body[half:]) if part) + b"0\r\n\r\n"
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def exchange(sock_path: Path, data: bytes) -> Reply:
    """Send ``data`` and read the answer until the server closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(str(sock_path))
        # A server that refuses early may close before it has read everything: what it answered
        # is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(1 << 16):
                received += chunk
    return parse_reply(received)


def request(sock_path: Path, method: str, target: str, body: bytes | None = None,
            **kwargs: Any) -> Reply:
    return exchange(sock_path, encode_request(method, target, body, **kwargs))


def parse_reply(data: bytes) -> Reply:
    """The final answer in ``data``; status 0 when the connection closed without one."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return Reply(0, {}, data)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if 100 <= status < 200 and status != 101:
        return parse_reply(rest)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return Reply(status, headers, _dechunk(rest))
    if "content-length" in headers:
        rest = rest[: int(headers["content-length"])]
    return Reply(status, headers, rest)


def _dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2:]
    return body


def exchange_half_closed(sock_path: Path, data: bytes) -> Reply:
    """Send ``data``, close the sending side (the client has nothing more), read the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(str(sock_path))
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(1 << 16):
                received += chunk
    return parse_reply(received)
