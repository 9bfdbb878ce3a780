"""`powerplane serve`: the Docker API proxy and this host's runtime, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import sdnotify

from adapter.cli import configure_logging
from adapter.network.readiness import CONSUL, DATAPLANE, LISTENERS, Readiness, StatusFile
from adapter.settings import (
    CONSUL_OPTIONS,
    OBSERVABILITY_OPTIONS,
    SERVE_OPTIONS,
    Settings,
    add_options,
    load_settings,
)

if TYPE_CHECKING:
    from adapter.metrics import Metrics

log = logging.getLogger("powerplane.serve")

STATUS_FILE_NAME = "status.json"
OPTIONS = (*SERVE_OPTIONS, *OBSERVABILITY_OPTIONS, *CONSUL_OPTIONS)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the Docker API proxy and host agent",
        description="Listen like dockerd, relay every call to the real daemon, and run the "
                    "hooks named in adapters.yml (Powerstrip format) on the calls they match.",
    )
    add_options(parser, OPTIONS)
    parser.set_defaults(handler=serve)


async def serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    # Imported here, not at the top: every `powerplane` command registers this module's parser,
    # and the proxy, hooks and data plane would cost the others most of a second to import.
    from adapter.hooks.network import HOOK_NAME, NetworkHook
    from adapter.network.runtime import host_runtime
    from adapter.proxy.adapters_config import load_adapters_config
    from adapter.proxy.hookchain import HookChain
    from adapter.proxy.listeners import INSECURE_TCP_FLAG, Listeners, plan_listeners
    from adapter.proxy.relay import make_proxy

    settings = load_settings(args, environ, OPTIONS)
    configure_logging(settings.log_level, settings.log_format)
    # Every configuration problem is found before anything starts.
    addresses, tls = plan_listeners(settings)
    adapters_config = (
        load_adapters_config(settings.adapters_file) if settings.adapters_file else None
    )
    if adapters_config is not None:
        HookChain.check_names(adapters_config, (HOOK_NAME,))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listeners = Listeners()
    readiness = Readiness((LISTENERS, DATAPLANE, CONSUL))
    status_file = StatusFile(settings.run_dir / STATUS_FILE_NAME)
    readiness.observe(_ReadinessReporter(sdnotify.SystemdNotifier()))
    readiness.observe(status_file.write)
    status_file.write(readiness)
    try:
        async with AsyncExitStack() as stack:
            metrics = await _metrics(settings, readiness, stack)
            runtime = await stack.enter_async_context(
                host_runtime(settings, readiness, metrics))
            proxy = await stack.enter_async_context(make_proxy(
                settings,
                builtin_hooks={HOOK_NAME: NetworkHook(runtime.endpoints, runtime.docker)},
                adapters_config=adapters_config, observer=metrics))
            await listeners.start(addresses, tls, proxy.accept)
            for name in listeners.bound:
                if not name.startswith("tcp"):
                    log.info("listening on %s (group %s, mode 0660)", name,
                             listeners.socket_group_name)
                elif tls:
                    log.info("listening on %s (TLS, client certificates required)", name)
                else:
                    log.warning("listening on %s WITHOUT TLS (%s): every local user who "
                                "connects is root on this host", name, INSECURE_TCP_FLAG)
            log.info("relaying to dockerd at %s; hooks from %s", settings.docker_url,
                     settings.adapters_file or "the built-in default")
            readiness.mark_up(LISTENERS)
            await stop.wait()
            log.info("stopping")
            await listeners.close()
    finally:
        status_file.remove()
        await listeners.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


async def _metrics(settings: Settings, readiness: Readiness,
                   stack: AsyncExitStack) -> Metrics | None:
    """With --metrics-addr, the registry and its listener (closed with ``stack``)."""
    if settings.metrics_addr is None:
        return None
    from adapter.metrics import Metrics, metrics_listener  # the library only when asked for

    metrics = Metrics()

    def report(readiness: Readiness) -> None:
        metrics.readiness({part: readiness.is_up(part) for part in readiness.parts})

    report(readiness)
    readiness.observe(report)
    await stack.enter_async_context(metrics_listener(metrics, *settings.metrics_addr))
    return metrics


class _ReadinessReporter:
    """Says once, in the log and to systemd (Type=notify), when every part of serve is up."""

    def __init__(self, notifier: sdnotify.SystemdNotifier) -> None:
        self._notifier = notifier
        self._announced = False

    def __call__(self, readiness: Readiness) -> None:
        pending = readiness.pending()
        if pending:
            self._notifier.notify("STATUS=waiting for " + ", ".join(
                f"{part} ({readiness.waiting_reasons[part]})"
                if part in readiness.waiting_reasons else part for part in pending))
            return
        if not self._announced:
            self._announced = True
            log.info("ready in %.2f s: listeners, Consul session and data plane are up",
                     readiness.seconds_since_start())
            self._notifier.notify("READY=1")
        self._notifier.notify("STATUS=ready")
