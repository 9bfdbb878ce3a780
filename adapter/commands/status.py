"""``powerplane status``: is this host's overlay working, and what does it hold?

Checks each dependency on its own, so one that is down does not hide the others: Docker
(the upstream daemon), Consul, Open vSwitch (bridge, tunnels, container ports), and lists the
endpoints Consul records for this host. Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Mapping
from typing import Any

from adapter.commands.network import format_table
from adapter.commands.serve import STATUS_FILE_NAME
from adapter.errors import PowerplaneError
from adapter.model import Endpoint
from adapter.network.readiness import StatusFile
from adapter.network.state import State
from adapter.settings import CONSUL_OPTIONS, SERVE_OPTIONS, Option, add_options, load_settings

STATUS_FIELDS = {"docker_url", "ovsdb", "bridge", "host_id", "underlay_ip", "datapath", "mtu",
                 "run_dir"}
STATUS_OPTIONS: tuple[Option, ...] = CONSUL_OPTIONS + tuple(
    option for option in SERVE_OPTIONS if option.field in STATUS_FIELDS)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status", help="check Docker, Consul and OVS on this host; list tunnels and endpoints",
        description="Check this host's Docker daemon, Consul and Open vSwitch, and list its "
                    "tunnels and overlay endpoints. Takes the same settings as `serve`.",
    )
    add_options(parser, STATUS_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_status)


async def _check(report: dict[str, Any], name: str, probe: Awaitable[Any]) -> Any:
    try:
        result = await probe
    except PowerplaneError as exc:
        report[name] = {"ok": False, "error": str(exc)}
        return None
    report[name] = {"ok": True}
    return result


async def _dns(serve: Mapping[str, Any] | None,
               endpoints: list[Endpoint] | None) -> list[dict[str, Any]]:
    """The DNS server on each gateway as serve reports it, asked whether it answers, with the
    number of names it serves (from Consul, as its cache holds them; None without Consul)."""
    # Imported here: see _status.
    from adapter.network.dns_forward import probe
    from adapter.network.names import index

    names = index(endpoints or [])
    found: list[dict[str, Any]] = []
    for entry in (serve or {}).get("dns") or []:
        network, address = str(entry.get("network", "")), str(entry.get("address", ""))
        if entry.get("error"):
            condition = f"FAIL: {entry['error']}"
        else:
            condition = "answering" if await probe(address) else "FAIL: no answer"
        records = len(names[network].forward) if network in names else 0
        found.append({"network": network, "address": address, "state": condition,
                      "records": None if endpoints is None else records})
    return found


async def _status(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    # Imported here: see adapter/commands/serve.py.
    from adapter.dataplane.switch import DataPlane
    from adapter.network.docker_api import Docker

    settings = load_settings(args, environ, STATUS_OPTIONS)
    state, docker, dataplane = State(settings), Docker(settings.docker_url), DataPlane(settings)
    checks: dict[str, Any] = {}
    serve = StatusFile(settings.run_dir / STATUS_FILE_NAME).read()
    if serve is None:
        checks["serve"] = {"ok": False, "error": f"not running (no live {STATUS_FILE_NAME} in "
                                                 f"{settings.run_dir})"}
    elif serve.get("state") != "ready":
        waiting = "; ".join(f"{part}: {why}" for part, why in
                            (serve.get("waiting_for") or {}).items())
        condition = str(serve.get("state") or "starting")
        checks["serve"] = {"ok": False, "state": condition,
                           "error": f"{condition}, waiting for {waiting or 'its parts'}"}
    else:
        checks["serve"] = {"ok": True, "state": "ready"}
    try:
        await _check(checks, "docker", docker.ping())
        await _check(checks, "consul", state.ping())
        tunnels = plugged = None
        if await _check(checks, "ovs", dataplane.ovs.bridge_exists(settings.bridge)) is False:
            checks["ovs"] = {"ok": False, "error": f"bridge {settings.bridge} does not exist "
                                                   "(is `powerplane serve` running?)"}
        if checks["ovs"]["ok"]:
            tunnels = await dataplane.tunnels()
            plugged = await dataplane.plugged()
        every = await state.endpoints.all() if checks["consul"]["ok"] else []
        endpoints = [e for e in every if e.host == settings.host_id]
        dns = await _dns(serve, every if checks["consul"]["ok"] else None)
    finally:
        await state.close()
        await docker.close()
        await dataplane.close()
    ok = all(check["ok"] for check in checks.values())
    if args.json:
        print(json.dumps({
            "host_id": settings.host_id, "ok": ok, "checks": checks,
            "overlay_mtu": (serve or {}).get("overlay_mtu"),
            "tunnels": [{"port": t.port, "host": t.host_id, "remote_ip": t.remote_ip,
                         "network": t.network, "vni": t.vni} for t in tunnels or []],
            "ports": [{"port": p.port, "container": p.container_id, "network": p.network,
                       "ip": p.ip} for p in plugged or []],
            "endpoints": [{"container": e.container_id, **e.to_json()} for e in endpoints],
            "dns": dns,
        }, indent=2))
        return 0 if ok else 1
    print(f"host {settings.host_id}")
    mtu = (serve or {}).get("overlay_mtu")
    for name, where in (("serve", f"pid {serve['pid']}" + (f", overlay MTU {mtu}" if mtu else "")
                         if serve else str(settings.run_dir)),
                        ("docker", settings.docker_url), ("consul", settings.consul_addr),
                        ("ovs", f"{settings.ovsdb} bridge {settings.bridge}")):
        check = checks[name]
        print(f"  {name:<7} {'ok  ' if check['ok'] else 'FAIL'} {where}"
              + ("" if check["ok"] else f": {check['error']}"))
    if tunnels is not None:
        print(f"\ntunnels ({len(tunnels)})")
        if tunnels:
            print(format_table(["PORT", "HOST", "REMOTE IP", "NETWORK", "VNI"],
                               [[t.port, t.host_id, t.remote_ip, t.network, str(t.vni)]
                                for t in tunnels]))
    print(f"\ndns ({len(dns)})")
    if dns:
        print(format_table(["NETWORK", "ADDRESS", "STATE", "RECORDS"],
                           [[d["network"], f"{d['address']}:53", d["state"],
                             "?" if d["records"] is None else str(d["records"])]
                            for d in dns]))
    print(f"\nendpoints ({len(endpoints)})")
    if endpoints:
        print(format_table(["CONTAINER", "NETWORK", "IP", "PORT", "SANDBOX", "GROUPS"],
                           [[e.container_id[:12], e.network, e.ip, e.port, e.sandbox[:12],
                             ",".join(e.groups) or "-"] for e in endpoints]))
    return 0 if ok else 1
