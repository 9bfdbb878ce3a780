"""Security groups: what 200 rules cost a connection, and how fast a rule change is in force.

Run as root from the repository: ``/opt/powerplane/bin/python -m bench.groups``.
Two lab hosts (network namespaces, userspace OVS, one Consul, each host running the agent that
``serve`` runs). On host 2, two server namespaces on one network: ``open`` in no group, and
``guarded`` in group ``bench`` with 200 rules (199 for other sources and ports, and the one
that admits the client as the last). A client namespace on host 1 measures both, interleaved,
in the same run: iperf3 TCP throughput, and short connections per second (connect, one byte
each way, close). Then the time from a rule written to Consul until the guarded server answers
a ping (rule added) and until it stops answering (rule removed), measured by a worker inside
host 1's namespace right after the write returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapter.groups import GroupRule
from adapter.network.state import State
from adapter.settings import CONSUL_OPTIONS, load_settings
from bench.dataplane import throughput
from tests.lab.hosts import Lab
from tests.lab.netns import LabHost

REPO = Path(__file__).resolve().parent.parent
CIDR, VNI = "10.97.0.0/24", 4545
CLIENT, OPEN, GUARDED = "10.97.0.10", "10.97.0.20", "10.97.0.21"
RULES = 200
ROUNDS = 3
RATE_SECONDS = 3
CHANGES = 10

# Runs in a server namespace: accept, answer one byte, close; forever.
ACCEPTOR = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.recv(1); c.sendall(b"x"); c.close()
"""
# Runs in the client namespace: short connections for a few seconds; connections per second.
CONNECTOR = """
import socket, sys, time
ip, seconds = sys.argv[1], float(sys.argv[2])
done, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    with socket.create_connection((ip, 7000), timeout=2) as c:
        c.sendall(b"x"); c.recv(1)
    done += 1
print(done / seconds)
"""


def connection_rate(client: LabHost, ip: str) -> float:
    out = client.run([sys.executable, "-c", CONNECTOR, ip, str(RATE_SECONDS)]).stdout
    return float(out.strip())


def start_acceptor(where: LabHost) -> None:
    server = where.popen([sys.executable, "-c", ACCEPTOR], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"


async def rule_latency(client_netns: str, changes: int) -> dict[str, list[float]]:
    """Inside host 1: write a rule, then ping the guarded server until the change shows."""
    settings = load_settings(argparse.Namespace(), os.environ, CONSUL_OPTIONS)
    state = State(settings)
    icmp = GroupRule.parse("icmp", None, f"{CLIENT}/32")

    def answers() -> bool:
        return subprocess.run(["ip", "netns", "exec", client_netns, "ping", "-c1", "-W0.2",
                               GUARDED], capture_output=True).returncode == 0

    async def until(wanted: bool) -> float:
        start = time.monotonic()
        while await asyncio.to_thread(answers) != wanted:
            if time.monotonic() - start > 30:
                raise SystemExit("a rule change never took effect")
        return time.monotonic() - start

    found: dict[str, list[float]] = {"add": [], "remove": []}
    try:
        for _ in range(changes):
            await state.groups.add_rule("bench", icmp)
            found["add"].append(await until(True))
            await state.groups.remove_rule("bench", icmp)
            found["remove"].append(await until(False))
    finally:
        await state.close()
    return found


async def fill_group() -> None:
    settings = load_settings(argparse.Namespace(), os.environ, CONSUL_OPTIONS)
    state = State(settings)
    try:
        await state.groups.create("bench")
        for index in range(RULES - 1):
            rule = GroupRule.parse("tcp", str(10000 + index), f"172.16.{index // 200}."
                                   f"{index % 200 + 1}/32")
            await state.groups.add_rule("bench", rule)
        await state.groups.add_rule("bench", GroupRule.parse("tcp", None, f"{CLIENT}/32"))
    finally:
        await state.close()


def in_host(lab: Lab, index: int, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERPLANE_", "CONSUL_"))}
    result = lab.hosts[index].run([sys.executable, "-m", "bench.groups", *args],
                                  env={**env, **lab.host_env(index), "PYTHONPATH": str(REPO)},
                                  cwd=REPO)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(2, Path(tmp))
        try:
            network = lab.dataplane(0, {"op": "create_network", "name": "groupbench",
                                        "cidr": CIDR, "vni": VNI})[0]
            in_host(lab, 0, "fill")
            for index in range(2):
                lab.start_agent(index)
            boxes = {}
            for name, host, ip, groups in (("client", 0, CLIENT, []), ("open", 1, OPEN, []),
                                           ("guarded", 1, GUARDED, ["bench"])):
                boxes[name] = lab.underlay.add_namespace(name)
                lab.dataplane(host, {"op": "plug", "container_id": name.ljust(64, "0"),
                                     "netns": boxes[name].netns_path, "network": network,
                                     "ip": ip, "groups": groups})
            client = boxes["client"]
            for target in (OPEN, GUARDED):
                deadline = time.monotonic() + 30
                while client.run(["ping", "-c1", "-W1", target], check=False).returncode:
                    if target == GUARDED:
                        break  # icmp is not among the rules: only TCP is, checked below
                    assert time.monotonic() < deadline, f"{target} never answered"
            start_acceptor(boxes["open"])
            start_acceptor(boxes["guarded"])
            figures: dict[str, dict[str, list[float]]] = {
                "open": {"bw": [], "rate": []}, "guarded": {"bw": [], "rate": []}}
            for _ in range(ROUNDS):
                for name, ip in (("open", OPEN), ("guarded", GUARDED)):
                    figures[name]["rate"].append(connection_rate(client, ip))
                    figures[name]["bw"].append(throughput(client, boxes[name], ip))
            flows = len(lab.dataplane(1, {"op": "flows"})[0])
            latency = json.loads(in_host(lab, 0, "latency", client.name, str(CHANGES)))
        finally:
            lab.close()
    med = {name: {k: statistics.median(v) for k, v in f.items()} for name, f in figures.items()}
    print(f"userspace OVS (netdev), 2 namespace hosts; group with {RULES} rules, "
          f"{flows} flows on the server's host; medians of {ROUNDS} interleaved rounds")
    print(f"TCP throughput   no group {med['open']['bw']:8.0f} Mbit/s   {RULES} rules "
          f"{med['guarded']['bw']:8.0f} Mbit/s   ratio "
          f"{med['guarded']['bw'] / med['open']['bw']:.2f}")
    print(f"connections/s    no group {med['open']['rate']:8.0f}          {RULES} rules "
          f"{med['guarded']['rate']:8.0f}          ratio "
          f"{med['guarded']['rate'] / med['open']['rate']:.2f}")
    for verb in ("add", "remove"):
        values = sorted(latency[verb])
        print(f"rule {verb:6} to enforcement: median {statistics.median(values) * 1000:.0f} ms, "
              f"max {values[-1] * 1000:.0f} ms ({CHANGES} changes)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["fill"]:
        asyncio.run(fill_group())
    elif sys.argv[1:2] == ["latency"]:
        print(json.dumps(asyncio.run(rule_latency(sys.argv[2], int(sys.argv[3])))))
    else:
        main()
