"""Port security and group enforcement in the switch: 2 namespace hosts, real userspace OVS.

Containers are namespaces plugged through DataPlane (as tests/test_dataplane_lab.py does); the
groups are written to Consul, and each host's agent (the runtime serve runs) compiles them and
keeps them in its switch. Spoofed
frames are sent from inside a container's namespace with a raw socket (root there stands for a
container with NET_ADMIN) and counted where they would arrive with tcpdump; each spoofing check
has a control, the same frames with the true source, which must arrive, so a capture that sees
nothing cannot pass for a switch that drops.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.dataplane.flows import GROUP, PORT, cookie
from adapter.dataplane.switch import port_name
from adapter.model import mac_for_ip
from tests.lab.hosts import REPO, Lab
from tests.lab.netns import LabHost

pytestmark = pytest.mark.lab

CIDR, VNI = "10.81.0.0/24", 6101
WEB, OPEN, CLIENT, SPOOFER = "10.81.0.10", "10.81.0.11", "10.81.0.20", "10.81.0.21"
CAPTURE_SECONDS = 3.0


def cid(name: str) -> str:
    return name.ljust(64, "0")


@pytest.fixture(scope="module")
def lab2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(2, Path(tmp_path_factory.mktemp("seclab")))
    try:
        for index in range(2):
            lab.start_agent(index)
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def boxes(lab2: Lab) -> dict[str, LabHost]:
    network = lab2.dataplane(0, {"op": "create_network", "name": "sec", "cidr": CIDR,
                                 "vni": VNI})[0]
    found: dict[str, LabHost] = {}
    for index, name, ip, groups in ((0, "web", WEB, ["web"]), (0, "open", OPEN, []),
                                    (1, "client", CLIENT, []), (1, "spoofer", SPOOFER, [])):
        ns = lab2.underlay.add_namespace(name)
        lab2.dataplane(index, {"op": "plug", "container_id": cid(name), "netns": ns.netns_path,
                               "network": network, "ip": ip, "groups": groups})
        found[name] = ns
    lab2.dataplane(0, {"op": "create_group", "name": "web"})
    lab2.dataplane(0, {"op": "add_rule", "name": "web", "proto": "tcp", "port": "80",
                       "source": f"{CLIENT}/32"})
    deadline = time.monotonic() + 30
    while ping(found["client"], OPEN).returncode != 0:
        assert time.monotonic() < deadline, "client never reached open across hosts"
    return found


def rule(lab: Lab, verb: str, proto: str, port: str | None, source: str) -> None:
    lab.dataplane(0, {"op": f"{verb}_rule", "name": "web", "proto": proto, "port": port,
                      "source": source})


def until(what: str, check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        time.sleep(0.1)


def ping(source: LabHost, ip: str, count: int = 1) -> subprocess.CompletedProcess[str]:
    return source.run(["ping", "-c", str(count), "-i0.2", "-W1", ip], check=False)


def serve_tcp(box: LabHost, port: int) -> subprocess.Popen[Any]:
    server = box.popen(["socat", f"TCP-LISTEN:{port},fork,reuseaddr", "SYSTEM:echo hello"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while f":{port:04X} " not in "".join(box.run(["cat", "/proc/net/tcp"]).stdout):
        assert time.monotonic() < deadline, f"nothing listens on {port} in {box.name}"
        time.sleep(0.05)
    return server


def fetch(box: LabHost, ip: str, port: int) -> str:
    result = box.run(["socat", "-T2", "-", f"TCP:{ip}:{port},connect-timeout=2"], check=False,
                     input="")
    return result.stdout.strip()


def test_a_guarded_container_accepts_only_what_its_group_allows(boxes: dict[str, LabHost]
                                                                 ) -> None:
    servers = [serve_tcp(boxes["web"], 80), serve_tcp(boxes["web"], 81)]
    try:
        until("the agent's rules let client in", lambda: fetch(boxes["client"], WEB, 80))
        assert fetch(boxes["client"], WEB, 80) == "hello"
        assert fetch(boxes["client"], WEB, 81) == ""  # not allowed: times out
        assert fetch(boxes["spoofer"], WEB, 80) == ""  # allowed from client only
        assert ping(boxes["client"], WEB).returncode != 0
        # Its own connections out get their replies; the unguarded neighbour accepts all.
        assert ping(boxes["web"], CLIENT).returncode == 0
        assert ping(boxes["client"], OPEN).returncode == 0
    finally:
        for server in servers:
            server.kill()
            server.wait()


def test_a_rule_added_lets_in_and_removed_stops_without_cutting(lab2: Lab,
                                                                 boxes: dict[str, LabHost]
                                                                 ) -> None:
    server = boxes["web"].popen(["socat", "TCP-LISTEN:82,reuseaddr", "EXEC:cat"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        rule(lab2, "add", "icmp", None, CIDR)
        rule(lab2, "add", "tcp", "82", CIDR)
        until("client pings web", lambda: ping(boxes["client"], WEB).returncode == 0)
        # A connection opened while allowed, kept open across the rule's removal.
        chat = boxes["client"].popen(
            [sys.executable, "-c", CHAT, WEB, "82"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert chat.stdout is not None and chat.stdin is not None
        assert chat.stdout.readline().strip() == "echo one"
        rule(lab2, "remove", "icmp", None, CIDR)
        rule(lab2, "remove", "tcp", "82", CIDR)
        until("client no longer pings web", lambda: ping(boxes["client"], WEB).returncode != 0)
        chat.stdin.write("go\n")
        chat.stdin.flush()
        assert chat.stdout.readline().strip() == "echo two"
        chat.wait(10)
    finally:
        server.kill()
        server.wait()


# Connect, exchange a line, wait for "go" on stdin, exchange another on the same connection.
CHAT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rw")
f.write("one\\n"); f.flush(); print("echo", f.readline().strip(), flush=True)
sys.stdin.readline()
f.write("two\\n"); f.flush(); print("echo", f.readline().strip(), flush=True)
"""


