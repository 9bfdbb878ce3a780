"""Test-only host agent: ``host_runtime`` (adapter.network.runtime) until SIGTERM, as serve runs it.

Run inside a lab host's namespace with ``python -m tests.lab.agent``; configured only through
``POWERPLANE_*`` environment variables, read by the same code the command line uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from adapter.cli import configure_logging
from adapter.network.readiness import CONSUL, DATAPLANE, Readiness
from adapter.network.runtime import host_runtime
from adapter.settings import CONSUL_OPTIONS, SERVE_OPTIONS, load_settings


async def main() -> None:
    settings = load_settings(argparse.Namespace(), os.environ, (*SERVE_OPTIONS, *CONSUL_OPTIONS))
    configure_logging(settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    readiness = Readiness((CONSUL, DATAPLANE))
    async with host_runtime(settings, readiness):
        # Ready as serve is: the bridge exists and this host is registered in Consul.
        await readiness.wait_all()
        print("agent ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
