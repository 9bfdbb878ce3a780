"""What the proxy tells whoever watches it: each answer and each hook call, nothing else.

The proxy knows no metrics library and no network code; ``serve`` hands it an observer (the
metrics module's) or none. Calls happen on the event loop, once per request, and must be cheap.
"""

from __future__ import annotations

from typing import Protocol

# Route classes: a small fixed set, so that a metric labelled by route stays small whatever
# paths clients send.
PING = "ping"
CONTAINERS_CREATE = "containers_create"
CONTAINERS_OTHER = "containers_other"
EXEC = "exec"
IMAGES = "images"
HIJACKED = "hijacked"  # attach, exec start, run -it: the answer turned into a raw stream
OTHER = "other"
ROUTE_CLASSES = (PING, CONTAINERS_CREATE, CONTAINERS_OTHER, EXEC, IMAGES, HIJACKED, OTHER)

PRE, POST = "pre", "post"


class ProxyObserver(Protocol):
    def answered(self, route: str, status: int, seconds: float) -> None:
        """A request was answered: ``status``, ``seconds`` from its head to the answer's head
        (a stream's length is its own business), ``route`` one of ``ROUTE_CLASSES``."""

    def hook_finished(self, hook: str, phase: str, seconds: float, failure: str | None) -> None:
        """A hook ran (``phase`` pre or post); ``failure`` is the error's reason, if it failed."""


def route_class(method: str, path: str) -> str:
    """The class of ``method path`` (path without query), with or without an API version."""
    if path.startswith("/v") and path[2:3].isdigit():
        slash = path.find("/", 2)
        path = path[slash:] if slash > 0 else "/"
    if path.startswith("/containers/"):
        if path == "/containers/create" and method == "POST":
            return CONTAINERS_CREATE
        return CONTAINERS_OTHER
    if path == "/_ping":
        return PING
    if path.startswith("/exec/"):
        return EXEC
    if path.startswith(("/images/", "/build", "/commit")):
        return IMAGES
    return OTHER
