"""`powerplane doctor`'s parts that need no lab: wording, output, exit code, probes on loopback.

The checks against real daemons, one fault at a time, are in tests/e2e/test_doctor.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from adapter.cli import build_parser
from adapter.commands.doctor import exit_code, render_json, render_text
from adapter.dataplane import icmp, kernel
from adapter.dataplane.switch import DataPlane, PluggedPort, Tunnel, port_name
from adapter.errors import ConsulUnavailable
from adapter.model import Endpoint, Host, Network
from adapter.network.consul_kv import AgentStatus
from adapter.network.diagnosis import (
    Diagnosis,
    clock_finding,
    docker_host_finding,
    serve_finding,
)
from adapter.network.docker_api import Docker
from adapter.network.findings import Finding, Status, bounded, summary
from adapter.network.peer_paths import path_finding
from adapter.network.state import State
from adapter.settings import Settings
from tests.lab.netns import LabHost, Underlay

PROXY = "unix:///run/powerplane/docker.sock"
SETTINGS = Settings(listen=(PROXY,), docker_url="unix:///var/run/docker.sock")


class Stream(io.StringIO):
    def __init__(self, encoding: str) -> None:
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


FINDINGS = [
    Finding.good("docker", "unix:///var/run/docker.sock"),
    Finding.bad("ovs-vswitchd", "ovs-vswitchd does not answer", "start ovs-vswitchd"),
    Finding.skipped("tunnels", "needs both OVS and Consul"),
]


# -- output and exit code ------------------------------------------------------------------------


def test_text_names_each_problem_and_its_fix_then_a_summary() -> None:
    """A problem reads "✘ check: what is wrong" with "→ what to do" under it."""
    text = render_text("h1", FINDINGS, Stream("utf-8"))
    assert text.splitlines() == [
        "powerplane doctor: host h1",
        "✔ docker: unix:///var/run/docker.sock",
        "✘ ovs-vswitchd: ovs-vswitchd does not answer",
        "    → start ovs-vswitchd",
        "- tunnels: skipped, needs both OVS and Consul",
        "1 problem found (3 checks)",
    ]


def test_text_falls_back_to_ascii_on_a_terminal_that_is_not_utf8() -> None:
    text = render_text("h1", FINDINGS, Stream("ANSI_X3.4-1968"))
    assert "XX ovs-vswitchd: ovs-vswitchd does not answer" in text
    assert "    -> start ovs-vswitchd" in text and "ok docker" in text
    text.encode("ascii")


def test_exit_code_is_0_only_without_problems() -> None:
    """A skipped check hides no problem of its own: alone, it does not fail the run."""
    assert exit_code(FINDINGS) == 1
    assert exit_code([FINDINGS[0], FINDINGS[2]]) == 0
    assert exit_code([]) == 0
    assert summary([FINDINGS[0]]) == "all 1 checks passed"
    assert summary([FINDINGS[1], FINDINGS[1]]) == "2 problems found (2 checks)"


def test_json_lists_every_finding() -> None:
    document = json.loads(render_json("h1", FINDINGS))
    assert document["host_id"] == "h1" and document["ok"] is False
    assert [(f["check"], f["status"], f["ok"]) for f in document["findings"]] == [
        ("docker", "ok", True), ("ovs-vswitchd", "problem", False),
        ("tunnels", "skipped", True)]
    assert document["findings"][1]["fix"] == "start ovs-vswitchd"


def test_help_explains_every_check() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    text = subparsers.choices["doctor"].format_help()  # type: ignore[attr-defined]
    for check in ("serve", "DOCKER_HOST", "docker", "consul", "clock", "registration", "ovs",
                  "ovs-vswitchd", "ovs bridge", "kernel", "ports vs state", "tunnels",
                  "stale records", "peer NAME", "Exit status", "--json"):
        assert check in text, check


# -- checks that read no daemon ------------------------------------------------------------------


def test_docker_host_unset_or_at_dockerd_bypasses_the_proxy() -> None:
    unset = docker_host_finding({}, SETTINGS)
    assert unset.status is Status.PROBLEM and "not set" in unset.problem
    assert unset.fix == f"export DOCKER_HOST={PROXY}"
    direct = docker_host_finding({"DOCKER_HOST": "unix:///var/run/docker.sock"}, SETTINGS)
    assert direct.status is Status.PROBLEM and "dockerd's own socket" in direct.problem
    # The same socket spelled through the /var/run -> /run link is still dockerd's.
    if Path("/var/run").resolve() == Path("/run"):
        linked = docker_host_finding({"DOCKER_HOST": "unix:///run/docker.sock"}, SETTINGS)
        assert "dockerd's own socket" in linked.problem
    other = docker_host_finding({"DOCKER_HOST": "tcp://10.1.1.1:2376"}, SETTINGS)
    assert other.status is Status.PROBLEM and "none of this host's Powerplane" in other.problem


def test_docker_host_at_a_powerplane_listener_is_fine() -> None:
    assert docker_host_finding({"DOCKER_HOST": PROXY}, SETTINGS).ok
    assert docker_host_finding({"DOCKER_HOST": PROXY + "/"}, SETTINGS).ok
    tcp = SETTINGS.replace(listen=(PROXY, "tcp://127.0.0.1:2376"))
    assert docker_host_finding({"DOCKER_HOST": "TCP://127.0.0.1:2376"}, tcp).ok


def _status(agent_time: float | None, at: float = 1_000_000.0) -> AgentStatus:
    return AgentStatus("10.0.0.1:8300", agent_time, at, at + 0.01)


def test_clock_skew_is_named_past_two_seconds() -> None:
    assert clock_finding(_status(1_000_000.0), "c").ok  # same second
    behind = clock_finding(_status(1_000_010.0), "c")
    assert behind.status is Status.PROBLEM and "10 s behind" in behind.problem
    ahead = clock_finding(_status(999_990.0), "c")
    assert ahead.status is Status.PROBLEM and "ahead of" in ahead.problem
    assert clock_finding(_status(None), "c").status is Status.SKIPPED


def test_serve_not_running_or_not_ready_is_a_problem() -> None:
    path = Path("/run/powerplane/status.json")
    assert "not running" in serve_finding(None, path).problem
    waiting = serve_finding({"pid": 7, "state": "starting",
                             "waiting_for": {"consul": "unreachable"}}, path)
    assert waiting.status is Status.PROBLEM and "consul: unreachable" in waiting.problem
    assert serve_finding({"pid": 7, "state": "ready"}, path).ok


def test_path_findings_say_what_passes_and_which_mtu_to_use() -> None:
    common = {"source_ip": "192.168.50.11", "mtu": 1450, "mtu_source": "the overlay MTU"}
    down = path_finding("h2", icmp.PathReport("192.168.50.12", 1500, False, False), **common)
    assert down.status is Status.PROBLEM and "does not answer ping" in down.problem
    fine = path_finding("h2", icmp.PathReport("192.168.50.12", 1500, True, True, rtt=0.0004),
                        **common)
    assert fine.ok and "1500-byte packets pass" in fine.detail and "0.4 ms" in fine.detail
    narrow = path_finding("h2", icmp.PathReport("192.168.50.12", 1500, True, False,
                                                largest=1400), **common)
    assert narrow.status is Status.PROBLEM
    assert "packets of 1500 bytes" in narrow.problem
    assert "the largest that passes is 1400 bytes" in narrow.problem
    assert "--mtu 1350" in narrow.fix and "to 1500" in narrow.fix
    local = path_finding("h2", icmp.PathReport("192.168.50.12", 1500, True, False,
                                               largest=1300, local_mtu=1300), **common)
    assert "own route to it allows only 1300 bytes" in local.problem


async def test_a_check_that_hangs_or_fails_becomes_one_problem() -> None:
    async def hangs() -> list[Finding]:
        await asyncio.sleep(30)
        return []

    async def fails() -> list[Finding]:
        raise ConsulUnavailable("Consul at http://127.0.0.1:8500 is unreachable")

    slow = await bounded("consul", hangs, fix="start it", seconds=0.05)
    assert slow == [Finding.bad("consul", "no answer within 0.05 s", "start it")]
    down = await bounded("consul", fails, fix="start it")
    assert down[0].problem == "Consul at http://127.0.0.1:8500 is unreachable"


# -- the kernel ----------------------------------------------------------------------------------


def test_kernel_modules_found_loaded_or_with_parameters(tmp_path: Path) -> None:
    (tmp_path / "sys/module/vxlan").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_text("openvswitch 200704 0 - Live 0x0\n")
    found = {f.name: f.present for f in kernel.datapath_features("system", root=tmp_path)}
    assert found == {"openvswitch module": True, "vxlan module": True}
    (tmp_path / "proc/modules").write_text("nf_tables 1 0 - Live 0x0\n")
    missing = kernel.datapath_features("system", root=tmp_path)
    assert [f.name for f in missing if not f.present] == ["openvswitch module"]
    assert "--datapath netdev" in missing[0].fix


def test_netdev_needs_tun_and_af_xdp(tmp_path: Path) -> None:
    found = kernel.datapath_features("netdev", root=tmp_path, af_xdp=lambda: False)
    assert {f.name: f.present for f in found} == {"/dev/net/tun": False, "AF_XDP sockets": False}
    (tmp_path / "dev/net").mkdir(parents=True)
    (tmp_path / "dev/net/tun").touch()
    assert all(f.present for f in kernel.datapath_features("netdev", root=tmp_path,
                                                            af_xdp=lambda: True))


# -- ICMP probes ---------------------------------------------------------------------------------


def test_echo_request_has_the_size_asked_and_a_valid_checksum() -> None:
    packet = icmp.echo_request(0x1234, 7, 1500)
    assert len(packet) == 1500 - icmp.IP_HEADER
    assert icmp.checksum(packet) == 0
    kind, code, _, ident, sequence = struct.unpack_from("!BBHHH", packet)
    assert (kind, code, ident, sequence) == (icmp.ICMP_ECHO_REQUEST, 0, 0x1234, 7)


def test_only_echo_replies_to_our_identifier_are_taken() -> None:
    ip_header = bytes([0x45]) + bytes(19)
    reply = struct.pack("!BBHHH", icmp.ICMP_ECHO_REPLY, 0, 0, 0x1234, 9)
    assert icmp.parse_echo_reply(ip_header + reply, 0x1234) == 9
    assert icmp.parse_echo_reply(ip_header + reply, 0x4321) is None
    request = struct.pack("!BBHHH", icmp.ICMP_ECHO_REQUEST, 0, 0, 0x1234, 9)
    assert icmp.parse_echo_reply(ip_header + request, 0x1234) is None
    assert icmp.parse_echo_reply(ip_header[:10], 0x1234) is None


async def test_probe_over_loopback_passes() -> None:
    """Real raw sockets, to 127.0.0.1: reachable, and 1500-byte DF packets pass."""
    fine = await icmp.probe_path("127.0.0.1", 1500, source="127.0.0.1")
    assert fine.reachable and fine.passes and fine.rtt is not None


PROBE = """
import asyncio, dataclasses, json, sys
from adapter.dataplane.icmp import probe_path
report = asyncio.run(probe_path(sys.argv[1], 1500, source=sys.argv[2]))
print(json.dumps(dataclasses.asdict(report)))
"""


def _probe_in(host: LabHost, target: str) -> dict[str, Any]:
    result = host.run([sys.executable, "-c", PROBE, target, host.ip], timeout=60)
    found: dict[str, Any] = json.loads(result.stdout)
    return found


@pytest.mark.lab
def test_probe_finds_a_narrow_underlay_and_a_narrow_local_link() -> None:
    """Two namespace hosts on a bridge. The bridge's port to h2 at MTU 1400: h2 answers small
    pings, 1500-byte DF packets vanish, the search finds what passes. h1's own link at 1300:
    the kernel refuses larger packets at once, and the probe reports that MTU."""
    with Underlay(3) as underlay:
        h1, h2, h3 = underlay.hosts
        underlay.underlay.run(["ip", "link", "set", "p2", "mtu", "1400"])
        narrow, fine = _probe_in(h1, h2.ip), _probe_in(h1, h3.ip)
        assert narrow["reachable"] and not narrow["passes"], narrow
        # A bridge port lets 4 bytes more than its MTU through (room for a VLAN tag).
        assert 1400 <= narrow["largest"] <= 1404 and narrow["local_mtu"] is None, narrow
        assert fine["reachable"] and fine["passes"], fine
        h1.run(["ip", "link", "set", "eth0", "mtu", "1300"])
        local = _probe_in(h1, h3.ip)
        assert local["reachable"] and not local["passes"], local
        assert local["local_mtu"] == 1300 and local["largest"] == 1300, local
        gone = _probe_in(h1, f"{underlay.subnet}.99")
        assert not gone["reachable"] and not gone["passes"], gone


# -- comparisons of what the sources hold ----------------------------------------------------------


def _diagnosis(**seen: Any) -> Diagnosis:
    """A diagnosis with phase one's readings given (its clients are lazy: nothing is touched)."""
    settings = SETTINGS.replace(host_id="h1", underlay_ip="192.168.50.11")
    diagnosis = Diagnosis(settings, {}, serve_status=None, status_path=Path("/nonexistent"),
                          state=State(settings), docker=Docker(settings.docker_url),
                          dataplane=DataPlane(settings))
    for name, value in seen.items():
        setattr(diagnosis.seen, name, value)
    return diagnosis


