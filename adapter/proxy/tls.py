"""Server-side TLS that keeps half-close: what Docker clients expect of a hijacked stream.

The docker CLI ends its side of an attach by sending TLS ``close_notify`` (Go's
``tls.Conn.CloseWrite``) and then waits for the container's output. asyncio's own TLS layer shuts
the whole connection down when ``close_notify`` arrives, which loses that output. This protocol
runs TLS on memory buffers over a plain transport instead: the peer's ``close_notify`` becomes
``eof_received`` for the protocol above, which may go on writing; ``write_eof`` sends ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024


class TlsServerProtocol(asyncio.Protocol):
    """Server-side TLS on a TCP transport, for a protocol from ``accept`` once the handshake
    (client certificate included) succeeds."""

    def __init__(self, context: ssl.SSLContext, accept: Callable[[], asyncio.Protocol]) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._accept = accept
        self._app: asyncio.Protocol = asyncio.Protocol()
        self._raw: asyncio.Transport | None = None
        self._transport = _TlsTransport(self)
        self._established = False
        self._peer_closed = False
        self._closed_write = False

    # The TCP side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        self._raw = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._established and not self._handshake():
            return
        received, ended = self._read_application_data()
        self._send_pending()
        if received:
            self._app.data_received(received)
        if ended:
            self._peer_finished()

    def eof_received(self) -> bool:
        if self._established:
            self._peer_finished()
        # Keep the socket: our side may still have a stream to send.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._established:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    # For the transport handed to the application

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed_write or self._raw is None or self._raw.is_closing():
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            log.info("TLS write failed: %s", exc)
            self.abort()
            return
        self._send_pending()

    def write_eof(self) -> None:
        """Send ``close_notify``, then close TCP's sending side; reading goes on."""
        if self._closed_write or self._raw is None:
            return
        self._closed_write = True
        if self._raw.is_closing():
            return
        # The alert is written at once; the peer's own one is not awaited.
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
            self._tls.unwrap()
        self._send_pending()
        if self._raw.can_write_eof():
            self._raw.write_eof()

    def close(self) -> None:
        """Send ``close_notify`` (a clean end, not a truncation) and close once flushed."""
        if self._established:
            self.write_eof()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        if self._raw is not None:
            self._raw.abort()

    @property
    def raw(self) -> asyncio.Transport | None:
        return self._raw

    @property
    def tls_object(self) -> ssl.SSLObject:
        return self._tls

    # Internals

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_pending()
            return False
        except ssl.SSLError as exc:
            peer = self._raw.get_extra_info("peername") if self._raw else None
            log.warning("TLS handshake with %s refused: %s", peer, exc.reason or exc)
            self._send_pending()  # the alert tells the client why
            self.close()
            return False
        self._established = True
        self._send_pending()
        self._app = self._accept()
        self._app.connection_made(self._transport)
        return True

    def _read_application_data(self) -> tuple[bytes, bool]:
        pieces: list[bytes] = []
        ended = False
        while True:
            try:
                piece = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                ended = True
                break
            except ssl.SSLError as exc:
                log.info("TLS read failed: %s", exc)
                self.abort()
                break
            if not piece:
                ended = True
                break
            pieces.append(piece)
        return b"".join(pieces), ended

    def _peer_finished(self) -> None:
        if not self._peer_closed:
            self._peer_closed = True
            self._app.eof_received()

    def _send_pending(self) -> None:
        pending = self._outgoing.read()
        if pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(pending)


class _TlsTransport(asyncio.Transport):
    """What the application protocol sees: a transport that encrypts on the way out."""

    def __init__(self, tls: TlsServerProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def write_eof(self) -> None:
        self._tls.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def is_closing(self) -> bool:
        raw = self._tls.raw
        return raw is None or raw.is_closing()

    def pause_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self._tls.raw
        return raw is not None and raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tls.raw is not None:
            self._tls.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._tls.raw
        return 0 if raw is None else raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls.tls_object
        if name == "peercert":
            return self._tls.tls_object.getpeercert()
        raw = self._tls.raw
        return default if raw is None else raw.get_extra_info(name, default)
