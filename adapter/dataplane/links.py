"""Kernel network links through netlink (the only module that imports pyroute2).

A container port is a veth pair: one end stays in the host namespace (named ``ovs…``, plugged on
the OVS bridge), the other is created straight inside the container's namespace as ``eth0`` with
its MAC, address, MTU and default route. Every verb is idempotent: running it again, or after a
crash half-way, converges on the same result.

Sockets inside another namespace are opened from a short-lived thread that enters it; that and
the ethtool ioctl run in a worker thread so the event loop never blocks. pyroute2's netlink
sockets need a stock asyncio loop (uvloop cannot open AF_NETLINK datagram endpoints), so every
netlink verb runs on one such loop in a thread of its own, started on first use. Library and
kernel errors are translated here, once, into ``DataPlaneError``.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import functools
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from pyroute2 import AsyncIPRoute, NetlinkError

from adapter.errors import DataPlaneError

NETNS_RUN_DIR = "/run/netns"
NETLINK_ROUTE = 0
IFNAMSIZ = 16

# linux/sockios.h and linux/ethtool.h
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17

NetnsRef = int | str  # a pid, a netns path, or a name under /run/netns

_P = ParamSpec("_P")
_T = TypeVar("_T")
_netlink_loop: asyncio.AbstractEventLoop | None = None
_netlink_loop_lock = threading.Lock()


def _loop_for_netlink() -> asyncio.AbstractEventLoop:
    """The asyncio loop netlink sockets live on: a daemon thread's, started on first use."""
    global _netlink_loop
    with _netlink_loop_lock:
        if _netlink_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="powerplane-netlink",
                             daemon=True).start()
            _netlink_loop = loop
        return _netlink_loop


def _on_netlink_loop(
    verb: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Run a netlink verb on the netlink loop, awaited from whatever loop calls it."""

    @functools.wraps(verb)
    async def hop(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        loop = _loop_for_netlink()
        if asyncio.get_running_loop() is loop:
            return await verb(*args, **kwargs)
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(verb(*args, **kwargs), loop))

    return hop


def netns_path(netns: NetnsRef) -> str:
    """The namespace file for a pid (its network namespace), a path, or a name in /run/netns."""
    if isinstance(netns, int):
        return f"/proc/{netns}/ns/net"
    return netns if "/" in netns else f"{NETNS_RUN_DIR}/{netns}"


@dataclass(frozen=True, slots=True)
class ContainerLink:
    """What the container end of a veth pair should look like."""

    ifname: str
    mac: str
    address: str  # IP/prefix, e.g. 10.0.6.2/24
    mtu: int
    gateway: str | None


def _ethtool_tx_checksum(sock: socket.socket, ifname: str, enabled: bool | None) -> bool:
    """Read (``enabled`` None) or set tx checksum offload of ``ifname``; return the state."""
    command = ETHTOOL_GTXCSUM if enabled is None else ETHTOOL_STXCSUM
    value = ctypes.create_string_buffer(struct.pack("II", command, int(bool(enabled))), 8)
    request = struct.pack(f"{IFNAMSIZ}sP", ifname.encode(), ctypes.addressof(value))
    request = request.ljust(40, b"\0")  # sizeof(struct ifreq)
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)
    return bool(struct.unpack("II", value.raw)[1])


CLONE_NEWNET = 0x40000000


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _netns_socket(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in ``netns`` (default: ours) for its whole life.

    setns() moves only the calling thread, so a throwaway thread enters the namespace, opens
    the socket and ends. No fork: a forked child shares asyncio's signal wake-up fd, and a
    signal the child receives would reach the parent's loop as if sent to the parent (seen:
    `powerplane serve` stopping as if it had been sent SIGTERM).
    """
    if netns is None:
        return socket.socket(family, kind, proto)
    path = netns_path(netns)
    if not os.path.exists(path):
        raise DataPlaneError(f"network namespace {path} does not exist")
    outcome: list[socket.socket | BaseException] = []

    def enter_and_open() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns({path}): {os.strerror(code)}")
            finally:
                os.close(fd)
            outcome.append(socket.socket(family, kind, proto))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=enter_and_open, name="powerplane-netns")
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


