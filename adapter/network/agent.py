"""The host agent: keeps this host's endpoints true to Docker, Consul and OVS.

Two loops run inside ``powerplane serve``:

* events: Docker's event stream. An overlay app destroyed by any client (the proxy, ``--rm``,
  or someone talking to dockerd directly) is released at once; a sandbox started by a restart
  policy or a daemon restart is wired again.
* reconcile: at start-up and every ``reconcile_interval`` seconds, compares the three sources
  and converges: endpoints without an app, sandboxes without an app, OVS ports without a
  sandbox and addresses without a sandbox are released; apps that lost their record or their
  port get them back. A create in flight in this process is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from adapter import logs
from adapter.dataplane.switch import port_name
from adapter.errors import PowerplaneError
from adapter.network.create_rewrite import (
    LABEL_HOST,
    LABEL_HOSTNAME,
    LABEL_IP,
    LABEL_MAC,
    LABEL_NETWORK,
    LABEL_PORT,
    LABEL_ROLE,
    LABEL_SANDBOX,
    SANDBOX_ROLE,
    aliases_label,
    groups_label,
)
from adapter.network.docker_api import Docker
from adapter.network.endpoints import DataPlaneLike, EndpointManager
from adapter.network.state import State
from adapter.settings import Settings

if TYPE_CHECKING:
    from adapter.metrics import Metrics

log = logging.getLogger(__name__)

EVENT_RETRY_SECONDS = 2.0


@dataclass(slots=True)
class ReconcileReport:
    """What one reconciliation changed; empty when the host was already in line."""

    released_endpoints: list[str] = field(default_factory=list)
    removed_sandboxes: list[str] = field(default_factory=list)
    removed_ports: list[str] = field(default_factory=list)
    released_addresses: list[str] = field(default_factory=list)
    restored_endpoints: list[str] = field(default_factory=list)
    replugged: list[str] = field(default_factory=list)
    removed_veths: list[str] = field(default_factory=list)
    restored_bridge: bool = False
    gateways: list[str] = field(default_factory=list)
    detached_floating: list[str] = field(default_factory=list)
    published: int = 0  # ports forwarded after the pass (a count, not a change)

    def fixes(self) -> dict[str, int]:
        """How many things of each kind this pass fixed (``published`` is no fix)."""
        counts = {f.name: len(value) if isinstance(value, list) else int(value)
                  for f in fields(self) if f.name != "published"
                  for value in (getattr(self, f.name),)}
        return {kind: count for kind, count in counts.items() if count}

    def changed(self) -> bool:
        return self.restored_bridge or any((
            self.released_endpoints, self.removed_sandboxes, self.removed_ports,
            self.released_addresses, self.restored_endpoints, self.replugged,
            self.removed_veths, self.gateways, self.detached_floating))


class HostAgent:
    def __init__(self, settings: Settings, *, state: State, dataplane: DataPlaneLike,
                 docker: Docker, endpoints: EndpointManager,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._state = state
        self._dataplane = dataplane
        self._docker = docker
        self._endpoints = endpoints
        self._reconcile_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    @property
    def _host(self) -> str:
        return self._settings.host_id

    async def run(self) -> None:
        """Both loops, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_events())
            group.create_task(self._reconcile_forever())

    async def _reconcile_forever(self) -> None:
        while True:
            began = time.monotonic()
            try:
                report = await self.reconcile()
                if report.changed():
                    log.info("reconciled: %s", report)
            except PowerplaneError as exc:
                log.warning("reconciliation postponed: %s", exc)
                report = None
            if self._metrics is not None:
                self._metrics.reconciled(time.monotonic() - began,
                                         None if report is None else report.fixes())
            self._wake.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
            # arrives as the event is set, and serve would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.reconcile_interval):
                    await self._wake.wait()

    async def _follow_events(self) -> None:
        # Where a re-opened stream resumes: the last event seen, so a restarted dockerd's
        # restarts of sandboxes (restart policies) are handled as if we had been listening.
        resume: float | None = None
        while True:
            try:
                if resume is None:
                    resume = time.time()
                else:
                    await self._docker.ping()
                    # Docker is back: what happened while it was away is reconciled now,
                    # not an interval later.
                    self._wake.set()
                async for event in self._docker.events(types=("destroy", "start"),
                                                       since=resume):
                    resume = max(resume, int(event.get("timeNano") or 0) / 1e9)
                    await self._on_event(event)
            except PowerplaneError as exc:
                log.warning("Docker events interrupted (%s); retrying in %ss", exc,
                            EVENT_RETRY_SECONDS)
            await asyncio.sleep(EVENT_RETRY_SECONDS)

    async def _on_event(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        container_id = str(actor.get("ID") or event.get("id") or "")
        labels: Mapping[str, str] = actor.get("Attributes") or {}
        action = event.get("Action") or event.get("status")
        try:
            if action == "destroy" and LABEL_SANDBOX in labels:
                await self._endpoints.detach_app(container_id)
                self._wake.set()  # what else it held (a floating address) is let go now
            elif action == "destroy" and labels.get(LABEL_ROLE) == SANDBOX_ROLE:
                self._wake.set()
            elif (action == "start" and labels.get(LABEL_ROLE) == SANDBOX_ROLE
                  and labels.get(LABEL_HOST) == self._host
                  and not self._endpoints.is_pending(container_id)):
                await self._endpoints.replug(container_id, labels)
        except PowerplaneError as exc:
            log.warning("handling %s of %s failed (%s); reconciliation will retry", action,
                        container_id[:12], exc, extra=logs.fields(
                            container=container_id, network=labels.get(LABEL_NETWORK)))
            self._wake.set()

    async def reconcile(self) -> ReconcileReport:
        async with self._reconcile_lock:
            return await self._reconcile()

    async def _reconcile(self) -> ReconcileReport:
        report = ReconcileReport()
        # First the switch itself: ports cannot be re-plugged on a bridge OVS lost.
        report.restored_bridge = await self._dataplane.ensure()
        # Creates go on while this runs, so the order of reads matters. Endpoint records first:
        # an app is created before its record is written, so every recorded app is in the
        # Docker listing that follows unless it is really gone. Sandboxes before apps: a
        # sandbox's app appears after it. And a sandbox whose app was committed after this
        # pass began is judged by the next pass, not by listings older than that commit.
        began = time.monotonic()
        endpoints = {e.container_id: e for e in await self._state.endpoints.all(host=self._host)}
        sandboxes = {c["Id"]: c for c in await self._docker.containers(
            label=f"{LABEL_ROLE}={SANDBOX_ROLE}")
            if (c.get("Labels") or {}).get(LABEL_HOST) == self._host}
        apps = {c["Id"]: c for c in await self._docker.containers(label=LABEL_SANDBOX)}
        sandbox_of_app = {app_id: (c.get("Labels") or {})[LABEL_SANDBOX]
                          for app_id, c in apps.items()}
        used_sandboxes = set(sandbox_of_app.values())

        for app_id, endpoint in endpoints.items():
            if app_id not in apps:
                await self._endpoints.detach(endpoint)
                report.released_endpoints.append(app_id[:12])

        for floating in await self._state.floating.all():
            # A floating address outlives its container only as a claim, detached.
            if (floating.attached and floating.host == self._host
                    and floating.container not in apps):
                await self._state.floating.detach(floating.ip, container=floating.container)
                report.detached_floating.append(floating.ip)

        for app_id, app in apps.items():
            labels = app.get("Labels") or {}
            if app_id in endpoints or labels.get(LABEL_HOST) != self._host:
                continue
            if labels[LABEL_SANDBOX] not in sandboxes:
                continue  # its sandbox is gone; nothing to record
            await self._endpoints.commit(
                app_id=app_id, network=labels.get(LABEL_NETWORK, ""), ip=labels.get(LABEL_IP, ""),
                mac=labels.get(LABEL_MAC, ""), port=labels.get(LABEL_PORT, ""),
                sandbox_id=labels[LABEL_SANDBOX], name=_listed_name(app),
                hostname=labels.get(LABEL_HOSTNAME, ""), aliases=aliases_label(labels),
                groups=groups_label(labels))
            report.restored_endpoints.append(app_id[:12])

        for sandbox_id, sandbox in sandboxes.items():
            labels = sandbox.get("Labels") or {}
            if sandbox_id in used_sandboxes or self._endpoints.is_pending(sandbox_id, labels,
                                                                          since=began):
                continue
            network = labels.get(LABEL_NETWORK, "")
            await self._endpoints.remove_orphan_sandbox(sandbox_id, network)
            report.removed_sandboxes.append(sandbox_id[:12])
        live = {s for s, sandbox in sandboxes.items() if s in used_sandboxes
                or self._endpoints.is_pending(s, sandbox.get("Labels") or {}, since=began)}

        plugged = {p.container_id: p for p in await self._dataplane.plugged()}
        # Read after the ports: a plug finishing in between shows a veth and no port, never
        # the reverse, and a veth of a live sandbox is never taken for a stray.
        veths = await self._dataplane.port_links()
        for container_id in plugged:
            # A sandbox made after the listing above may be plugged by now: pending, not orphan.
            if container_id not in live and not self._endpoints.is_pending(container_id,
                                                                            since=began):
                await self._dataplane.unplug(container_id)
                report.removed_ports.append(container_id[:12])
        for sandbox_id in live:
            if self._endpoints.is_pending(sandbox_id):
                continue
            port = plugged.get(sandbox_id)
            # A port whose veth is gone lost its namespace: the sandbox was started again
            # (daemon restart, reboot) while no `start` event reached us.
            dead = port is not None and port.port not in veths
            if (port is None or dead) and str(sandboxes[sandbox_id].get("State")) == "running":
                await self._endpoints.replug(sandbox_id, sandboxes[sandbox_id].get("Labels") or {},
                                             fresh=dead)
                report.replugged.append(sandbox_id[:12])
        owned = {port_name(s) for s in live | self._endpoints.pending(since=began)}
        for veth in sorted(veths - owned - {p.port for p in plugged.values()}):
            await self._dataplane.remove_port_link(veth)
            report.removed_veths.append(veth)

        networks = await self._state.networks.all()
        # After the ports are settled: a gateway follows the container ports of its network.
        report.gateways = await self._dataplane.set_gateways(networks)
        report.published = await self._endpoints.publish_ports()
        for network in networks:
            for ip, record in (await self._state.addresses.of_network(network.name)).items():
                if (record.host == self._host and record.container not in live
                        and not self._endpoints.is_pending(record.container, since=began)):
                    await self._endpoints.release_if_owned(network.name, ip, record.container)
                    report.released_addresses.append(f"{network.name}/{ip}")
        return report


def _listed_name(container: Mapping[str, Any]) -> str:
    """A listed container's name without Docker's '/'; "" when the listing has none."""
    names = container.get("Names")
    first = names[0] if isinstance(names, list) and names else ""
    return first.lstrip("/") if isinstance(first, str) else ""
