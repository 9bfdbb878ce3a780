"""This host's network control plane, started and stopped as one unit by ``serve``.

One start sequence, whether or not other hosts exist:

    1. bring up the data plane (bridge; with an underlay IP, the underlay too), retrying while
       Open vSwitch does not answer                                   → readiness "dataplane"
    2. register this host in Consul under a TTL session, retrying while Consul does not answer
                                                                      → readiness "consul"
    3. follow the host and network lists into VXLAN tunnels (only with an underlay IP: a host
       without one has no address for tunnels to end at), and run the host agent (Docker
       events and periodic reconciliation), and answer for the floating addresses attached to
       containers here, and answer DNS on every gateway address of this host from the name
       cache (which follows Consul on its own and keeps its last names while Consul is down),
       and keep the security groups and connected networks in the switch

Neither Consul nor OVS has to be up for the proxy to serve plain Docker traffic. A create that
arrives while the data plane is coming up waits for it (``dataplane_wait``), then fails with
an error naming what is not up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapter import __version__
from adapter.dataplane.switch import DataPlane
from adapter.errors import PowerplaneError
from adapter.model import Endpoint, Host
from adapter.network.agent import HostAgent
from adapter.network.dns_forward import Forwarder, host_upstreams, parse_upstream
from adapter.network.dns_server import DnsServer, ListenerState, Resolver
from adapter.network.docker_api import Docker
from adapter.network.endpoints import EndpointManager
from adapter.network.floating_host import FloatingFollower
from adapter.network.names import NameCache
from adapter.network.readiness import CONSUL, DATAPLANE, Readiness
from adapter.network.security import SecurityReconciler
from adapter.network.state import State
from adapter.network.tunnels import TunnelReconciler
from adapter.settings import Settings

if TYPE_CHECKING:
    from adapter.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_MIN_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class HostRuntime:
    """What the hooks need from a running host: its endpoints and its Docker daemon."""

    endpoints: EndpointManager
    docker: Docker
    readiness: Readiness


@asynccontextmanager
async def host_runtime(settings: Settings, readiness: Readiness,
                       metrics: Metrics | None = None) -> AsyncIterator[HostRuntime]:
    """Start this host's control plane in the background; stop all of it on exit.

    ``readiness`` must have the parts ``dataplane`` and ``consul``; they are marked up as the
    start sequence reaches them. ``metrics``, when given, is told what happens.
    """
    async with AsyncExitStack() as stack:
        state = State(settings, metrics)
        stack.push_async_callback(state.close)
        docker = Docker(settings.docker_url)
        stack.push_async_callback(docker.close)
        dataplane = DataPlane(settings)
        stack.push_async_callback(dataplane.close)
        if settings.cleanup:
            stack.push_async_callback(_clean_up, dataplane)
        endpoints = EndpointManager(settings, state=state, dataplane=dataplane, docker=docker,
                                    readiness=readiness)
        agent = HostAgent(settings, state=state, dataplane=dataplane, docker=docker,
                          endpoints=endpoints, metrics=metrics)

        async def endpoint_listings() -> AsyncIterator[list[Endpoint]]:
            # The names' own watch also counts endpoints for the metrics: no second one.
            async for listing in state.endpoints.watch():
                if metrics is not None:
                    metrics.endpoints_listed(*_endpoint_counts(listing, settings.host_id))
                yield listing

        names = NameCache(endpoint_listings)

        def dns_listening(listening: list[ListenerState]) -> None:
            readiness.set_details(dns=[{"network": entry.network, "address": entry.address,
                                        "error": entry.error} for entry in listening])

        async def dns() -> None:
            upstreams = (tuple(parse_upstream(u) for u in settings.dns_upstream)
                         or await host_upstreams())
            log.info("DNS: forwarding to %s", ", ".join(map(str, upstreams)) or "nobody")
            server = DnsServer(Resolver(names, Forwarder(upstreams)), dataplane,
                               interval=settings.reconcile_interval, on_change=dns_listening)
            await server.run()

        async def start_sequence() -> None:
            await _retry(dataplane.start, readiness, DATAPLANE,
                         f"Open vSwitch at {settings.ovsdb}, bridge {settings.bridge}")
            readiness.mark_up(DATAPLANE, overlay_mtu=dataplane.overlay_mtu())
            # Registered once the data plane is up: only then is the underlay MAC known.
            host = Host(settings.host_id, settings.underlay_ip or "", socket.gethostname(),
                        __version__, dataplane.underlay_mac)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_registered(state, host, readiness, dataplane,
                                              settings.reconcile_interval, metrics),
                                  name="powerplane-host-registration")
                tasks.create_task(agent.run(), name="powerplane-host-agent")
                tasks.create_task(FloatingFollower(settings, state=state,
                                                   dataplane=dataplane).run(),
                                  name="powerplane-floating")
                tasks.create_task(names.run(), name="powerplane-names")
                tasks.create_task(dns(), name="powerplane-dns")
                tasks.create_task(SecurityReconciler(
                    dataplane, host_id=settings.host_id, groups=state.groups,
                    endpoints=state.endpoints, networks=state.networks,
                    connections=state.connections,
                    interval=settings.reconcile_interval).run(), name="powerplane-security")

        task = asyncio.create_task(start_sequence(), name="powerplane-host-runtime")
        task.add_done_callback(_report_death)
        stack.push_async_callback(_cancel, task)
        yield HostRuntime(endpoints=endpoints, docker=docker, readiness=readiness)


async def _registered(state: State, host: Host, readiness: Readiness,
                      dataplane: DataPlane, interval: float, metrics: Metrics | None) -> None:
    """Hold this host's registration; with an underlay IP, keep the tunnels in line."""
    backoff = RETRY_MIN_SECONDS
    while True:
        try:
            registered = state.hosts.registered(
                host, on_registered=lambda: readiness.mark_up(CONSUL),
                on_failed=lambda reason: readiness.mark_waiting(CONSUL, reason))
            async with registered:
                if host.underlay_ip:
                    await TunnelReconciler(dataplane, hosts=state.hosts, networks=state.networks,
                                           holders=state.endpoints.hosts_holding,
                                           interval=interval, metrics=metrics).run()
                else:
                    await asyncio.Event().wait()  # nothing to follow; hold the session
        except PowerplaneError as exc:
            readiness.mark_waiting(CONSUL, str(exc))
            log.warning("host registration: %s; retrying in %.1f s", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_SECONDS)


