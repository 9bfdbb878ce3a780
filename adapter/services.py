"""Everything `powerplane serve` runs beside the proxy, opened and closed as one unit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from adapter.agent import HostAgent
from adapter.dataplane import DataPlane
from adapter.docker_api import Docker
from adapter.endpoints import EndpointManager
from adapter.errors import PowerplaneError
from adapter.hooks import BuiltinHook
from adapter.hooks.network import HOOK_NAME, NetworkHook
from adapter.settings import Settings
from adapter.state import State
from adapter.tunnels import tunnel_agent

log = logging.getLogger(__name__)

DATAPLANE_RETRY_SECONDS = 2.0


@asynccontextmanager
async def host_runtime(settings: Settings) -> AsyncIterator[Mapping[str, BuiltinHook]]:
    """Start this host's background services; yield the built-in hooks by name.

    The proxy's hook chain resolves adapter names from adapters.yml against this mapping
    before it tries them as external adapters. Everything is stopped on exit.

    With an underlay IP the host registers in Consul and follows the tunnel mesh; without one it
    is a single-host overlay. Neither Consul nor OVS has to be up for the proxy to serve plain
    Docker traffic: network operations fail with a clear message until they are.
    """
    async with AsyncExitStack() as stack:
        state = State(settings)
        stack.push_async_callback(state.close)
        docker = Docker(settings.docker_url)
        stack.push_async_callback(docker.close)
        if settings.underlay_ip:
            dataplane = await stack.enter_async_context(tunnel_agent(settings))
            ready = asyncio.get_running_loop().create_future()
            ready.set_result(None)
        else:
            dataplane = DataPlane(settings)
            stack.push_async_callback(dataplane.close)
            ready = asyncio.ensure_future(_start_when_reachable(dataplane))
        endpoints = EndpointManager(settings, state=state, dataplane=dataplane, docker=docker,
                                    dataplane_ready=ready)
        agent = HostAgent(settings, state=state, dataplane=dataplane, docker=docker,
                          endpoints=endpoints)

        async def run_agent() -> None:
            await ready
            await agent.run()

        task = asyncio.create_task(run_agent(), name="powerplane-host-agent")
        stack.push_async_callback(_cancel, task)
        stack.push_async_callback(_cancel, ready)
        yield {HOOK_NAME: NetworkHook(endpoints, docker)}


async def _start_when_reachable(dataplane: DataPlane) -> None:
    while True:
        try:
            await dataplane.start()
            return
        except PowerplaneError as exc:
            log.warning("data plane not ready (%s); retrying in %ss", exc,
                        DATAPLANE_RETRY_SECONDS)
            await asyncio.sleep(DATAPLANE_RETRY_SECONDS)


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, PowerplaneError):
        await task
