"""Connections to dockerd: opened on demand, kept alive between requests and between clients.

The docker CLI opens a new connection for nearly every command, and opening one to dockerd is a
task and a trip round the event loop before the first byte can go. So a client connection that
ends while its dockerd connection sits idle and reusable gives that connection back here, and
the next client's first request goes out on it at once, from the socket callback. An idle
connection that dockerd closes, or that speaks out of turn, leaves the pool.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from adapter.errors import ConfigError, UpstreamError
from adapter.proxy.connection import ConnectionSide, SideCallback
from adapter.proxy.http1 import MessageParser

# Idle connections kept; dockerd serves each on a goroutine, so a few cost it next to nothing.
MAX_IDLE = 16


class UpstreamSide(ConnectionSide):
    """A connection to dockerd, with the parser of the answers that come back on it."""

    def __init__(self, *, on_data: SideCallback, on_eof: SideCallback,
                 on_lost: SideCallback) -> None:
        super().__init__("dockerd", on_data=on_data, on_eof=on_eof, on_lost=on_lost)
        self.answers = MessageParser(answers=True)

    @property
    def reusable(self) -> bool:
        """Open both ways, nothing unread, and between two answers."""
        transport = self.transport
        return (not self.at_eof and not self.buffer and self.answers.done
                and transport is not None and not transport.is_closing())


class UpstreamPool:
    """Opens connections to the Docker daemon at ``docker_url`` and keeps idle ones."""

    def __init__(self, docker_url: str, *, max_idle: int = MAX_IDLE) -> None:
        self.docker_url = docker_url
        self._max_idle = max_idle
        self._idle: list[UpstreamSide] = []
        parsed = urlsplit(docker_url)
        if parsed.scheme == "unix" and parsed.path:
            self._path: str | None = parsed.path
            self._address: tuple[str, int] | None = None
        elif parsed.scheme in ("tcp", "http") and parsed.hostname and parsed.port:
            self._path, self._address = None, (parsed.hostname, parsed.port)
        else:
            raise ConfigError(f"--docker: expected unix:///PATH or tcp://HOST:PORT, "
                              f"got {docker_url!r}")

    @property
    def upstream_name(self) -> str:
        return self._path or self.docker_url

    def take_idle(self) -> UpstreamSide | None:
        """The most recently used idle connection still fit for a request, if any."""
        while self._idle:
            side = self._idle.pop()
            if side.reusable:
                return side
            side.close()
        return None

    async def connect(self, side: UpstreamSide) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._path is not None:
                await loop.create_unix_connection(lambda: side, self._path)
            else:
                assert self._address is not None
                await loop.create_connection(lambda: side, *self._address)
        except OSError as exc:
            raise UpstreamError(
                f"cannot reach dockerd at {self.upstream_name}: {exc.strerror or exc}"
            ) from None

    def give_back(self, side: UpstreamSide) -> None:
        """Keep ``side`` for another client if it is fit for reuse; close it otherwise."""
        if not side.reusable or len(self._idle) >= self._max_idle:
            side.close()
            return
        side.unlink()
        side.bind(on_data=self._spoke_while_idle, on_eof=self._closed_while_idle,
                  on_lost=self._closed_while_idle)
        self._idle.append(side)

    def _spoke_while_idle(self, side: ConnectionSide) -> None:
        # dockerd never speaks between exchanges; a connection that does is not trusted.
        self._discard(side)

    def _closed_while_idle(self, side: ConnectionSide) -> None:
        self._discard(side)

    def _discard(self, side: ConnectionSide) -> None:
        if side in self._idle:
            self._idle.remove(side)
        side.close()

    def close(self) -> None:
        for side in self._idle:
            side.abort()
        self._idle.clear()
