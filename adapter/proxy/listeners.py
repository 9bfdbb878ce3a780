"""Where the proxy listens: unix sockets and TCP with TLS client certificates.

The proxy is root on the host, like dockerd, so no listener may admit a client that dockerd's own
socket would refuse:

- A unix socket follows dockerd's convention: group ``docker`` (``--group``), mode 0660. The mode
  and group are set between ``bind`` and ``listen``, so no client can connect before they hold.
  When the default group does not exist the socket keeps root's group with a warning, as dockerd
  does; a group named explicitly must exist (or be a number).
- Every TCP listener, loopback included, needs a certificate, key and client CA (dockerd's
  ``--tlsverify``); then every client must present a certificate signed by that CA. Without TLS
  any local user could connect and be root. ``--insecure-tcp-gives-root`` accepts exactly that
  for a loopback address, loudly; off loopback there is no way around TLS.

The parent directory of a unix socket is created; a stale socket file from a crashed run is
replaced, a live one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from adapter.errors import ConfigError
from adapter.proxy.tls import TlsServerProtocol
from adapter.settings import Settings

ProtocolFactory = Callable[[], asyncio.Protocol]
SOCKET_MODE = 0o660
# dockerd's default socket group; only this one may be missing (then root's group is used).
DEFAULT_SOCKET_GROUP = "docker"
INSECURE_TCP_FLAG = "--insecure-tcp-gives-root"

log = logging.getLogger("powerplane.listeners")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One ``--listen`` URL: a unix socket ``path`` (owned by ``group_id``) or a TCP
    ``host``/``port``."""

    url: str
    path: Path | None = None
    host: str = ""
    port: int = 0
    group_id: int | None = None

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
    """Check every listener against the access rules; resolve the socket group; build TLS."""
    addresses = [parse_listen_url(url) for url in settings.listen]
    if not addresses:
        raise ConfigError("--listen: at least one address is needed")
    tls_files = (settings.tls_cert, settings.tls_key, settings.tls_ca)
    if any(tls_files) and not all(tls_files):
        raise ConfigError("--tls-cert, --tls-key and --tls-ca must be given together")
    tls = _server_tls_context(settings) if all(tls_files) else None
    if tls is None:
        for address in addresses:
            if address.path is None:
                _check_plain_tcp(address, settings.insecure_tcp_gives_root)
    if any(address.path is not None for address in addresses):
        group_id = socket_group_id(settings.group)
        addresses = [replace(address, group_id=group_id) if address.path is not None else address
                     for address in addresses]
    return addresses, tls


def _check_plain_tcp(address: ListenAddress, insecure_allowed: bool) -> None:
    """Refuse a TCP listener without TLS, unless the user accepted root for every local user."""
    if not address.loopback:
        raise ConfigError(
            f"--listen {address.url}: refusing a non-loopback TCP listener without TLS: anyone "
            "who reaches it is root on this host; give --tls-cert, --tls-key and --tls-ca"
        )
    if not insecure_allowed:
        raise ConfigError(
            f"--listen {address.url}: refusing a TCP listener without TLS client certificates: "
            "every local user could connect and be root on this host; give --tls-cert, "
            f"--tls-key and --tls-ca, use a unix socket, or pass {INSECURE_TCP_FLAG}"
        )
    log.warning("%s: %s has no TLS: EVERY LOCAL USER WHO CONNECTS IS ROOT ON THIS HOST",
                INSECURE_TCP_FLAG, address.url)


def socket_group_id(name: str) -> int:
    """The group id unix sockets get for ``--group name``, found like dockerd finds it.

    A group name, else a number. The default group may be missing (Docker not installed yet):
    then, like dockerd, the socket keeps this process's group and only root can use it. An empty
    name means this process's group without a warning.
    """
    if not name:
        return os.getgid()
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    if name.isdecimal():
        return int(name)
    if name == DEFAULT_SOCKET_GROUP:
        gid = os.getgid()
        log.warning("--group: no group %r on this host; unix sockets get group %s (gid %d) "
                    "instead, so only that group can use them: create the group or pass --group",
                    name, _group_name(gid), gid)
        return gid
    raise ConfigError(f"--group: no group {name!r} on this host (give a group name or number)")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


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
        self._socket_group_id: int | None = None

    async def start(
        self,
        addresses: list[ListenAddress],
        tls: ssl.SSLContext | None,
        accept: ProtocolFactory,
    ) -> None:
        for address in addresses:
            if address.path is not None:
                group_id = os.getgid() if address.group_id is None else address.group_id
                self._servers.append(await self._start_unix(address.path, group_id, accept))
            else:
                self._servers.append(await self._start_tcp(address, tls, accept))

    async def _start_unix(
        self, path: Path, group_id: int, accept: ProtocolFactory
    ) -> asyncio.Server:
        try:
            if await asyncio.to_thread(_prepare_socket_path, path):
                raise ConfigError(f"--listen unix://{path}: another process listens there")
            sock = _bind_unix_socket(path, group_id)
            try:
                server = await asyncio.get_running_loop().create_unix_server(accept, sock=sock)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise ConfigError(f"--listen unix://{path}: {exc.strerror or exc}") from None
        self._socket_paths.append(path)
        self._socket_group_id = group_id
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
    def socket_group_name(self) -> str:
        """The group owning the unix sockets (its number when it has no name)."""
        return "" if self._socket_group_id is None else _group_name(self._socket_group_id)

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
                async with asyncio.timeout(1):  # not wait_for: it can lose a cancellation
                    await server.wait_closed()
        self._servers.clear()
        for path in self._socket_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._socket_paths.clear()


def _bind_unix_socket(path: Path, group_id: int) -> socket.socket:
    """A socket bound at ``path`` with its group and mode set, not yet listening.

    Until ``listen`` a connect is refused whatever the file's mode, so a client never gets in
    through the mode the umask gave at ``bind``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    try:
        os.chown(path, -1, group_id, follow_symlinks=False)
        os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return sock


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
