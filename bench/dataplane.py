"""Overlay vs. underlay between two lab hosts, and the way in and out of one host.

Run as root from the repository: ``/opt/powerplane/bin/python -m bench.dataplane``.
Userspace OVS (netdev datapath) on namespace hosts: the numbers describe this lab, not a kernel
datapath. The underlay is measured first (plain veths, before the agents move the address onto
OVS), then the overlay (container to container over VXLAN), in the same run.

Way out (issue 14), on a host and an outside machine on its underlay: iperf3 TCP from a
container through the gateway and egress NAT vs. from the host itself to the same server; and
request/response latency from outside to a published port (DNAT to a container) vs. to the
same server program listening on the host's own address, new connection per request.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.lab.hosts import Lab
from tests.lab.netns import LabHost

SECONDS = 5
PINGS = 200
REQUESTS = 400
REPO = Path(__file__).resolve().parent.parent
# Runs in the outside namespace: REQUESTS HTTP requests, a new connection each; the seconds each
# took, as JSON.
LATENCY_CLIENT = """
import json, socket, sys, time
ip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
took = []
for _ in range(count):
    start = time.perf_counter()
    with socket.create_connection((ip, port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        while conn.recv(4096):
            pass
    took.append(time.perf_counter() - start)
print(json.dumps(took))
"""


def throughput(client: LabHost, server: LabHost, ip: str) -> float:
    server.popen(["iperf3", "-s", "-1", "-B", ip], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    out = client.run(["iperf3", "-c", ip, "-t", str(SECONDS), "-J"]).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6


def rtts(client: LabHost, ip: str) -> list[float]:
    out = client.run(["ping", "-c", str(PINGS), "-i", "0.01", ip], check=False).stdout
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


def summary(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))]


def latencies(client: LabHost, ip: str, port: int) -> list[float]:
    out = client.run([sys.executable, "-c", LATENCY_CLIENT, ip, str(port), str(REQUESTS)]).stdout
    return [seconds * 1000 for seconds in json.loads(out)]


def serve_http(where: LabHost, port: int) -> None:
    server = where.popen([sys.executable, "-m", "tests.support.outside_server", str(port)],
                         cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"


def way_out() -> dict[str, float]:
    """Egress NAT throughput and published-port latency, each next to its host-only twin."""
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(1, Path(tmp))
        try:
            host = lab.hosts[0]
            outside = lab.underlay.add_outside()
            network = lab.dataplane(0, {"op": "create_network", "name": "wayout",
                                        "cidr": "10.98.0.0/24", "vni": 4343})[0]
            # No agent: it would apply its own (empty) list of published ports over ours.
            container = lab.underlay.add_namespace("c0")
            ip = "10.98.0.10"
            lab.dataplane(0, {"op": "plug", "container_id": "wayout".ljust(64, "0"),
                              "netns": container.netns_path, "network": network, "ip": ip})
            deadline = time.monotonic() + 20
            while container.run(["ping", "-c1", "-W1", outside.ip], check=False).returncode:
                assert time.monotonic() < deadline, "no way out from the container"
            egress = throughput(container, outside, outside.ip)
            direct = throughput(host, outside, outside.ip)
            serve_http(container, 8000)
            serve_http(host, 8001)
            lab.dataplane(0, {"op": "set_published", "ports": [
                {"proto": "tcp", "host_ip": "", "host_port": 18000, "container_ip": ip,
                 "container_port": 8000}]})
            published = latencies(outside, host.ip, 18000)
            on_host = latencies(outside, host.ip, 8001)
        finally:
            lab.close()
    return {"egress": egress, "direct": direct,
            "published": statistics.median(published), "on_host": statistics.median(on_host)}


def main() -> None:
    edge = way_out()
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(2, Path(tmp))
        try:
            a, b = lab.hosts
            under_bw = throughput(a, b, b.ip)
            under_rtt = summary(rtts(a, b.ip))
            network = lab.dataplane(0, {"op": "create_network", "name": "bench",
                                        "cidr": "10.99.0.0/24", "vni": 4242})[0]
            lab.start_agent(0)
            lab.start_agent(1)
            ns = [lab.underlay.add_namespace(f"c{i}") for i in range(2)]
            ips = ["10.99.0.10", "10.99.0.11"]
            for i in range(2):
                lab.dataplane(i, {"op": "plug", "container_id": f"bench{i}".ljust(64, "0"),
                                  "netns": ns[i].netns_path, "network": network, "ip": ips[i]})
            deadline = time.monotonic() + 20
            while ns[0].run(["ping", "-c1", "-W1", ips[1]], check=False).returncode != 0:
                assert time.monotonic() < deadline, "overlay never came up"
            over_bw = throughput(ns[0], ns[1], ips[1])
            over_rtt = summary(rtts(ns[0], ips[1]))
        finally:
            lab.close()
    print("userspace OVS (netdev), 2 namespace hosts, VXLAN overlay MTU 1450")
    print(f"TCP throughput  underlay {under_bw:8.0f} Mbit/s  overlay {over_bw:8.0f} Mbit/s  "
          f"ratio {over_bw / under_bw:.2f}")
    print(f"ping RTT median underlay {under_rtt[0]:.3f} ms  overlay {over_rtt[0]:.3f} ms  "
          f"ratio {over_rtt[0] / under_rtt[0]:.2f}")
    print(f"ping RTT p99    underlay {under_rtt[1]:.3f} ms  overlay {over_rtt[1]:.3f} ms")
    print(f"way out TCP     host->outside {edge['direct']:8.0f} Mbit/s  container->outside "
          f"(gateway + NAT) {edge['egress']:8.0f} Mbit/s  ratio "
          f"{edge['egress'] / edge['direct']:.2f}")
    print(f"way in  latency outside->host's own server {edge['on_host']:.3f} ms  "
          f"outside->published port {edge['published']:.3f} ms  ratio "
          f"{edge['published'] / edge['on_host']:.2f}  (median of {REQUESTS}, new connection each)")


if __name__ == "__main__":
    main()
