"""Create/remove stress with crashes: does anything leak? (issue 13)

Builds a 1-host end-to-end lab (``tests.e2e.cluster.E2ELab``: dockerd, OVS, Consul and
``powerplane serve`` in a network namespace) and runs N cycles, each one of:

* ``docker run --rm`` through the proxy (the container removes itself; the destroy event
  releases its address);
* ``docker run -d`` then ``docker rm -f`` through the proxy (the DELETE hooks release it);
* ``docker run -d`` through the proxy, then ``docker rm -f`` straight on dockerd, behind the
  proxy's back (only the destroy event or reconciliation can release it);
* every ``--kill-every``-th cycle: ``docker run -d`` through the proxy while ``serve`` is killed
  with SIGKILL a random moment later (mid-create), then ``serve`` started again and the
  container, if it was created at all, removed.

Then it waits for reconciliation to settle and counts what is left with no container behind it:
address and endpoint keys in Consul, container ports on the OVS bridge, ``ovs*`` veths in the
host's namespace, sandbox containers on dockerd. It prints one line,
``N cycles, N leaked addresses, N leaked ports, N leaked veths, N leaked sandboxes``, and exits
1 if anything leaked.

    /opt/powerplane/bin/python -m bench.stress [--cycles 200] [--kill-every 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from tests.e2e.cluster import RECONCILE_INTERVAL, E2ELab, Host

CIDR = "10.0.9.0/24"
RUN = ("run", "--pull=never", "-e", f"SOCKETPLANE_CIDR={CIDR}")
# After the last cycle, leftovers must be gone within a few reconciliations.
SETTLE_SECONDS = 10 * RECONCILE_INTERVAL
KILL_WINDOW_SECONDS = 1.5


def _cycle_rm(host: Host, name: str) -> None:
    host.docker_cli(*RUN, "--rm", "--name", name, "busybox", "true")


def _cycle_rm_f(host: Host, name: str) -> None:
    host.docker_cli(*RUN, "-d", "--name", name, "busybox", "sleep", "600")
    host.docker_cli("rm", "-f", name)


def _cycle_rm_f_behind(host: Host, name: str) -> None:
    host.docker_cli(*RUN, "-d", "--name", name, "busybox", "sleep", "600")
    host.docker_cli("rm", "-f", name, direct=True)


def _cycle_kill_serve(host: Host, name: str, rng: random.Random) -> str:
    """A create in flight when serve dies; returns how the create ended."""
    outcome: list[subprocess.CompletedProcess[str]] = []
    create = threading.Thread(target=lambda: outcome.append(host.docker_cli(
        *RUN, "-d", "--name", name, "busybox", "sleep", "600", check=False, timeout=120)))
    create.start()
    # A create takes about a second here: kill anywhere in it, from the first hook to the end.
    time.sleep(rng.uniform(0.0, KILL_WINDOW_SECONDS))
    host.kill_serve(signal.SIGKILL)
    create.join(timeout=120)
    host.start_serve()
    # Whatever Docker made of it (created, or not at all), it goes now, as a user would.
    host.docker_cli("rm", "-f", name, check=False)
    return "created" if outcome and outcome[0].returncode == 0 else "refused"


def leftovers(host: Host, lab: E2ELab) -> dict[str, int]:
    """What exists with no container behind it (there are none at the end of the run)."""
    kv = lab.consul_kv("")
    veths = host.netns.run(["ip", "-o", "link", "show", "type", "veth"]).stdout.splitlines()
    return {
        "addresses": sum(1 for key in kv if "/addresses/" in key),
        "endpoints": sum(1 for key in kv if "/endpoints/" in key),
        "ports": sum(1 for port in host.ovs_ports() if port.startswith("ovs")),
        "veths": sum(1 for line in veths if line.split(":")[1].strip().startswith("ovs")),
        "sandboxes": len(host.sandboxes()),
        "containers": len(host.docker_cli("ps", "-aq", direct=True).stdout.split()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--kill-every", type=int, default=10,
                        help="every Nth cycle kills serve mid-create (0: never)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.perf_counter()
    kinds: Counter[str] = Counter()
    durations: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pp-stress-") as workdir, \
            E2ELab(1, Path(workdir)) as lab:
        host = lab.hosts[0]
        plain = (("--rm", _cycle_rm), ("rm -f via proxy", _cycle_rm_f),
                 ("rm -f behind proxy", _cycle_rm_f_behind))
        for cycle in range(args.cycles):
            name = f"stress-{cycle}"
            started = time.perf_counter()
            if args.kill_every and cycle % args.kill_every == args.kill_every - 1:
                kind = f"kill -9 serve mid-create ({_cycle_kill_serve(host, name, rng)})"
            else:
                kind, run = plain[cycle % len(plain)]
                run(host, name)
            kinds[kind] += 1
            durations.setdefault(kind.split(" (")[0], []).append(time.perf_counter() - started)
            if (cycle + 1) % 25 == 0:
                print(f"  {cycle + 1}/{args.cycles} cycles, {time.perf_counter() - began:.0f} s",
                      file=sys.stderr, flush=True)
        deadline = time.monotonic() + SETTLE_SECONDS
        left = leftovers(host, lab)
        while any(left.values()) and time.monotonic() < deadline:
            time.sleep(RECONCILE_INTERVAL / 2)
            left = leftovers(host, lab)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load}; seed {args.seed}; "
          f"{time.perf_counter() - began:.0f} s in all")
    for kind, count in sorted(kinds.items()):
        print(f"  {count:4d} x {kind}")
    for kind, times in sorted(durations.items()):
        print(f"  {kind}: median {statistics.median(times):.2f} s per cycle")
    if left["containers"] or left["endpoints"]:
        print(f"  also left: {left['containers']} containers, {left['endpoints']} endpoint records")
    print(f"{args.cycles} cycles, {left['addresses']} leaked addresses, {left['ports']} leaked "
          f"ports, {left['veths']} leaked veths, {left['sandboxes']} leaked sandboxes")
    return 1 if any(left.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
