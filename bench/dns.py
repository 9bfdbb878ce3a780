"""Names (issue 15): our DNS server vs. dnsmasq, and the proxy while DNS is busy.

Builds a 1-host end-to-end lab (``tests.e2e.cluster.E2ELab``: dockerd, OVS, Consul and
``powerplane serve`` in a network namespace), starts one overlay container ``web`` (so the
network has a gateway, where serve's DNS server listens) and writes ``--names`` more endpoint
records into Consul, which the server's cache takes in like any container's. dnsmasq runs in
the same namespace on 127.0.0.1:53 serving the same names from a hosts file (``--addn-hosts``,
no upstream). The same load generator (``python -m bench.dns client``, uvloop, one UDP socket,
run inside the namespace) asks both for ``web``, side by side in one run:

* latency at a fixed rate (``--rate`` q/s, open loop): p50/p99, each server in turn, alternated
  ``--rounds`` times; target: our p50 at most 2x dnsmasq's;
* throughput: queries per second with ``--window`` queries in flight (closed loop). The client
  is Python too: the highest numbers are the client's ceiling as much as the server's;
* the proxy: p50/p99 of ``GET /_ping`` through serve's socket, idle and while the DNS server
  takes 2,000 q/s, alternated; target: unchanged within noise.

    sudo /opt/powerplane/bin/python -m bench.dns [--names 200] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CIDR, GATEWAY, NETWORK = "10.0.0.0/16", "10.0.0.1", "net-10.0.0.0-16"
DNSMASQ_ADDRESS = "127.0.0.1"
PING_RATE = 2000
PING_REQUESTS = 500
TARGET_P50 = 2.0
REPO = Path(__file__).resolve().parent.parent


# -- the load generator (run inside the lab namespace) ------------------------------------------


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.done: asyncio.Queue[None] = asyncio.Queue()
        self.lost = 0

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        started = self.sent.pop(int.from_bytes(data[:2], "big"), None)
        if started is not None:
            self.latencies.append(time.perf_counter() - started)
            self.done.put_nowait(None)


async def _load(server: str, name: str, seconds: float, rate: float,
                window: int) -> dict[str, float]:
    from dnslib import DNSRecord

    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, remote_addr=(server, 53))
    template = bytes(DNSRecord.question(name).pack())
    next_id = 0

    def send() -> None:
        nonlocal next_id
        next_id = (next_id + 1) & 0xFFFF
        client.sent[next_id] = time.perf_counter()
        transport.sendto(next_id.to_bytes(2, "big") + template[2:])

    start = time.perf_counter()
    ends = start + seconds
    if rate > 0:  # open loop: queries leave on schedule whatever the answers do
        sent = 0
        while (now := time.perf_counter()) < ends:
            due = int((now - start) * rate)
            while sent < due:
                send()
                sent += 1
            await asyncio.sleep(0.002)
    else:  # closed loop: ``window`` queries in flight
        for _ in range(window):
            send()
        while time.perf_counter() < ends:
            try:
                await asyncio.wait_for(client.done.get(), 1.0)
            except TimeoutError:
                client.sent.clear()  # lost: start the window again
                for _ in range(window):
                    send()
                continue
            send()
    elapsed = time.perf_counter() - start
    await asyncio.sleep(0.2)
    transport.close()
    lat = sorted(client.latencies)
    return {"answered": len(lat), "qps": len(lat) / elapsed, "lost": len(client.sent),
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else -1.0,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else -1.0}


def _client_main(argv: list[str]) -> None:
    import uvloop

    server, name, seconds, rate, window = argv
    print(json.dumps(uvloop.run(_load(server, name, float(seconds), float(rate), int(window)))))


# -- the bench ----------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("docker", timeout=30)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def _pings(path: Path, n: int) -> list[float]:
    conn = _UnixHTTP(path)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("GET", "/_ping")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        times.append(1000 * (time.perf_counter() - started))
    conn.close()
    return times


def _fake_records(n: int) -> str:
    """A script (run in the lab) writing ``n`` endpoint records with names into Consul."""
    return f"""