async def set_tx_checksum(ifname: str, enabled: bool, *, netns: str | None = None) -> None:
    """Turn tx checksum offload of ``ifname`` (in ``netns``, default ours) on or off."""

    def work() -> None:
        sock = _netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            if _ethtool_tx_checksum(sock, ifname, None) != enabled:
                _ethtool_tx_checksum(sock, ifname, enabled)

    try:
        await asyncio.to_thread(work)
    except OSError as exc:
        raise DataPlaneError(f"ethtool on {ifname}: {exc.strerror or exc}") from exc


async def tx_checksum(ifname: str, *, netns: str | None = None) -> bool:
    """Whether tx checksum offload is on for ``ifname``."""

    def work() -> bool:
        with _netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return _ethtool_tx_checksum(sock, ifname, None)

    try:
        return await asyncio.to_thread(work)
    except OSError as exc:
        raise DataPlaneError(f"ethtool on {ifname}: {exc.strerror or exc}") from exc


@asynccontextmanager
async def _iproute(netns: str | None = None) -> AsyncIterator[Any]:
    """An rtnetlink socket in ``netns`` (default: the current one); errors translated."""
    try:
        if netns is None:
            ipr = AsyncIPRoute()
        else:
            sock = await asyncio.to_thread(
                _netns_socket, netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE
            )
            ipr = AsyncIPRoute(use_socket=sock)
    except OSError as exc:
        raise DataPlaneError(f"netlink in {netns or 'host namespace'}: {exc}") from exc
    try:
        yield ipr
    except NetlinkError as exc:
        raise DataPlaneError(
            f"netlink in {netns or 'host namespace'}: {os.strerror(exc.code)}"
        ) from exc
    except OSError as exc:
        raise DataPlaneError(f"netlink in {netns or 'host namespace'}: {exc}") from exc
    finally:
        ipr.close()


async def _index(ipr: Any, ifname: str) -> int | None:
    try:
        links = [link async for link in await ipr.link("dump", ifname=ifname)]
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return int(links[0]["index"]) if links else None


async def _link_info(ipr: Any, ifname: str) -> dict[str, Any] | None:
    links = [link async for link in await ipr.link("dump", ifname=ifname)]
    if not links:
        return None
    link = links[0]
    return {
        "index": int(link["index"]),
        "mtu": link.get("IFLA_MTU"),
        "mac": link.get("IFLA_ADDRESS"),
        "up": bool(link["flags"] & 1),
        "kind": (link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))),
    }


@_on_netlink_loop
async def link_exists(ifname: str, *, netns: str | None = None) -> bool:
    async with _iproute(netns) as ipr:
        return await _index(ipr, ifname) is not None


@_on_netlink_loop
async def link_mtu_and_mac(ifname: str, *, netns: str | None = None) -> tuple[int, str]:
    """The MTU and MAC of ``ifname``, in one read; DataPlaneError if there is no such one."""
    async with _iproute(netns) as ipr:
        info = await _link_info(ipr, ifname)
    if info is None:
        raise DataPlaneError(f"no interface {ifname}")
    return int(info["mtu"]), str(info["mac"])


@_on_netlink_loop
async def interface_with_address(ip: str, *, netns: str | None = None) -> tuple[str, int] | None:
    """(interface name, prefix length) of the interface holding address ``ip``, or None."""
    async with _iproute(netns) as ipr:
        async for addr in await ipr.addr("dump", family=socket.AF_INET):
            if ip in (addr.get("IFA_ADDRESS"), addr.get("IFA_LOCAL")):
                index, prefixlen = addr["index"], int(addr["prefixlen"])
                async for link in await ipr.link("dump", index=index):
                    return str(link.get("IFLA_IFNAME")), prefixlen
    return None


@_on_netlink_loop
async def veth_names(prefix: str, *, netns: str | None = None) -> set[str]:
    """Names of the veths in ``netns`` (default: ours) that start with ``prefix``: one dump."""
    async with _iproute(netns) as ipr:
        return {str(link.get("IFLA_IFNAME")) async for link in await ipr.link("dump")
                if str(link.get("IFLA_IFNAME") or "").startswith(prefix)
                and link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "veth"}


@_on_netlink_loop
async def delete_link(ifname: str, *, netns: str | None = None) -> None:
    """Remove ``ifname`` (for a veth, both ends go); nothing if it is gone."""
    async with _iproute(netns) as ipr:
        index = await _index(ipr, ifname)
        if index is None:
            return
        try:
            await ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise


