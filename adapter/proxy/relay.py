"""The transparent Docker API proxy: client connections relayed to dockerd, hooks run on some.

``DockerProxy`` accepts client connections (a listener calls ``accept``); each becomes a
``Session`` (``session``), the state machine in its socket callbacks that relays requests and
answers, hands hooked requests to ``hooked`` and hijacked streams to ``pipe``. Connections to
dockerd come from an ``UpstreamPool`` (``upstream``) that keeps idle ones for the next client.

Why callbacks rather than ``asyncio`` streams or ``aiohttp.web``: every task switch is a trip
round the event loop, and a proxy that adds two per request doubles dockerd's latency for small
calls; aiohttp's server re-parses the bytes after a non-websocket upgrade and de-chunks bodies,
which fights ``Upgrade: tcp`` and Docker's raw streams at every step. See docs/proxy.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiohttp

from adapter.proxy.adapters_config import DEFAULT_ADAPTERS_CONFIG, AdaptersConfig
from adapter.proxy.hookchain import HookChain
from adapter.proxy.observer import ProxyObserver
from adapter.proxy.powerstrip import BuiltinHook
from adapter.proxy.session import SESSION_LOGGER, Session
from adapter.proxy.upstream import UpstreamPool
from adapter.settings import Settings

JSON_LIMIT = 10 * 1024 * 1024


class DockerProxy:
    """Relays client connections to the Docker daemon at ``docker_url``, running hooks."""

    def __init__(self, docker_url: str, hook_chain: HookChain, *, json_limit: int = JSON_LIMIT,
                 observer: ProxyObserver | None = None):
        self.docker_url = docker_url
        self.hook_chain = hook_chain
        self.json_limit = json_limit
        self.pool = UpstreamPool(docker_url)
        self.observer = observer
        # Read once: a line per request only at debug level, and no level check per request.
        self.log_requests = logging.getLogger(SESSION_LOGGER).isEnabledFor(logging.DEBUG)
        # Request ids: this proxy's tag and a count, so ids stay unique across restarts in one
        # log and cost a counter step per request (the text is made only when a line needs it).
        self.request_tag = secrets.token_hex(2)
        self.request_numbers = itertools.count(1)
        self._sessions: set[Session] = set()

    @property
    def upstream_name(self) -> str:
        return self.pool.upstream_name

    def accept(self) -> asyncio.Protocol:
        """A protocol for one new client connection (what a listener's server calls)."""
        session = Session(self)
        self._sessions.add(session)
        return session.client

    def forget(self, session: Session) -> None:
        self._sessions.discard(session)

    async def close(self) -> None:
        """Cut every open client connection (listeners must be closed first)."""
        sessions = list(self._sessions)
        tasks = [task for session in sessions for task in session.shut_down()]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sessions.clear()
        self.pool.close()


@asynccontextmanager
async def make_proxy(
    settings: Settings,
    *,
    builtin_hooks: Mapping[str, BuiltinHook],
    adapters_config: AdaptersConfig | None = None,
    json_limit: int = JSON_LIMIT,
    observer: ProxyObserver | None = None,
) -> AsyncIterator[DockerProxy]:
    """A proxy for ``settings.docker_url`` with hooks from ``adapters_config``; ``observer``
    hears of every answer and hook call.

    Without a config the built-in default is used, skipping hooks that are not registered. The
    HTTP client session for external adapters lives exactly as long as the proxy.
    """
    config = adapters_config or DEFAULT_ADAPTERS_CONFIG
    async with aiohttp.ClientSession() as session:
        chain = HookChain.build(config, builtin_hooks, session,
                                skip_unknown=adapters_config is None, observer=observer)
        proxy = DockerProxy(settings.docker_url, chain, json_limit=json_limit, observer=observer)
        try:
            yield proxy
        finally:
            await proxy.close()