import json, urllib.request, sys
addr = sys.argv[1]
for i in range({n}):
    ip = f"10.0.{{1 + i // 250}}.{{1 + i % 250}}"
    body = json.dumps({{"network": "{NETWORK}", "ip": ip, "mac": "", "host": "elsewhere",
                       "port": "", "sandbox": "", "name": f"svc{{i:04d}}", "hostname": "",
                       "aliases": []}}).encode()
    request = urllib.request.Request(f"http://{{addr}}/v1/kv/powerplane/endpoints/fake{{i:05d}}",
                                     data=body, method="PUT")
    urllib.request.urlopen(request).read()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=200, help="endpoint records besides web")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rate", type=float, default=1000.0, help="q/s for the latency runs")
    parser.add_argument("--window", type=int, default=16, help="in flight for throughput")
    parser.add_argument("--rounds", type=int, default=3, help="each measurement, alternated")
    args = parser.parse_args()
    dnsmasq = shutil.which("dnsmasq")
    if dnsmasq is None:
        sys.exit("bench/dns.py: dnsmasq is missing (apt-get install dnsmasq-base)")

    from tests.e2e.cluster import E2ELab

    began = time.perf_counter()
    with (tempfile.TemporaryDirectory(prefix="bench-dns-") as workdir,
          E2ELab(1, Path(workdir)) as lab):
        host = lab.hosts[0]
        host.docker_cli("run", "-d", "--name", "web", "-e", f"SOCKETPLANE_CIDR={CIDR}",
                        "busybox", "sleep", "100000")
        web = host.docker_cli("exec", "web", "ip", "-4", "-o", "addr", "show", "eth0",
                              direct=True).stdout.split()[3].split("/")[0]
        host.netns.run([sys.executable, "-c", _fake_records(args.names),
                        host.consul.http_addr])
        hosts_file = Path(workdir) / "hosts"
        hosts_file.write_text(f"{web} web\n" + "".join(
            f"10.0.{1 + i // 250}.{1 + i % 250} svc{i:04d}\n" for i in range(args.names)))
        os.chmod(workdir, 0o755)
        host.netns.run(["ip", "link", "set", "lo", "up"])
        masq = host.netns.popen([dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                 f"--addn-hosts={hosts_file}",
                                 f"--listen-address={DNSMASQ_ADDRESS}",
                                 "--bind-interfaces", "--port=53", "--cache-size=10000",
                                 "--log-facility=-", "--pid-file="],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers = {"powerplane": GATEWAY, "dnsmasq": DNSMASQ_ADDRESS}

        def client(server: str, seconds: float, rate: float,
                   window: int = 1) -> dict[str, float]:
            out = host.netns.run([sys.executable, "-m", "bench.dns", "client", server, "web",
                                  str(seconds), str(rate), str(window)], cwd=REPO).stdout
            return dict(json.loads(out))

        for server in servers.values():  # both answer web before anything is timed
            deadline = time.monotonic() + 20
            while client(server, 0.2, 50)["answered"] == 0:
                assert time.monotonic() < deadline, f"{server} does not answer"
        setup = time.perf_counter() - began
        latency: dict[str, list[dict[str, float]]] = {s: [] for s in servers}
        throughput: dict[str, list[dict[str, float]]] = {s: [] for s in servers}
        for _ in range(args.rounds):
            for label, server in servers.items():
                latency[label].append(client(server, args.seconds, args.rate))
            for label, server in servers.items():
                throughput[label].append(client(server, args.seconds, 0, args.window))

        idle: list[float] = []
        busy: list[float] = []
        under_load: list[dict[str, float]] = []
        for _ in range(args.rounds):
            idle += _pings(host.proxy_socket, PING_REQUESTS)
            result: dict[str, dict[str, float]] = {}

            def background(into: dict[str, dict[str, float]] = result) -> None:
                into["load"] = client(GATEWAY, args.seconds + 2, PING_RATE)

            load = threading.Thread(target=background)
            load.start()
            time.sleep(1.0)
            busy += _pings(host.proxy_socket, PING_REQUESTS)
            load.join()
            under_load.append(result["load"])
        masq.terminate()
        masq.wait(10)

    print(f"lab setup {setup:.1f} s, total {time.perf_counter() - began:.1f} s; "
          f"{args.names + 1} names; {args.rounds} rounds of {args.seconds:g} s each")
    print()
    print("| measurement | powerplane | dnsmasq | ratio | target |")
    print("|---|---|---|---|---|")
    p50 = {s: statistics.median(r["p50_ms"] for r in latency[s]) for s in servers}
    p99 = {s: statistics.median(r["p99_ms"] for r in latency[s]) for s in servers}
    ratio = p50["powerplane"] / p50["dnsmasq"]
    print(f"| `web` at {args.rate:g} q/s, p50 | {p50['powerplane']:.3f} ms "
          f"| {p50['dnsmasq']:.3f} ms | {ratio:.2f}x | <= {TARGET_P50:g}x: "
          f"{'met' if ratio <= TARGET_P50 else 'MISSED'} |")
    print(f"| `web` at {args.rate:g} q/s, p99 | {p99['powerplane']:.3f} ms "
          f"| {p99['dnsmasq']:.3f} ms | {p99['powerplane'] / p99['dnsmasq']:.2f}x | |")
    qps = {s: statistics.median(r["qps"] for r in throughput[s]) for s in servers}
    print(f"| `web`, {args.window} in flight, q/s | {qps['powerplane']:.0f} "
          f"| {qps['dnsmasq']:.0f} | {qps['powerplane'] / qps['dnsmasq']:.2f}x | |")
    lost = {s: sum(r["lost"] for r in latency[s] + throughput[s]) for s in servers}
    print(f"| queries unanswered, all runs | {lost['powerplane']:.0f} | {lost['dnsmasq']:.0f} "
          "| | |")
    print()
    print("| `GET /_ping` through the proxy | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| idle | {_percentile(idle, 0.5):.3f} | {_percentile(idle, 0.99):.3f} |")
    print(f"| DNS server taking {PING_RATE} q/s | {_percentile(busy, 0.5):.3f} "
          f"| {_percentile(busy, 0.99):.3f} |")
    answered = statistics.median(r["qps"] for r in under_load)
    print(f"\nDNS during the /_ping runs: {answered:.0f} q/s answered (median of rounds), "
          f"p99 {statistics.median(r['p99_ms'] for r in under_load):.3f} ms")
    print("raw: " + json.dumps({"latency": latency, "throughput": throughput}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        _client_main(sys.argv[2:])
    else:
        main()
