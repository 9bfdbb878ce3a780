"""``powerplane hosts``: the hosts currently registered in Consul (live ``powerplane serve``s)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

from adapter.commands.network import format_table
from adapter.network.state import State
from adapter.settings import CONSUL_OPTIONS, add_options, load_settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "hosts", help="list the registered hosts",
        description="List the hosts whose `powerplane serve` is alive (registered in Consul).",
    )
    add_options(parser, CONSUL_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_hosts)


async def _hosts(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    state = State(load_settings(args, environ, CONSUL_OPTIONS))
    try:
        hosts = await state.hosts.all()
    finally:
        await state.close()
    if args.json:
        print(json.dumps([{"host_id": h.host_id, **h.to_json()} for h in hosts], indent=2))
        return 0
    rows = [[h.host_id, h.underlay_ip, h.hostname, h.version] for h in hosts]
    print(format_table(["HOST", "UNDERLAY IP", "HOSTNAME", "VERSION"], rows))
    return 0
