"""Scale: how fast one host's switch follows hundreds of peers, and what following them costs.

Run as root from the repository: ``/opt/powerplane/bin/python -m bench.convergence``
(``--networks 1 20`` by default; ``--peers 10 50 200``).

One lab host (network namespace, userspace OVS, real Consul) runs the agent that ``serve``
runs, with the product's default intervals. Simulated peers are host records written by a
helper process in the lab's switch namespace exactly as a real host writes its own: a session,
then ``hosts/<id>`` acquired under it with the JSON of ``adapter.model.Host``. Their underlay
addresses are free addresses of the lab subnet that nothing answers. Their sessions have a long
TTL and are never renewed: a real peer renews with its own Consul agent, not with this host.

For each network count, one lab; for each N, from no peers: N peers register at once, and the
clock runs from the last registration acknowledged until every tunnel port (peers x networks,
each with an OpenFlow port number) is on the bridge. Then, once the agent's CPU has gone quiet
(the ports can be there while it still works: that delay is printed), a rest window: its RSS, its
CPU, and its Consul requests (from Consul's own request log, by source address; blocking
queries, i.e. the open watches, counted apart). Then min(50, N) peers leave at once (their
sessions destroyed: Consul deletes the records), timed until their tunnels are gone. At the
largest N the leavers come back and the agent is stopped with SIGTERM, timed to its exit.
Every wait is bounded: past the bound the bench prints how far it got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from adapter.model import Host
from adapter.network.state import State
from adapter.settings import CONSUL_OPTIONS, load_settings
from tests.lab.hosts import Lab

REPO = Path(__file__).resolve().parent.parent
BOUND_SECONDS = 120.0
POLL_SECONDS = 0.2
REST_SECONDS = 30.0
SETTLE_SECONDS = 3.0
QUIET_PERCENT = 5.0
LEAVERS = 50
FIRST_PEER_OCTET = 50  # 192.168.50.50 ... .249: in the lab subnet, nobody there
PEER_SESSION_TTL = 3600
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# Consul (1.8, -dev logs at debug) logs every HTTP request it has answered.
REQUEST_LINE = re.compile(r"Request finished: method=(\S+) url=(\S+) from=([\d.]+):\d+")


class BenchLab(Lab):
    """The lab with the product's default intervals and log level, not the tests' hurried ones."""

    def host_env(self, index: int) -> dict[str, str]:
        env = super().host_env(index)
        for key in ("POWERPLANE_RECONCILE_INTERVAL", "POWERPLANE_HOST_TTL"):
            env.pop(key, None)
        env["POWERPLANE_LOG_LEVEL"] = "info"
        return env


# -- the helper that plays the peers (runs in the lab's switch namespace) ----------------------

async def play_peers() -> None:
    """Read commands on stdin: ``join FIRST COUNT`` / ``leave FIRST COUNT``; answer with the
    monotonic time the last Consul write was acknowledged."""
    settings = load_settings(argparse.Namespace(), os.environ, CONSUL_OPTIONS)
    state = State(settings)
    kv = state.kv
    sessions: dict[int, str] = {}

    async def join(number: int) -> None:
        host = Host(f"peer{number:03d}", f"192.168.50.{FIRST_PEER_OCTET + number}",
                    f"peer{number:03d}", "bench")
        session = await kv.create_session(f"powerplane host {host.host_id}", PEER_SESSION_TTL)
        if not await kv.acquire(f"hosts/{host.host_id}", host.to_json(), session):
            raise SystemExit(f"{host.host_id}: key held elsewhere")
        sessions[number] = session

    async def leave(number: int) -> None:
        await kv.destroy_session(sessions.pop(number))

    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            verb, first, count = line.split()
            numbers = range(int(first), int(first) + int(count))
            await asyncio.gather(*((join if verb == "join" else leave)(n) for n in numbers))
            print(time.monotonic(), flush=True)
    finally:
        await state.close()


class Peers:
    """The helper process that plays the peers, driven line by line."""

    def __init__(self, lab: Lab) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERPLANE_", "CONSUL_"))}
        self._process = lab.underlay.underlay.popen(
            [sys.executable, "-m", "bench.convergence", "peers"],
            env={**env, **lab.host_env(0), "PYTHONPATH": str(REPO)}, cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _do(self, verb: str, first: int, count: int) -> float:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(f"{verb} {first} {count}\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        if not answer:
            raise SystemExit(f"the peer helper died during {verb}")
        return float(answer)

    def join(self, first: int, count: int) -> float:
        return self._do("join", first, count)

    def leave(self, first: int, count: int) -> float:
        return self._do("leave", first, count)


# -- measuring -----------------------------------------------------------------------------------

def tunnels_up(lab: Lab) -> int:
    """VXLAN ports on the bridge that ovs-vswitchd has made (an OpenFlow port number)."""
    out = lab.ovs[0].vsctl("--bare", "--columns=ofport", "find", "Interface", "type=vxlan")
    return sum(1 for value in out.split() if value.lstrip("-").isdigit() and int(value) > 0)


def flow_count(lab: Lab) -> int:
    return len([line for line in lab.ovs[0].ofctl("dump-flows", "powerplane0").splitlines()
                if "actions=" in line])


def wait_for_tunnels(lab: Lab, wanted: int, since: float) -> tuple[float | None, int]:
    """Seconds from ``since`` until exactly ``wanted`` tunnels are up; None past the bound."""
    found = -1
    while time.monotonic() - since < BOUND_SECONDS:
        found = tunnels_up(lab)
        if found == wanted:
            return time.monotonic() - since, found
        time.sleep(POLL_SECONDS)
    return None, found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def consul_requests(log: Path, start: int, end: int, source: str) -> Counter[str]:
    """Requests from ``source`` that Consul finished between two offsets of its log, by kind."""
    with log.open("rb") as file:
        file.seek(start)
        text = file.read(end - start).decode(errors="replace")
    kinds: Counter[str] = Counter()
    for method, url, sender in REQUEST_LINE.findall(text):
        if sender != source:
            continue
        # A session's id in the path would make every renewal a kind of its own.
        path = re.sub(r"/[0-9a-f-]{36}$", "/<session>", url.split("?", 1)[0])
        if "index=" in url:
            kinds[f"watch {path}"] += 1
        else:
            kinds[f"{method} {path}"] += 1
    return kinds


def settle(pid: int) -> float | None:
    """Seconds until the agent's CPU stays under ``QUIET_PERCENT`` for ``SETTLE_SECONDS``: the
    tunnels can be on the bridge while the agent still works (a retried transaction)."""
    start = time.monotonic()
    while time.monotonic() - start < BOUND_SECONDS:
        ticks = cpu_ticks(pid)
        time.sleep(SETTLE_SECONDS)
        if 100 * (cpu_ticks(pid) - ticks) / CLOCK_TICKS / SETTLE_SECONDS < QUIET_PERCENT:
            return time.monotonic() - start
    return None


def at_rest(lab: Lab, pid: int, rest: float) -> dict[str, Any]:
    assert lab.consul is not None
    log = lab.consul.log_file
    settled = settle(pid)
    start_offset, start_ticks, start = log.stat().st_size, cpu_ticks(pid), time.monotonic()
    time.sleep(rest)
    end_offset, end_ticks, took = log.stat().st_size, cpu_ticks(pid), time.monotonic() - start
    kinds = consul_requests(log, start_offset, end_offset, lab.hosts[0].ip)
    watches = sum(n for kind, n in kinds.items() if kind.startswith("watch "))
    ever = consul_requests(log, 0, end_offset, lab.hosts[0].ip)
    return {
        "settle_s": settled,
        "rss_mb": rss_mb(pid),
        "cpu_percent": 100 * (end_ticks - start_ticks) / CLOCK_TICKS / took,
        "watch_returns_per_s": watches / took,
        "other_requests_per_s": (sum(kinds.values()) - watches) / took,
        "requests": dict(kinds),
        "watched": sorted(kind.split(" ", 1)[1] for kind in ever if kind.startswith("watch ")),
    }


def agent_pid(lab: Lab) -> int:
    pid = lab.agents[0].pid  # nsenter execs the agent: the same process
    assert "python" in Path(f"/proc/{pid}/cmdline").read_text(), "not the agent's pid"
    return pid


def run_one(networks: int, sizes: list[int], rest: float) -> dict[str, Any]:
    """One lab with ``networks`` networks; every figure for every N in ``sizes``."""
    results: dict[str, Any] = {"networks": networks, "rest_s": rest, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        lab = BenchLab(1, Path(tmp))
        try:
            lab.dataplane(0, *({"op": "create_network", "name": f"scale{i}",
                                "cidr": f"10.{100 + i}.0.0/24", "vni": 7000 + i}
                               for i in range(networks)))
            lab.start_agent(0)
            pid = agent_pid(lab)
            peers = Peers(lab)
            for size in sizes:
                figures: dict[str, Any] = {}
                ticks = cpu_ticks(pid)
                last = peers.join(0, size)
                figures["join_s"], found = wait_for_tunnels(lab, size * networks, last)
                figures["join_cpu_s"] = (cpu_ticks(pid) - ticks) / CLOCK_TICKS
                figures["tunnels"], figures["flows"] = found, flow_count(lab)
                figures["join_peak_rss_mb"] = rss_mb(pid)
                figures.update(at_rest(lab, pid, rest))
                leaving = min(LEAVERS, size)
                last = peers.leave(0, leaving)
                figures["leavers"] = leaving
                figures["leave_s"], figures["tunnels_after_leave"] = wait_for_tunnels(
                    lab, (size - leaving) * networks, last)
                if size == max(sizes):
                    last = peers.join(0, leaving)
                    figures["rejoin_s"], figures["tunnels_after_rejoin"] = wait_for_tunnels(
                        lab, size * networks, last)
                    process = lab.agents.pop(0)
                    start = time.monotonic()
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(60)
                        figures["stop_s"] = time.monotonic() - start
                    except subprocess.TimeoutExpired:
                        figures["stop_s"] = None
                        process.kill()
                        process.wait(10)
                elif leaving < size:
                    peers.leave(leaving, size - leaving)
                    wait_for_tunnels(lab, 0, time.monotonic())
                results["sizes"][size] = figures
                print(json.dumps({"networks": networks, "peers": size, **figures}),
                      file=sys.stderr, flush=True)
        finally:
            lab.close()
    return results


def seconds(value: float | None, wanted: int, found: int) -> str:
    if value is not None:
        return f"{value:6.2f} s"
    return f"not converged after {BOUND_SECONDS:.0f} s ({found} tunnels, {wanted} wanted)"


def report(results: dict[str, Any]) -> None:
    networks = results["networks"]
    print(f"{networks} network(s); userspace OVS, one lab host, real Consul; "
          f"bound {BOUND_SECONDS:.0f} s per wait; rest window {results['rest_s']:.0f} s")
    for size, f in results["sizes"].items():
        left = seconds(f["leave_s"], (size - f["leavers"]) * networks, f["tunnels_after_leave"])
        print(f"  N={size:3}  tunnels {f['tunnels']:5} flows {f['flows']:5}  "
              f"join {seconds(f['join_s'], size * networks, f['tunnels'])} "
              f"(agent CPU {f['join_cpu_s']:.1f} s)  "
              f"{f['leavers']} leave {left}")
        settled = ("never" if f["settle_s"] is None
                   else f"{f['settle_s']:.0f} s after the tunnels were up")
        print(f"         agent quiet (< {QUIET_PERCENT:.0f} % CPU): {settled}")
        print(f"         at rest: RSS {f['rss_mb']:.0f} MB, CPU {f['cpu_percent']:.1f} %, "
              f"Consul: {f['watch_returns_per_s']:.2f} watch returns/s, "
              f"{f['other_requests_per_s']:.2f} other requests/s {f['requests']}; "
              f"folders watched (seen returning so far): {' '.join(f['watched'])}")
        if "stop_s" in f:
            stop = "did not stop in 60 s" if f["stop_s"] is None else f"{f['stop_s']:.2f} s"
            rejoin = seconds(f["rejoin_s"], size * networks, f["tunnels_after_rejoin"])
            print(f"         {f['leavers']} rejoin {rejoin}; SIGTERM to exit: {stop}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--rest", type=float, default=REST_SECONDS,
                        help="seconds of the rest window (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if max(args.peers) > 200:
        raise SystemExit("at most 200 peers: the lab subnet has room for no more")
    everything = []
    for networks in args.networks:
        results = run_one(networks, sorted(args.peers), args.rest)
        report(results)
        everything.append(results)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["peers"]:
        asyncio.run(play_peers())
    else:
        main()