@_on_netlink_loop
async def ensure_veth(
    host_ifname: str,
    container_netns: NetnsRef,
    container: ContainerLink,
    *,
    tx_checksum_off: bool,
) -> None:
    """Make a veth pair ``host_ifname`` ⇄ ``container.ifname`` (inside ``container_netns``).

    The container end gets the MAC, address, MTU, link up and default route of ``container``;
    the host end the same MTU and link up. With ``tx_checksum_off`` both ends stop offloading tx
    checksums (needed when a userspace datapath reads the frames). A pair that exists with only
    one end, or whose container end sits in another namespace, is replaced.
    """
    path = netns_path(container_netns)
    async with _iproute() as host, _iproute(path) as inside:
        host_index = await _index(host, host_ifname)
        inside_index = await _index(inside, container.ifname)
        if host_index is not None and inside_index is not None:
            peer = await _peer_index(host, host_index)
            if peer != inside_index or not await _is_veth(inside, inside_index):
                host_index = None  # a stale pair: replace both ends
                await host.link("del", index=await _index(host, host_ifname))
        if host_index is None or inside_index is None:
            if host_index is not None:
                await host.link("del", index=host_index)
            if inside_index is not None:
                await inside.link("del", index=inside_index)
            fd = os.open(path, os.O_RDONLY)
            try:
                await host.link("add", ifname=host_ifname, kind="veth",
                                peer={"ifname": container.ifname, "net_ns_fd": fd})
            finally:
                os.close(fd)
        await _configure_container_end(inside, container)
        host_index = await _index(host, host_ifname)
        if host_index is None:
            raise DataPlaneError(f"veth {host_ifname} vanished while being configured")
        await host.link("set", index=host_index, mtu=container.mtu, state="up")
    if tx_checksum_off:
        await set_tx_checksum(host_ifname, False)
        await set_tx_checksum(container.ifname, False, netns=path)


async def _peer_index(ipr: Any, index: int) -> int | None:
    async for link in await ipr.link("dump", index=index):
        peer = link.get("IFLA_LINK")
        return int(peer) if peer is not None else None
    return None


async def _is_veth(ipr: Any, index: int) -> bool:
    async for link in await ipr.link("dump", index=index):
        return bool(link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "veth")
    return False


async def _configure_container_end(ipr: Any, container: ContainerLink) -> None:
    index = await _index(ipr, container.ifname)
    if index is None:
        raise DataPlaneError(f"{container.ifname} missing in the container namespace")
    await ipr.link("set", index=index, address=container.mac, mtu=container.mtu)
    interface = ipaddress.IPv4Interface(container.address)
    present = {
        (a.get("IFA_ADDRESS"), a["prefixlen"])
        async for a in await ipr.addr("dump", index=index, family=socket.AF_INET)
    }
    wanted = (str(interface.ip), interface.network.prefixlen)
    for address, prefixlen in present - {wanted}:
        await ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
    if wanted not in present:
        await ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])
    await ipr.link("set", index=index, state="up")
    lo = await _index(ipr, "lo")
    if lo is not None:
        await ipr.link("set", index=lo, state="up")
    if container.gateway is not None:
        await ipr.route("replace", dst="0.0.0.0/0", gateway=container.gateway, oif=index)


