"""Test-only host agent: ``adapter.services.host_runtime`` until SIGTERM, like ``serve`` runs it.

Run inside a lab host's namespace with ``python -m tests.lab.agent``; configured only through
``POWERPLANE_*`` environment variables, read by the same code the command line uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from adapter.cli import configure_logging
from adapter.services import host_runtime
from adapter.settings import CONSUL_OPTIONS, SERVE_OPTIONS, load_settings


async def main() -> None:
    settings = load_settings(argparse.Namespace(), os.environ, (*SERVE_OPTIONS, *CONSUL_OPTIONS))
    configure_logging(settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with host_runtime(settings):
        print("agent ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
