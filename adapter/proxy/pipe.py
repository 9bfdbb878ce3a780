"""A hijacked connection: after ``101 Upgrade: tcp`` or a Docker raw-stream answer, raw bytes.

``attach``, ``exec start`` and ``run -it`` stop speaking HTTP once dockerd has answered; the
connection becomes a byte pipe both ways. Each read is written on as the object it arrived in
(no copy), the side that feeds a backed-up one stops reading (``ConnectionSide`` flow control),
and an end of stream on one side is passed on as a half-close, so ``echo hi | docker run -i``
gets its output after its input ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from adapter.proxy.connection import ConnectionSide
from adapter.proxy.http1 import Framing, Head

log = logging.getLogger(__name__)

# Left between the answer head and the first stream bytes; see HijackPipe.
HIJACK_SETTLE = 0.01
# Docker answers attach without an upgrade with these types and then owns the raw connection.
RAW_STREAM_TYPES = frozenset({
    "application/vnd.docker.raw-stream",
    "application/vnd.docker.multiplexed-stream",
})


def starts_raw_stream(answer: Head, framing: Framing) -> bool:
    """Whether dockerd's ``answer`` hands the connection over: a 101, or a raw stream that has
    no framing and so lasts until the connection ends."""
    return answer.status == 101 or (framing is Framing.UNTIL_CLOSE
                                    and answer.content_type in RAW_STREAM_TYPES)


class HijackPipe:
    """Relays ``client`` and ``upstream`` both ways until both have ended.

    Some clients (docker-py's ``attach_socket``) read the head through a buffered reader and
    lose any stream bytes that arrive in the same read. dockerd's own gap between head and
    stream hides this; the proxy would read both at once, so it leaves one.
    """

    def __init__(self, client: ConnectionSide, upstream: ConnectionSide, *,
                 on_finished: Callable[[], None], on_error: Callable[[], None]) -> None:
        self.client, self.upstream = client, upstream
        self._on_finished, self._on_error = on_finished, on_error
        self._settling = True
        asyncio.get_running_loop().call_later(HIJACK_SETTLE, self._settled)
        self.relay(client)

    def _settled(self) -> None:
        self._settling = False
        try:
            self.relay(self.upstream)
        except Exception:
            log.exception("unexpected error relaying a hijacked stream")
            self._on_error()

    def relay(self, source: ConnectionSide) -> None:
        """Pass on what ``source`` has: its bytes, then its end of stream."""
        upstream = self.upstream
        if source is upstream and self._settling:
            return
        sink = upstream if source is self.client else self.client
        if source.buffer:
            sink.write(source.consume())
        if source.at_eof:
            sink.write_eof()
            if self.client.at_eof and upstream.at_eof and not upstream.buffer:
                self._on_finished()