NET = Network.build("blue", "10.0.6.0/24", vni=300)
APP = "a" * 64


def _endpoint(container: str, port: str) -> Endpoint:
    return Endpoint(container, "blue", "10.0.6.2", "02:00:0a:00:06:02", "h1", port)


def _plugged(container: str) -> PluggedPort:
    return PluggedPort(container, port_name(container), "blue", 300, "10.0.6.2", "", 1)


async def test_ports_and_records_must_match_both_ways() -> None:
    agreeing = _diagnosis(ports=[], endpoints=[_endpoint(APP, port_name(APP))],
                          plugged=[_plugged(APP)])
    assert [f.status for f in await agreeing._ports()] == [Status.OK]
    ghost = "b" * 64
    both = await _diagnosis(ports=[], endpoints=[_endpoint(ghost, port_name(ghost))],
                            plugged=[_plugged(APP)])._ports()
    assert [f.status for f in both] == [Status.PROBLEM, Status.PROBLEM]
    assert "OVS port ovsaaaaaaaaaaaa" in both[0].problem and "no endpoint record" in both[0].problem
    assert "bbbbbbbbbbbb" in both[1].problem and "not on bridge" in both[1].problem
    unknown = await _diagnosis(ports=None, endpoints=[])._ports()
    assert unknown[0].status is Status.SKIPPED


async def test_a_tunnel_to_every_peer_and_none_elsewhere() -> None:
    hosts = [Host("h1", "192.168.50.11", "", ""), Host("h2", "192.168.50.12", "", ""),
             Host("h3", "192.168.50.13", "", "")]
    tunnel = Tunnel("vx1", "h2", "192.168.50.12", "blue", 300)
    stray = Tunnel("vx2", "h9", "192.168.50.99", "blue", 300)
    found = await _diagnosis(ports=[], hosts=hosts, networks=[NET],
                             tunnels=[tunnel, stray])._tunnels()
    assert [f.problem for f in found] == [
        "no tunnel to peer h3 (192.168.50.13), which is registered",
        "a tunnel leads to 192.168.50.99 (h9), which no registered host has"]
    # No network, no tunnel wanted.
    assert (await _diagnosis(ports=[], hosts=hosts, networks=[], tunnels=[])._tunnels())[0].ok
