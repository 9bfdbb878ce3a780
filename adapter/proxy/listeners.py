"""Where the proxy listens: unix sockets and TCP, TLS with client certificates off loopback.

The proxy is root on the host, like dockerd. So, like dockerd's ``--tlsverify``, a TCP listener
on anything but a loopback address is refused unless a certificate, key and client CA are given;
then every client must present a certificate signed by that CA. Unix sockets get mode 0660 and
their parent directory is created; a stale socket file from a crashed run is replaced, a live
one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from adapter.errors import ConfigError
from adapter.proxy.tls import TlsServerProtocol
from adapter.settings import Settings

ProtocolFactory = Callable[[], asyncio.Protocol]
SOCKET_MODE = 0o660


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One ``--listen`` URL: a unix socket ``path`` or a TCP ``host``/``port``."""

    url: str
    path: Path | None = None
    host: str = ""
    port: int = 0

    @property
    def loopback(self) -> bool:
        if self.path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_listen_url(url: str) -> ListenAddress:
    """``unix:///PATH`` or ``tcp://HOST:PORT``; anything else is a ConfigError."""
    parsed = urlsplit(url)
    if parsed.scheme == "unix" and parsed.path.startswith("/") and not parsed.netloc:
        return ListenAddress(url, path=Path(parsed.path))
    if parsed.scheme == "tcp":
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.hostname and port is not None and not parsed.path.strip("/"):
            return ListenAddress(url, host=parsed.hostname, port=port)
    raise ConfigError(f"--listen: expected unix:///PATH or tcp://HOST:PORT, got {url!r}")


def plan_listeners(settings: Settings) -> tuple[list[ListenAddress], ssl.SSLContext | None]:
    """Check every listener against the loopback rule; build the TLS context if configured."""
    addresses = [parse_listen_url(url) for url in settings.listen]
    if not addresses:
        raise ConfigError("--listen: at least one address is needed")
    tls_files = (settings.tls_cert, settings.tls_key, settings.tls_ca)
    if any(tls_files) and not all(tls_files):
        raise ConfigError("--tls-cert, --tls-key and --tls-ca must be given together")
    tls = _server_tls_context(settings) if all(tls_files) else None
    for address in addresses:
        if address.path is None and not address.loopback and tls is None:
            raise ConfigError(
                f"--listen {address.url}: refusing a non-loopback TCP listener without TLS "
                "client-certificate verification; give --tls-cert, --tls-key and --tls-ca "
                "(the proxy has root's power over this host's Docker)"
            )
    return addresses, tls


def _server_tls_context(settings: Settings) -> ssl.SSLContext:
    assert settings.tls_cert and settings.tls_key and settings.tls_ca
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        context.load_verify_locations(cafile=settings.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS files ({settings.tls_cert}, {settings.tls_key}, "
                          f"{settings.tls_ca}): {exc}") from None
    return context


class Listeners:
    """Running listeners; ``close`` stops them and removes their unix socket files."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._socket_paths: list[Path] = []

    async def start(
        self,
        addresses: list[ListenAddress],
        tls: ssl.SSLContext | None,
        accept: ProtocolFactory,
    ) -> None:
        for address in addresses:
            if address.path is not None:
                self._servers.append(await self._start_unix(address.path, accept))
            else:
                self._servers.append(await self._start_tcp(address, tls, accept))

    async def _start_unix(self, path: Path, accept: ProtocolFactory) -> asyncio.Server:
        try:
            if await asyncio.to_thread(_prepare_socket_path, path):
                raise ConfigError(f"--listen unix://{path}: another process listens there")
            server = await asyncio.get_running_loop().create_unix_server(accept, path=str(path))
            os.chmod(path, SOCKET_MODE)
        except OSError as exc:
            raise ConfigError(f"--listen unix://{path}: {exc.strerror or exc}") from None
        self._socket_paths.append(path)
        return server

    async def _start_tcp(
        self, address: ListenAddress, tls: ssl.SSLContext | None, accept: ProtocolFactory
    ) -> asyncio.Server:
        factory = accept if tls is None else functools.partial(TlsServerProtocol, tls, accept)
        try:
            return await asyncio.get_running_loop().create_server(
                factory, host=address.host, port=address.port)
        except OSError as exc:
            raise ConfigError(f"--listen {address.url}: {exc.strerror or exc}") from None

    @property
    def bound(self) -> list[str]:
        """Human-readable addresses actually bound (port 0 resolved)."""
        names = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if sock.family == socket.AF_UNIX:
                    names.append(f"unix://{name}")
                else:
                    names.append(f"tcp://{name[0]}:{name[1]}")
        return names

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=1)
        self._servers.clear()
        for path in self._socket_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._socket_paths.clear()


def _prepare_socket_path(path: Path) -> bool:
    """Create the parent directory and remove a stale socket; True if a live one is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if _socket_answers(path):
            return True
        path.unlink()
    return False


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
