"""Everything `powerplane serve` runs beside the proxy, opened and closed as one unit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from adapter.hooks import BuiltinHook
from adapter.settings import Settings
from adapter.tunnels import tunnel_agent


@asynccontextmanager
async def host_runtime(settings: Settings) -> AsyncIterator[Mapping[str, BuiltinHook]]:
    """Start this host's background services; yield the built-in hooks by name.

    The proxy's hook chain resolves adapter names from adapters.yml against this mapping
    before it tries them as external adapters. Everything is stopped on exit.
    """
    hooks: dict[str, BuiltinHook] = {}
    async with AsyncExitStack() as stack:
        if settings.underlay_ip:
            await stack.enter_async_context(tunnel_agent(settings))
        yield hooks
