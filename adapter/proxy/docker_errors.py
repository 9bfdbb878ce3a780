"""Docker-shaped error responses: what a Docker client prints as "Error response from daemon"."""

from __future__ import annotations

import json
from http import HTTPStatus


def error_body(message: str) -> bytes:
    """The JSON body dockerd uses for errors: ``{"message": "..."}``."""
    return json.dumps({"message": message}).encode()


def error_response(status: int, message: str, *, close: bool = False) -> bytes:
    """A complete HTTP/1.1 error response carrying ``message`` the way dockerd would."""
    body = error_body(message)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode("latin-1") + body
