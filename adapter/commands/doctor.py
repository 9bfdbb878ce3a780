"""``powerplane doctor``: what is wrong with this host's overlay, and what to do about it.

Prints one line per check (a problem with the thing to do under it), then a summary; ``--json``
prints the same as a list. Exits 0 only when no check found a problem, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from adapter.commands.serve import STATUS_FILE_NAME
from adapter.network.findings import Finding, Status, healthy, summary
from adapter.settings import CONSUL_OPTIONS, SERVE_OPTIONS, Option, add_options, load_settings

DOCTOR_FIELDS = {"listen", "docker_url", "ovsdb", "bridge", "host_id", "underlay_ip",
                 "underlay_interface", "datapath", "mtu", "run_dir", "reconcile_interval"}
DOCTOR_OPTIONS: tuple[Option, ...] = CONSUL_OPTIONS + tuple(
    option for option in SERVE_OPTIONS if option.field in DOCTOR_FIELDS)
# Seconds a Docker call may take before doctor calls Docker unresponsive.
DOCKER_TIMEOUT = 8

DESCRIPTION = """\
Diagnose this host and say what to fix. Takes the same settings as `serve` (flags or
POWERPLANE_* variables); run it as root, where serve runs. Checks:

  serve          powerplane serve runs here and is ready
  DOCKER_HOST    points at a Powerplane listener (--listen), not at dockerd's own socket
  docker         dockerd answers at --docker
  consul         the Consul agent answers and its cluster has a leader
  clock          this host's clock agrees with the Consul agent's (its HTTP Date header)
  registration   hosts/<host-id> exists, is held by a live session, has this underlay address
  ovs            OVSDB answers; the --datapath and the VXLAN (and, for netdev, AF_XDP) port
                 types are supported; shows the version
  ovs-vswitchd   the switch daemon itself answers on its control socket
  ovs bridge     the bridge exists with the right datapath; OVS can open every port's device
  kernel         system datapath: openvswitch and vxlan modules; netdev: /dev/net/tun and
                 AF_XDP sockets
  ports vs state every container port on the bridge has an endpoint record, and back
  tunnels        a tunnel to every registered peer, none to hosts that left
  stale records  this host's endpoint records name containers Docker has; every address
                 this host holds belongs to an endpoint
  peer NAME      the peer's underlay address answers ping from --underlay-ip, and packets of
                 overlay MTU + 50 bytes (VXLAN) pass with Don't Fragment set; if not, the
                 path MTU found and the overlay MTU to use

Every check is bounded in time: a daemon that does not answer is reported, not waited for.
Exit status: 0 when nothing is wrong, 1 otherwise.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor", help="diagnose this host: what is wrong and what to do",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, DOCTOR_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(handler=_doctor)


def exit_code(findings: Sequence[Finding]) -> int:
    return 0 if healthy(findings) else 1


def _marks(stream: TextIO) -> dict[Status, str]:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    if encoding.startswith("utf"):
        return {Status.OK: "✔", Status.PROBLEM: "✘", Status.SKIPPED: "-"}
    return {Status.OK: "ok", Status.PROBLEM: "XX", Status.SKIPPED: "--"}


def render_text(host_id: str, findings: Sequence[Finding], stream: TextIO) -> str:
    """The findings as lines for a person: mark, check, what is wrong, then what to do."""
    marks = _marks(stream)
    arrow = "→" if marks[Status.OK] == "✔" else "->"
    lines = [f"powerplane doctor: host {host_id}"]
    for finding in findings:
        mark = marks[finding.status]
        if finding.status is Status.PROBLEM:
            lines.append(f"{mark} {finding.check}: {finding.problem}")
            lines.append(f"    {arrow} {finding.fix}")
        elif finding.status is Status.SKIPPED:
            lines.append(f"{mark} {finding.check}: skipped, {finding.detail}")
        else:
            lines.append(f"{mark} {finding.check}" + (f": {finding.detail}"
                                                      if finding.detail else ""))
    lines.append(summary(findings))
    return "\n".join(lines)


def render_json(host_id: str, findings: Sequence[Finding]) -> str:
    return json.dumps({"host_id": host_id, "ok": healthy(findings),
                       "findings": [f.to_json() for f in findings]}, indent=2)


async def _doctor(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    # Imported here, like every command's heavy parts: `powerplane --help` stays fast.
    from adapter.dataplane.switch import DataPlane
    from adapter.network.diagnosis import Diagnosis
    from adapter.network.docker_api import Docker
    from adapter.network.readiness import StatusFile
    from adapter.network.state import State

    # Every failure is a finding; the libraries' own log lines would only repeat them.
    logging.basicConfig(level=logging.CRITICAL)
    settings = load_settings(args, environ, DOCTOR_OPTIONS)
    status_path = settings.run_dir / STATUS_FILE_NAME
    state = State(settings)
    docker = Docker(settings.docker_url, timeout=DOCKER_TIMEOUT)
    dataplane = DataPlane(settings)
    try:
        findings = await Diagnosis(
            settings, environ, serve_status=StatusFile(status_path).read(),
            status_path=status_path, state=state, docker=docker, dataplane=dataplane,
        ).run()
    finally:
        await state.close()
        await docker.close()
        await dataplane.close()
    if args.json:
        print(render_json(settings.host_id, findings))
    else:
        print(render_text(settings.host_id, findings, sys.stdout))
    return exit_code(findings)
