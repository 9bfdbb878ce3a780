"""`powerplane serve`: the Docker API proxy and this host's runtime, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping
from typing import Any

from adapter.adapters_config import load_adapters_config
from adapter.cli import configure_logging
from adapter.listeners import Listeners, plan_listeners
from adapter.proxy import make_proxy
from adapter.services import host_runtime
from adapter.settings import CONSUL_OPTIONS, SERVE_OPTIONS, add_options, load_settings

log = logging.getLogger("powerplane.serve")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the Docker API proxy and host agent",
        description="Listen like dockerd, relay every call to the real daemon, and run the "
                    "hooks named in adapters.yml (Powerstrip format) on the calls they match.",
    )
    add_options(parser, (*SERVE_OPTIONS, *CONSUL_OPTIONS))
    parser.set_defaults(handler=serve)


async def serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = load_settings(args, environ, (*SERVE_OPTIONS, *CONSUL_OPTIONS))
    configure_logging(settings.log_level)
    # Every configuration problem is found before anything starts.
    addresses, tls = plan_listeners(settings)
    adapters_config = (
        load_adapters_config(settings.adapters_file) if settings.adapters_file else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listeners = Listeners()
    try:
        async with (
            host_runtime(settings) as builtin_hooks,
            make_proxy(settings, builtin_hooks=builtin_hooks,
                       adapters_config=adapters_config) as proxy,
        ):
            await listeners.start(addresses, tls, proxy.accept)
            for name in listeners.bound:
                log.info("listening on %s%s", name,
                         " (TLS, client certificates required)"
                         if tls and name.startswith("tcp") else "")
            log.info("relaying to dockerd at %s; hooks from %s", settings.docker_url,
                     settings.adapters_file or "the built-in default")
            await stop.wait()
            log.info("stopping")
            await listeners.close()
    finally:
        await listeners.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
