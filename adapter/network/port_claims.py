"""Host ports for this host's overlay creates: chosen, checked, and held until the app has them.

A host port is taken when another overlay app of this host publishes it (its ports label, read
from Docker; running or not, it keeps its ports until it is removed), when a create in flight in
this process claimed it, or when a process of this host has it bound. ``PortClaims.claim``
checks all three and reserves what it chose with no ``await`` between the check and the
reservation: of two creates asking for one port only one passes, and the other sees the
reservation at once. No lock is needed for that; one would only serialize what already cannot
interleave. The bind probe belongs to that step: ``bind()`` and ``listen()`` on a fresh socket
never wait (asyncio binds its own servers on the event loop the same way).

A reservation lasts until the app exists with its label (``settle``) or the create failed
(``release``). A settled one still counts until a listing that began after it was settled:
a listing under way may not show the app yet.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adapter.errors import BadRequest, PortConflict, PowerplaneError
from adapter.network.create_rewrite import LABEL_PORTS
from adapter.network.ports import (
    ALL_ADDRESSES,
    PortBinding,
    PortRequest,
    PublishedPorts,
    RequestedBinding,
    image_exposed_ports,
)
from adapter.network.published import labelled_ports

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Docker's own choice when the kernel's range cannot be read.
DEFAULT_EPHEMERAL_RANGE = (49153, 65535)


class DockerLike(Protocol):
    """The part of ``adapter.network.docker_api.Docker`` port claims need."""

    async def containers(self, *, label: str) -> list[dict[str, Any]]: ...

    async def image_config(self, image: str) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class ProbeFailure:
    """Why a process of this host could not take an address: the call that failed, and how."""

    call: str  # "bind" | "listen"
    error: OSError


Probe = Callable[[PortBinding], ProbeFailure | None]


def bind_probe(binding: PortBinding) -> ProbeFailure | None:
    """Bind (and for TCP listen on) ``binding``'s host address in this process's namespace,
    then close: what a process taking that address now would run into, or None."""
    tcp = binding.proto == "tcp"
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    except OSError as exc:
        raise PowerplaneError(f"cannot check whether host port {binding.host_port} is free: "
                              f"{exc}") from None
    with probe:
        if tcp:
            # As every TCP server does (Go's listeners too): connections lingering in
            # TIME_WAIT do not hold the port. Never for UDP, where it would share a bound port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        call = "bind"
        try:
            probe.bind((binding.address, binding.host_port))
            if tcp:
                call = "listen"
                probe.listen(1)
        except OSError as exc:
            return ProbeFailure(call, exc)
    return None


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range, where Docker picks a free host port (blocking)."""
    try:
        low, high = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    return (low, high) if 1 <= low <= high <= 65535 else DEFAULT_EPHEMERAL_RANGE


@dataclass(eq=False, slots=True)
class Claim:
    """The ports one create holds, from its check until its app carries them (or it failed)."""

    ports: PublishedPorts
    settled_at: float | None = None


