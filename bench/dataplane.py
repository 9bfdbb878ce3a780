"""Overlay vs. underlay between two lab hosts: iperf3 TCP throughput and ping RTT.

Run as root from the repository: ``/opt/powerplane/bin/python -m bench.dataplane``.
Userspace OVS (netdev datapath) on namespace hosts: the numbers describe this lab, not a kernel
datapath. The underlay is measured first (plain veths, before the agents move the address onto
OVS), then the overlay (container to container over VXLAN), in the same run.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.lab.hosts import Lab
from tests.lab.netns import LabHost

SECONDS = 5
PINGS = 200


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


def main() -> None:
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


if __name__ == "__main__":
    main()
