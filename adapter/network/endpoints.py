"""The life of a container's overlay endpoint on this host, from sandbox to release.

The network hook (driven by Docker API calls) and the host agent (driven by Docker events and
periodic reconciliation) both change endpoints only through ``EndpointManager``, so the order of
steps and their undo live in one place:

    attach:   host ports (claimed in this process) → network → sandbox container (created)
              → address (CAS claim, owner = sandbox id) → sandbox started → veth plugged into
              its namespace                                             (undone on any failure)
    commit:   app container id known → endpoint record ``endpoints/<app id>``; its ports are
              on its label now, where every later check finds them
    detach:   unplug → remove sandbox → release address (only if still ours) → drop record

Every step is idempotent, so a detach after a crash at any point converges.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from adapter import logs
from adapter.dataplane.firewall import PublishedPort
from adapter.dataplane.switch import port_name
from adapter.errors import BadRequest, NetworkNotFound, PowerplaneError
from adapter.model import Endpoint, Network
from adapter.network.create_rewrite import (
    LABEL_ALIASES,
    LABEL_APP_NAME,
    LABEL_CIDR,
    LABEL_CREATION,
    LABEL_GATEWAY,
    LABEL_GROUPS,
    LABEL_HOST,
    LABEL_HOSTNAME,
    LABEL_IP,
    LABEL_MAC,
    LABEL_NETWORK,
    LABEL_PORT,
    LABEL_PORTS,
    LABEL_ROLE,
    LABEL_SANDBOX,
    SANDBOX_ROLE,
    CreateRequest,
    OverlayRequest,
    groups_label,
)
from adapter.network.docker_api import Docker
from adapter.network.locks import KeyedLocks
from adapter.network.port_claims import Claim, PortClaims
from adapter.network.ports import PublishedPorts
from adapter.network.published import published_ports
from adapter.network.readiness import DATAPLANE, Readiness
from adapter.network.state import State
from adapter.settings import Settings

log = logging.getLogger(__name__)

# How long a sandbox may wait for its app's create to come back before reconciliation may
# treat it as abandoned (the client vanished between our pre- and post-hook).
PENDING_GRACE_SECONDS = 120.0


class PluggedPortLike(Protocol):
    @property
    def container_id(self) -> str: ...

    @property
    def port(self) -> str: ...

    @property
    def mac(self) -> str: ...


class DataPlaneLike(Protocol):
    """The part of ``adapter.dataplane.switch.DataPlane`` endpoints need."""

    async def plug(self, *, container_id: str, netns: int | str, network: Network,
                   ip: str, groups: Iterable[str] = ()) -> PluggedPortLike: ...

    async def unplug(self, container_id: str) -> None: ...

    async def plugged(self) -> Sequence[PluggedPortLike]: ...

    async def port_links(self) -> set[str]: ...

    async def ensure(self) -> bool: ...

    async def remove_port_link(self, port: str) -> None: ...

    async def set_gateways(self, networks: Iterable[Network]) -> list[str]: ...

    async def set_published(self, published: Iterable[PublishedPort]) -> bool: ...


@dataclass(frozen=True, slots=True)
class Attachment:
    """A started, plugged sandbox holding an address, waiting for its app container."""

    network: Network
    ip: str
    mac: str
    port: str
    sandbox_id: str
    ports: PublishedPorts = field(default_factory=PublishedPorts)
    hostname: str = ""
    aliases: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def app_labels(self, host_id: str) -> dict[str, str]:
        return {
            LABEL_SANDBOX: self.sandbox_id,
            LABEL_NETWORK: self.network.name,
            LABEL_CIDR: self.network.cidr,
            LABEL_IP: self.ip,
            LABEL_GATEWAY: self.network.gateway,
            LABEL_MAC: self.mac,
            LABEL_PORT: self.port,
            LABEL_HOST: host_id,
            # Set even when empty: an image committed from an overlay app carries its ports
            # label, which would otherwise publish that app's ports again.
            LABEL_PORTS: self.ports.encode() if self.ports else "",
            LABEL_HOSTNAME: self.hostname,
            LABEL_ALIASES: ",".join(self.aliases),
            LABEL_GROUPS: ",".join(self.groups),
        }


class EndpointManager:
    """Creates, repairs and removes overlay endpoints on this host."""

    def __init__(self, settings: Settings, *, state: State, dataplane: DataPlaneLike,
                 docker: Docker, readiness: Readiness | None = None) -> None:
        self._settings = settings
        self._readiness = readiness
        self._state = state
        self._dataplane = dataplane
        self._docker = docker
        self._pending: dict[str, float] = {}
        # When each sandbox's app was last committed: a reconciliation that began before that
        # moment holds listings too old to judge it by.
        self._committed_at: dict[str, float] = {}
        # Tokens (label LABEL_CREATION) of sandboxes whose create call has not returned yet.
        self._creating: set[str] = set()
        self._locks = KeyedLocks()
        # What this process wired, so a `docker start` right after the create costs one inspect:
        # the namespace (sandbox pid) each sandbox was last plugged into, and each app's sandbox.
        self._plugged_pid: dict[str, int] = {}
        self._sandbox_of_app: dict[str, str] = {}
        self._ports = PortClaims(docker, settings.host_id)
        # The host ports of each sandbox whose app does not exist yet.
        self._port_claims: dict[str, Claim] = {}
        # One listing-and-apply of the published ports at a time, so an older listing is never
        # applied after a newer one.
        self._publish_lock = asyncio.Lock()

    @property
    def host_id(self) -> str:
        return self._settings.host_id

    def is_pending(self, sandbox_id: str, labels: Mapping[str, str] | None = None, *,
                   since: float | None = None) -> bool:
        """True for a sandbox this process is still attaching (or waiting for its app), or
        whose app was committed at or after ``since`` (when a reconciliation began).

        Docker lists a sandbox as soon as it exists, a moment before our create call returns
        its id: ``labels`` (as listed) let the sandbox be recognised by the token it was
        created with during that moment.
        """
        if labels is not None and labels.get(LABEL_CREATION) in self._creating:
            return True
        if since is not None and self._committed_at.get(sandbox_id, float("-inf")) >= since:
            return True
        deadline = self._pending.get(sandbox_id)
        return deadline is not None and deadline > time.monotonic()

    def pending(self, *, since: float) -> set[str]:
        """The sandboxes of creates still in flight in this process, and those whose app was
        committed at or after ``since``: the ones ``is_pending`` names, known by id."""
        now = time.monotonic()
        return ({sandbox for sandbox, deadline in self._pending.items() if deadline > now}
                | {sandbox for sandbox, at in self._committed_at.items() if at >= since})

    async def resolve_network(self, request: OverlayRequest) -> Network:
        """The network a SOCKETPLANE_* request names: joined by name, or by subnet (created)."""
        if request.network is not None:
            try:
                network = await self._state.networks.get(request.network)
            except NetworkNotFound:
                raise NetworkNotFound(
                    f"network {request.network!r} (SOCKETPLANE_NETWORK) does not exist: create "
                    f"it with `powerplane network create {request.network} CIDR`, or use "
                    f"SOCKETPLANE_CIDR") from None
            if request.subnet is not None and request.subnet != network.subnet:
                raise BadRequest(
                    f"SOCKETPLANE_NETWORK={request.network} has subnet {network.cidr}, but "
                    f"SOCKETPLANE_CIDR={request.cidr} asks for {request.subnet}: give one or "
                    f"make them agree")
            return network
        assert request.subnet is not None
        return await self._state.networks.for_subnet(request.subnet)

    async def attach(self, request: CreateRequest) -> Attachment:
        """Claim the host ports, find (or create) the network, then make a started, plugged
        sandbox with an address on it; undo everything if any step fails."""
        # Before anything is written: a create refused for a data plane that never came up
        # leaves not even the network it named.
        if self._readiness is not None:
            await self._readiness.wait_for(DATAPLANE, self._settings.dataplane_wait)
        if request.groups:
            # A consistent read, before anything is claimed: an unknown group leaves nothing.
            await self._state.groups.require(request.groups)
        # Ports before the network, for the same reason: a taken port leaves nothing behind.
        claim = await self._ports.claim(request.ports, image=request.image,
                                        endpoint=(request.app_name or "").lstrip("/") or None)
        try:
            network = await self.resolve_network(request.overlay)
            if network.internal and request.ports.publishes:
                raise BadRequest(
                    f"network {network.name} is internal: containers on an internal network "
                    "have no published ports (-p/-P); reach them from the network itself")
            sandbox_id = await self._create_sandbox(request, network)
        except BaseException:
            self._ports.release(claim)
            raise
        self._port_claims[sandbox_id] = claim
        ip: str | None = None
        try:
            ip = await self._state.addresses.allocate(network, container=sandbox_id,
                                                    host=self.host_id)
            # Held so the agent's re-plug on the sandbox's `start` event waits for this plug.
            async with self._locks.hold(sandbox_id):
                await self._docker.start(sandbox_id)
                pid = await self._docker.running_pid(sandbox_id)
                if pid is None:
                    raise PowerplaneError(
                        f"sandbox {sandbox_id[:12]} stopped right after it started")
                port = await self._dataplane.plug(container_id=sandbox_id, netns=pid,
                                                  network=network, ip=ip, groups=request.groups)
                self._plugged_pid[sandbox_id] = pid
        except BaseException:
            await asyncio.shield(self._undo(sandbox_id, network.name, ip))
            raise
        log.info("sandbox %s on %s holds %s", sandbox_id[:12], network.name, ip,
                 extra=logs.fields(container=sandbox_id, network=network.name))
        return Attachment(network=network, ip=ip, mac=port.mac, port=port.port,
                          sandbox_id=sandbox_id, ports=claim.ports,
                          hostname=request.hostname(sandbox_id), aliases=request.aliases,
                          groups=request.groups)

    async def _create_sandbox(self, request: CreateRequest, network: Network) -> str:
        labels = {
            LABEL_ROLE: SANDBOX_ROLE,
            LABEL_NETWORK: network.name,
            LABEL_HOST: self.host_id,
            # The sandbox's port carries them too: a sandbox re-plugged after a restart is
            # guarded again before its record is read.
            LABEL_GROUPS: ",".join(request.groups),
        }
        if request.app_name:
            labels[LABEL_APP_NAME] = request.app_name
        token = labels[LABEL_CREATION] = secrets.token_hex(8)
        spec = request.sandbox(image=self._settings.sandbox_image, labels=labels,
                               gateway=network.gateway)
        self._creating.add(token)
        try:
            sandbox_id = await self._docker.create_sandbox(spec)
            self._pending[sandbox_id] = time.monotonic() + PENDING_GRACE_SECONDS
        finally:
            self._creating.discard(token)
        return sandbox_id

    async def commit(self, *, app_id: str, network: str, ip: str, mac: str, port: str,
                     sandbox_id: str, name: str = "", hostname: str = "",
                     aliases: tuple[str, ...] = (), groups: tuple[str, ...] = ()) -> None:
        """The app container exists: record the endpoint under its id, with the names the
        DNS server answers for it and the security groups it joined."""
        claim = self._port_claims.pop(sandbox_id, None)
        if claim is not None:
            self._ports.settle(claim)
        await self._state.endpoints.put(Endpoint(
            container_id=app_id, network=network, ip=ip, mac=mac, host=self.host_id,
            port=port, sandbox=sandbox_id, name=name.lstrip("/"), hostname=hostname,
            aliases=aliases, groups=groups))
        self._committed_at[sandbox_id] = time.monotonic()
        self._pending.pop(sandbox_id, None)
        self._sandbox_of_app[app_id] = sandbox_id
        if claim is not None and claim.ports:
            # Before the create returns, so the ports answer from the app's first moment.
            await self.publish_ports()

    async def publish_ports(self) -> int:
        """Forward exactly the ports this host's overlay apps publish; how many.

        Read from Docker (the apps' ports labels), so a port is forwarded while its app
        exists, stopped or running, like Docker keeps a stopped container's ports reserved.
        """
        async with self._publish_lock:
            apps = await self._docker.containers(label=LABEL_SANDBOX)
            sandboxes = {c.get("Id") for c in await self._docker.containers(
                label=f"{LABEL_ROLE}={SANDBOX_ROLE}")}
            # A container made from an image committed from an overlay app inherits its labels
            # but has no sandbox of its own: its "ports" are not ours to forward.
            apps = [app for app in apps
                    if (app.get("Labels") or {}).get(LABEL_SANDBOX) in sandboxes]
            forwards = [PublishedPort(*forward) for forward in published_ports(apps, self.host_id)]
            await self._dataplane.set_published(forwards)
            return len(forwards)

    def sandbox_of(self, app_id: str) -> str | None:
        """The sandbox of an app this process committed (by full id), if still attached."""
        return self._sandbox_of_app.get(app_id)

    async def abandon(self, sandbox_id: str, network: str, ip: str) -> None:
        """Docker refused the app: take the sandbox and its address back."""
        await self._undo(sandbox_id, network, ip)

    async def _undo(self, sandbox_id: str, network: str, ip: str | None) -> None:
        try:
            await self._remove_sandbox(sandbox_id, network, ip)
        except PowerplaneError as exc:
            # Reconciliation will finish the job; the original error is what the user needs.
            log.warning("undo of sandbox %s incomplete (%s); reconciliation will retry",
                        sandbox_id[:12], exc,
                        extra=logs.fields(container=sandbox_id, network=network))
        finally:
            self._pending.pop(sandbox_id, None)

    async def _remove_sandbox(self, sandbox_id: str, network: str, ip: str | None) -> None:
        claim = self._port_claims.pop(sandbox_id, None)
        if claim is not None:
            self._ports.release(claim)
        async with self._locks.hold(sandbox_id):
            self._plugged_pid.pop(sandbox_id, None)
            self._committed_at.pop(sandbox_id, None)
            await self._dataplane.unplug(sandbox_id)
            await self._docker.remove(sandbox_id)
            if ip is not None:
                await self.release_if_owned(network, ip, sandbox_id)

    async def remove_orphan_sandbox(self, sandbox_id: str, network: str) -> None:
        """A sandbox no app uses: unplug and remove it and release whatever address it holds."""
        ip = await self._address_of(network, sandbox_id) if network else None
        await self._remove_sandbox(sandbox_id, network, ip)

    async def release_if_owned(self, network: str, ip: str, owner: str) -> None:
        """Release ``ip`` unless it has been handed to someone else since."""
        await self._state.addresses.release_if_owned(network, ip, owner)

    async def detach(self, endpoint: Endpoint) -> None:
        """The app is gone: unplug, remove its sandbox, release the address, drop the record."""
        self._sandbox_of_app.pop(endpoint.container_id, None)
        await self._remove_sandbox(endpoint.sandbox, endpoint.network, endpoint.ip)
        await self._state.endpoints.delete(endpoint.container_id)
        try:
            await self.publish_ports()  # its ports, if it had any, stop forwarding
        except PowerplaneError as exc:
            log.warning("ports of %s still forwarded (%s); reconciliation will retry",
                        endpoint.container_id[:12], exc, extra=_about(endpoint))
        log.info("released %s on %s (container %s)", endpoint.ip, endpoint.network,
                 endpoint.container_id[:12], extra=_about(endpoint))

    async def detach_app(self, app_id: str) -> bool:
        """Detach the endpoint recorded for ``app_id``, if any; True when there was one."""
        endpoint = await self._state.endpoints.get(app_id)
        if endpoint is None or endpoint.host != self.host_id:
            return False
        await self.detach(endpoint)
        return True

    async def ensure_sandbox_running(self, sandbox_id: str) -> None:
        """Start a stopped sandbox (host reboot, daemon restart) and wire its new namespace."""
        info = await self._docker.inspect(sandbox_id)
        if info is None:
            raise BadRequest(f"the network sandbox {sandbox_id[:12]} of this container is gone; "
                             "remove the container and create it again")
        state = info["State"]
        if state.get("Running") and state.get("Pid") == self._plugged_pid.get(sandbox_id):
            return  # plugged into this very namespace by this process; nothing to repair
        if not state.get("Running"):
            await self._docker.start(sandbox_id)
        await self.replug(sandbox_id, info["Config"].get("Labels") or {})

    async def replug(self, sandbox_id: str, labels: Mapping[str, str], *,
                     fresh: bool = False) -> None:
        """Plug a running sandbox again from its labels; a no-op when nothing changed.

        ``fresh``: the port is known to be dead (its veth is gone), so start from nothing even
        when this process plugged the sandbox's current namespace itself.
        """
        network_name = labels.get(LABEL_NETWORK)
        if not network_name:
            return
        async with self._locks.hold(sandbox_id):
            pid = await self._docker.running_pid(sandbox_id)
            if pid is None:
                return
            network = await self._state.networks.get(network_name)
            ip = await self._address_of(network.name, sandbox_id)
            if ip is None:
                log.warning("sandbox %s holds no address on %s; leaving it to reconciliation",
                            sandbox_id[:12], network.name,
                            extra=logs.fields(container=sandbox_id, network=network.name))
                return
            if fresh and self._plugged_pid.get(sandbox_id) == pid:
                # Plugged into this very namespace, maybe by a `start` event while the caller
                # looked: dead only if the veth is still missing now.
                fresh = port_name(sandbox_id) not in await self._dataplane.port_links()
            if fresh or self._plugged_pid.get(sandbox_id) != pid:
                # A new namespace (the sandbox restarted): its old veth died with the old one,
                # and the bridge keeps a port for a device that is gone. Start from nothing.
                await self._dataplane.unplug(sandbox_id)
            await self._dataplane.plug(container_id=sandbox_id, netns=pid, network=network,
                                       ip=ip, groups=groups_label(labels))
            self._plugged_pid[sandbox_id] = pid

    async def _address_of(self, network: str, sandbox_id: str) -> str | None:
        try:
            addresses = await self._state.addresses.of_network(network)
        except NetworkNotFound:
            return None
        for ip, record in addresses.items():
            if record.container == sandbox_id:
                return ip
        return None


def _about(endpoint: Endpoint) -> dict[str, str]:
    return logs.fields(container=endpoint.container_id, network=endpoint.network)
