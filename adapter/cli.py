"""The ``powerplane`` command line: parses arguments and hands over to one command module.

Each command lives in ``adapter/commands/<name>.py`` and exposes ``register(subparsers)``, which
adds its parser and sets ``handler``: an async function ``(args, environ) -> exit code``.
Errors from the tree in ``adapter.errors`` print as one line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import uvloop

from adapter import __version__, logs
from adapter.errors import PowerplaneError

Handler = Callable[[argparse.Namespace, Mapping[str, str]], Coroutine[Any, Any, int]]

# Modules under adapter.commands, in the order `--help` lists them.
COMMAND_MODULES = ("serve", "network", "group", "ip", "hosts", "status", "doctor")

DESCRIPTION = """\
Multi-host overlay networking for Docker.

Run `powerplane serve` on every host and point DOCKER_HOST at it. A container created with
-e SOCKETPLANE_CIDR=10.0.6.0/24 (or -e SOCKETPLANE_NETWORK=NAME) joins a virtual network that
spans every host; anything else passes through to dockerd untouched.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="powerplane",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"powerplane {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"adapter.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"adapter.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def configure_logging(level: str, log_format: str = "text") -> None:
    logs.configure(level, log_format)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    env = os.environ if environ is None else environ
    try:
        # libuv's loop spends far less per wake-up than asyncio's own: the proxy's latency.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(handler(args, env))
    except PowerplaneError as exc:
        print(f"powerplane: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