class PortClaims:
    """The host ports of this host's overlay apps and of the creates in flight for them."""

    def __init__(self, docker: DockerLike, host_id: str, *, probe: Probe = bind_probe) -> None:
        self._docker = docker
        self._host_id = host_id
        self._probe = probe
        self._claims: set[Claim] = set()
        # Where the next search for a free port starts, per protocol: as Docker does, ports
        # are handed out in turn rather than the lowest again and again.
        self._next_free: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._claims)

    async def claim(self, request: PortRequest, *, image: str | None,
                    endpoint: str | None) -> Claim:
        """Choose and reserve the host ports ``request`` asks for; PortConflict (409) when one
        is taken, BadRequest when its host address is not this host's.

        ``image``: whose exposed ports ``-P`` publishes too. ``endpoint``: the container's
        name, for Docker's message.
        """
        if not request.publishes:
            return Claim(PublishedPorts((), request.exposed))
        image_config = await self._docker.image_config(image) \
            if request.publish_all and image else None
        wanted, exposed = request.wanted(image_exposed_ports(image_config))
        free_range = DEFAULT_EPHEMERAL_RANGE
        if any(binding.host_ports is None for binding in wanted):
            free_range = await asyncio.to_thread(ephemeral_range)
        began = time.monotonic()
        apps = await self._docker.containers(label=LABEL_PORTS)
        # From here until the claim is recorded nothing awaits: the check and the reservation
        # are one step for every other create of this process.
        self._claims = {claim for claim in self._claims
                        if claim.settled_at is None or claim.settled_at >= began}
        taken = _Taken(binding for _, ports in labelled_ports(apps, self._host_id)
                       for binding in ports.bindings)
        taken.extend(binding for claim in self._claims for binding in claim.ports.bindings)
        chosen = [self._choose(binding, taken, free_range, endpoint)
                  for binding in sorted(wanted, key=_fixed_first)]
        claim = Claim(PublishedPorts(tuple(chosen), exposed))
        self._claims.add(claim)
        return claim

    def settle(self, claim: Claim) -> None:
        """The app exists with its ports label: listings that begin from now on show it."""
        claim.settled_at = time.monotonic()

    def release(self, claim: Claim) -> None:
        """The create failed or its sandbox is gone: the ports are free again."""
        self._claims.discard(claim)

    def _choose(self, wanted: RequestedBinding, taken: _Taken, free_range: tuple[int, int],
                endpoint: str | None) -> PortBinding:
        fixed = wanted.host_ports is not None and wanted.host_ports[0] == wanted.host_ports[1]
        for port in self._candidates(wanted, free_range):
            binding = PortBinding(wanted.proto, wanted.host_ip, port, wanted.container_port)
            if taken.collides(binding):
                if fixed:
                    raise PortConflict(_refusal(endpoint, f"Bind for {binding.address}:{port} "
                                                          "failed: port is already allocated"))
                continue
            failure = self._probe(binding)
            if failure is not None and (fixed or failure.error.errno == errno.EADDRNOTAVAIL):
                raise _probe_error(binding, failure, endpoint)
            if failure is None:
                taken.append(binding)
                if wanted.host_ports is None:
                    self._next_free[wanted.proto] = port + 1
                return binding
        first, last = wanted.host_ports or free_range
        address = wanted.host_ip or ALL_ADDRESSES
        raise PortConflict(_refusal(endpoint, f"Bind for {address}:{first}-{last} failed: no "
                                              f"free {wanted.proto} port left in the range"))

    def _candidates(self, wanted: RequestedBinding, free_range: tuple[int, int]) -> Iterator[int]:
        if wanted.host_ports is not None:
            yield from range(wanted.host_ports[0], wanted.host_ports[1] + 1)
            return
        low, high = free_range
        start = self._next_free.get(wanted.proto, low)
        start = start if low <= start <= high else low
        yield from range(start, high + 1)
        yield from range(low, start)


class _Taken:
    """Bindings already held, looked up by protocol and port."""

    def __init__(self, bindings: Iterable[PortBinding]) -> None:
        self._by_port: dict[tuple[str, int], list[PortBinding]] = {}
        self.extend(bindings)

    def extend(self, bindings: Iterable[PortBinding]) -> None:
        for binding in bindings:
            self.append(binding)

    def append(self, binding: PortBinding) -> None:
        self._by_port.setdefault((binding.proto, binding.host_port), []).append(binding)

    def collides(self, binding: PortBinding) -> bool:
        return any(binding.collides(other)
                   for other in self._by_port.get((binding.proto, binding.host_port), ()))


def _fixed_first(binding: RequestedBinding) -> int:
    # A fixed port is never left to a range or a free pick of the same create to take first.
    if binding.host_ports is None:
        return 2
    return 0 if binding.host_ports[0] == binding.host_ports[1] else 1


def _refusal(endpoint: str | None, detail: str) -> str:
    # Docker's own words, so that scripts and people recognise them.
    where = f" on endpoint {endpoint}" if endpoint else ""
    return f"driver failed programming external connectivity{where}: {detail}"


def _probe_error(binding: PortBinding, failure: ProbeFailure,
                 endpoint: str | None) -> PowerplaneError:
    code = failure.error.errno
    reason = os.strerror(code) if code else str(failure.error)
    reason = reason[:1].lower() + reason[1:]
    text = _refusal(endpoint, f"Error starting userland proxy: listen {binding.proto}4 "
                              f"{binding.address}:{binding.host_port}: {failure.call}: {reason}")
    if code == errno.EADDRNOTAVAIL:
        return BadRequest(f"{text} (is {binding.host_ip} an address of this host?)")
    return PortConflict(text)