def _endpoint_counts(listing: list[Endpoint],
                     host_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """Endpoints per network: this host's (0 where others have some), and everyone's."""
    everywhere: dict[str, int] = {}
    for endpoint in listing:
        everywhere[endpoint.network] = everywhere.get(endpoint.network, 0) + 1
    here = dict.fromkeys(everywhere, 0)
    for endpoint in listing:
        if endpoint.host == host_id:
            here[endpoint.network] += 1
    return here, everywhere


async def _retry(start: Callable[[], Awaitable[None]], readiness: Readiness, part: str,
                 what: str) -> None:
    backoff = RETRY_MIN_SECONDS
    while True:
        try:
            await start()
        except PowerplaneError as exc:
            readiness.mark_waiting(part, f"{what}: {exc}")
            log.warning("%s not ready (%s); retrying in %.1f s", part, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_SECONDS)
        else:
            log.info("%s ready", part)
            return



async def _clean_up(dataplane: DataPlane) -> None:
    try:
        await dataplane.remove_way_out()
    except PowerplaneError as exc:
        log.warning("--cleanup: %s", exc)


def _report_death(task: asyncio.Task[None]) -> None:
    # Everything in the sequence retries what it expects to fail; anything else ending it would
    # leave serve relaying with no agent behind it, which must not go unnoticed.
    if not task.cancelled() and task.exception() is not None:
        log.critical("the host runtime stopped: overlay networking no longer works on this host "
                     "until serve is restarted", exc_info=task.exception())


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, PowerplaneError):
        await task