def arrivals(box: LabHost, sender: LabHost, *frames_args: str, bpf: str) -> int:
    """How many frames matching ``bpf`` reach ``box``'s eth0 while ``sender`` sends."""
    capture = box.popen(["tcpdump", "-i", "eth0", "-n", "-l", "-p", bpf],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert capture.stderr is not None
    capture.stderr.readline()  # "listening on eth0": the capture is armed
    sender.run([sys.executable, "-m", "tests.support.frames", *frames_args], cwd=REPO)
    time.sleep(CAPTURE_SECONDS)
    capture.terminate()
    out, _ = capture.communicate(timeout=10)
    return len([line for line in out.splitlines() if line.strip()])


def test_spoofed_source_address_is_dropped(boxes: dict[str, LabHost]) -> None:
    spoofer, own_mac = boxes["spoofer"], mac_for_ip(SPOOFER)
    open_mac = mac_for_ip(OPEN)
    sent = ("ping", "eth0", own_mac, open_mac)
    assert arrivals(boxes["open"], spoofer, *sent, SPOOFER, OPEN, "5",
                    bpf=f"icmp and src host {SPOOFER}") == 5
    assert arrivals(boxes["open"], spoofer, *sent, "10.81.0.99", OPEN, "5",
                    bpf="icmp and src host 10.81.0.99") == 0
    assert arrivals(boxes["open"], spoofer, *sent, CLIENT, OPEN, "5",
                    bpf=f"icmp and src host {CLIENT}") == 0


def test_spoofed_source_mac_is_dropped(boxes: dict[str, LabHost]) -> None:
    spoofer = boxes["spoofer"]
    assert arrivals(boxes["open"], spoofer, "ping", "eth0", "02:00:0a:51:00:63",
                    mac_for_ip(OPEN), SPOOFER, OPEN, "5",
                    bpf="icmp and ether src 02:00:0a:51:00:63") == 0


def test_gratuitous_arp_for_another_address_is_dropped(boxes: dict[str, LabHost]) -> None:
    spoofer, own_mac = boxes["spoofer"], mac_for_ip(SPOOFER)
    assert arrivals(boxes["open"], spoofer, "garp", "eth0", own_mac, SPOOFER, "3",
                    bpf=f"arp and ether src {own_mac}") == 3
    assert arrivals(boxes["open"], spoofer, "garp", "eth0", own_mac, WEB, "3",
                    bpf=f"arp and ether src {own_mac}") == 0
    # web's traffic undisturbed: nobody was taught the spoofer's MAC for web's address.
    assert ping(boxes["client"], OPEN).returncode == 0
    assert ping(boxes["web"], CLIENT).returncode == 0


def test_flows_carry_cookies_per_port_and_group_and_go_with_them(lab2: Lab,
                                                                 boxes: dict[str, LabHost]
                                                                 ) -> None:
    web_port = cookie(PORT, port_name(cid("web")))
    flows = lab2.dataplane(0, {"op": "flows"})[0]
    assert any(f"cookie={web_port:#x}" in flow for flow in flows)
    assert any(f"cookie={cookie(GROUP, 'web'):#x}" in flow for flow in flows)
    ns = lab2.underlay.add_namespace("brief")
    network = {"name": "sec", "cidr": CIDR, "gateway": "10.81.0.1", "vni": VNI}
    lab2.dataplane(0, {"op": "plug", "container_id": cid("brief"), "netns": ns.netns_path,
                       "network": network, "ip": "10.81.0.30", "groups": ["web"]})
    brief = cookie(PORT, port_name(cid("brief")))
    assert any(f"cookie={brief:#x}" in f for f in lab2.dataplane(0, {"op": "flows"})[0])
    lab2.dataplane(0, {"op": "unplug", "container_id": cid("brief")})
    assert not any(f"cookie={brief:#x}" in f for f in lab2.dataplane(0, {"op": "flows"})[0])
