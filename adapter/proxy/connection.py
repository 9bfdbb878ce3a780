"""One socket of a relayed conversation: received bytes, flow control and waiting for more.

The proxy relays most traffic from inside transport callbacks, with no task switch per read:
``ConnectionSide`` is the ``asyncio.Protocol`` behind each client and upstream socket. It keeps
what arrived and was not consumed yet in ``buffer``, tells its owner through plain callbacks, and
lets a coroutine that needs a whole message (a hooked request) wait with ``wait_readable``.

Flow control ties two sides together: when a side's transport has too much unsent data, the side
feeding it (its ``source``) stops reading until the backlog drains; a side also stops reading
while its own ``buffer`` is too full. Reading resumes only once every reason to hold it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

# Unsent bytes a transport may hold before its source is paused, and where it resumes.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
# Received but unconsumed bytes a side keeps before it stops reading.
BUFFER_LIMIT = 256 * 1024

SideCallback = Callable[["ConnectionSide"], None]


class ConnectionSide(asyncio.Protocol):
    """A socket's protocol; ``on_data``, ``on_eof`` and ``on_lost`` go to whoever drives it."""

    def __init__(
        self,
        name: str,
        *,
        on_data: SideCallback,
        on_eof: SideCallback,
        on_lost: SideCallback,
    ) -> None:
        self.name = name
        self.on_data, self.on_eof, self.on_lost = on_data, on_eof, on_lost
        self.transport: asyncio.Transport | None = None
        self.buffer: bytes | bytearray = b""
        self.at_eof = False
        self.lost = False
        # The side whose bytes are written into this one: it pauses while this one is backed up.
        self.source: ConnectionSide | None = None
        self._holds: set[str] = set()
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if self._holds:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if not self.buffer:
            self.buffer = data
        else:
            if isinstance(self.buffer, bytes):
                self.buffer = bytearray(self.buffer)
            self.buffer += data
        if len(self.buffer) > BUFFER_LIMIT:
            self.hold_reading("buffer full")
        if self._waiter is not None:
            self._wake()
        self.on_data(self)

    def eof_received(self) -> bool:
        self.at_eof = True
        self._wake()
        self.on_eof(self)
        # Keep the socket open: the other direction may still be sending (half-close).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.at_eof = True
        self._wake()
        self.on_lost(self)

    def pause_writing(self) -> None:
        if self.source is not None:
            self.source.hold_reading(self._backlog)

    def resume_writing(self) -> None:
        if self.source is not None:
            self.source.release_reading(self._backlog)

    @property
    def _backlog(self) -> str:
        return f"{self.name} backed up"

    # For the owner

    def bind(self, *, on_data: SideCallback, on_eof: SideCallback, on_lost: SideCallback) -> None:
        """Report to a new owner from now on (an idle dockerd connection changing hands)."""
        self.on_data, self.on_eof, self.on_lost = on_data, on_eof, on_lost

    def link(self, *, source: ConnectionSide) -> None:
        """Bytes from ``source`` are written here: hold it while this side is backed up."""
        self.unlink()
        self.source = source

    def unlink(self) -> None:
        if self.source is not None:
            self.source.release_reading(self._backlog)
            self.source = None

    def consume(self, count: int | None = None) -> bytes | bytearray:
        """Remove and return the first ``count`` buffered bytes (all of them by default)."""
        buffer = self.buffer
        if count is None or count >= len(buffer):
            self.buffer = b""
            taken = buffer
        else:
            taken = buffer[:count]
            if isinstance(buffer, bytes):
                self.buffer = bytearray(memoryview(buffer)[count:])
            else:
                del buffer[:count]
        if self._holds and len(self.buffer) <= BUFFER_LIMIT:
            self.release_reading("buffer full")
        return taken

    def write(self, data: bytes | bytearray) -> None:
        if data and self.transport is not None and not self.lost \
                and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        """Pass a half-close on, where the transport can (TLS cannot)."""
        transport = self.transport
        if transport is not None and not self.lost and not transport.is_closing() \
                and transport.can_write_eof():
            with contextlib.suppress(OSError):
                transport.write_eof()

    def close(self) -> None:
        """Close once everything written so far is sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping anything unsent."""
        if self.transport is not None:
            self.transport.abort()

    def hold_reading(self, reason: str) -> None:
        if not self._holds and self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self._holds.add(reason)

    def release_reading(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and self.transport is not None and not self.lost \
                and not self.transport.is_closing():
            self.transport.resume_reading()

    async def wait_readable(self) -> None:
        """Return once more bytes, the end of the stream or the loss of the socket arrive."""
        if self.lost:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