@_on_netlink_loop
async def move_address(ip_cidr: str, source: str, target: str) -> None:
    """Move address ``ip_cidr`` and the routes through ``source`` onto ``target`` (idempotent).

    Routes are re-created on ``target`` with the same destination, gateway and metric, so a
    host keeps its default route when its underlay address moves onto an OVS bridge.
    """
    interface = ipaddress.IPv4Interface(ip_cidr)
    address, prefixlen = str(interface.ip), interface.network.prefixlen
    async with _iproute() as ipr:
        source_index = await _index(ipr, source)
        target_index = await _index(ipr, target)
        if target_index is None:
            raise DataPlaneError(f"no interface {target}")
        await ipr.link("set", index=target_index, state="up")
        routes: list[dict[str, Any]] = []
        if source_index is not None:
            async for route in await ipr.route("dump", family=socket.AF_INET, oif=source_index):
                gateway = route.get("RTA_GATEWAY")
                if gateway is None or route.get("RTA_TABLE") != 254:
                    continue  # connected routes come back with the address; other tables: not ours
                routes.append({
                    "dst": f"{route.get('RTA_DST') or '0.0.0.0'}/{route['dst_len']}",
                    "gateway": gateway,
                    "priority": route.get("RTA_PRIORITY") or 0,
                })
            try:
                await ipr.addr("del", index=source_index, address=address, prefixlen=prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EADDRNOTAVAIL:
                    raise
        try:
            await ipr.addr("add", index=target_index, address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        for route in routes:
            await ipr.route("replace", oif=target_index, **route)


@_on_netlink_loop
async def set_mtu(ifname: str, mtu: int, *, netns: str | None = None) -> None:
    """Set the MTU of ``ifname`` (and bring it up)."""
    async with _iproute(netns) as ipr:
        index = await _index(ipr, ifname)
        if index is None:
            raise DataPlaneError(f"no interface {ifname}")
        await ipr.link("set", index=index, mtu=mtu, state="up")


@_on_netlink_loop
async def ensure_interface_address(ifname: str, address: str, *, wait: float,
                                   mac: str | None = None) -> bool:
    """Give ``ifname`` exactly the IPv4 ``address`` (IP/prefix) (and ``mac``), bring it up.

    The device is one that OVS makes (an internal port) a moment after its OVSDB row exists,
    so it is waited for, up to ``wait`` seconds; DataPlaneError if it does not appear. Other
    IPv4 addresses on it (a network re-created with another subnet) are removed. True when
    anything changed.
    """
    ip, _, prefix = address.partition("/")
    prefixlen = int(prefix)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with _iproute() as ipr:
        while (index := await _index(ipr, ifname)) is None:
            if loop.time() > deadline:
                raise DataPlaneError(f"interface {ifname} did not appear within {wait:g} s")
            await asyncio.sleep(0.02)
        changed = False
        present = False
        async for addr in await ipr.addr("dump", family=socket.AF_INET, index=index):
            held, held_prefix = addr.get("IFA_LOCAL") or addr.get("IFA_ADDRESS"), addr["prefixlen"]
            if (held, int(held_prefix)) == (ip, prefixlen):
                present = True
                continue
            await ipr.addr("del", index=index, address=held, prefixlen=int(held_prefix))
            changed = True
        info = await _link_info(ipr, ifname)
        if mac is not None and info is not None and str(info["mac"]).lower() != mac.lower():
            await ipr.link("set", index=index, address=mac)
            changed = True
        if info is not None and not info["up"]:
            await ipr.link("set", index=index, state="up")
            changed = True
        if not present:
            try:
                await ipr.addr("add", index=index, address=ip, prefixlen=prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            changed = True
    return changed


@_on_netlink_loop
async def interface_addresses(ifname: str) -> set[str] | None:
    """The IPv4 addresses (IP/prefix) of ``ifname``; None if there is no such interface."""
    async with _iproute() as ipr:
        index = await _index(ipr, ifname)
        if index is None:
            return None
        info = await _link_info(ipr, ifname)
        if info is not None and not info["up"]:
            return set()  # down: as good as unaddressed for whoever routes through it
        return {f"{addr.get('IFA_LOCAL') or addr.get('IFA_ADDRESS')}/{addr['prefixlen']}"
                async for addr in await ipr.addr("dump", family=socket.AF_INET, index=index)}


@_on_netlink_loop
async def set_host_addresses(ifname: str, wanted: set[str], *,
                             within: str) -> tuple[list[str], list[str]]:
    """Make the /32 addresses of ``ifname`` that lie inside ``within`` exactly ``wanted``.

    Addresses outside ``within`` (the interface's own) are never touched. Returns the
    addresses (added, removed).
    """
    pool = ipaddress.IPv4Network(within)
    async with _iproute() as ipr:
        index = await _index(ipr, ifname)
        if index is None:
            raise DataPlaneError(f"no interface {ifname}")
        held = set()
        async for addr in await ipr.addr("dump", family=socket.AF_INET, index=index):
            ip = addr.get("IFA_LOCAL") or addr.get("IFA_ADDRESS")
            if int(addr["prefixlen"]) == 32 and ipaddress.IPv4Address(ip) in pool:
                held.add(str(ip))
        added = sorted(wanted - held)
        removed = sorted(held - wanted)
        for ip in removed:
            try:
                await ipr.addr("del", index=index, address=ip, prefixlen=32)
            except NetlinkError as exc:
                if exc.code != errno.EADDRNOTAVAIL:
                    raise
        for ip in added:
            try:
                await ipr.addr("add", index=index, address=ip, prefixlen=32)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
    return added, removed
