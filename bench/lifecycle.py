"""Container lifecycle cost: `docker run --rm` on the overlay vs. `--net=none` (issue 5).

Builds a 1-host end-to-end lab (``tests.e2e.cluster.E2ELab``: dockerd, OVS, Consul and
``powerplane serve`` in a network namespace) and, in one run, side by side:

* serial: median wall time of ``docker run --rm -e SOCKETPLANE_CIDR=10.0.6.0/24 busybox true``
  through the proxy vs. ``docker run --rm --net=none busybox true`` straight on the daemon
  (interleaved, after warm-ups); target overlay/none <= 1.5x;
* parallel: wall time of N such runs launched at once (threads), each mode; target: the
  parallel wall time well under N serial runs (i.e. not serialised). Repeated, medians.

Every run uses ``--pull=never`` (busybox is imported into the lab daemon).

    sudo /opt/powerplane/bin/python -m bench.lifecycle [--serial 15] [--parallel 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.cluster import E2ELab, Host

CIDR = "10.0.6.0/24"
SERIAL_TARGET = 1.5
# "Well under N x": the parallel batch must take less than half of N serial runs.
PARALLEL_FRACTION = 0.5

MODES = {
    "overlay": (("run", "--rm", "--pull=never", "-e", f"SOCKETPLANE_CIDR={CIDR}",
                 "busybox", "true"), False),
    "none": (("run", "--rm", "--pull=never", "--net=none", "busybox", "true"), True),
}


def _run_once(host: Host, mode: str) -> float:
    args, direct = MODES[mode]
    started = time.perf_counter()
    host.docker_cli(*args, direct=direct, timeout=300)
    return time.perf_counter() - started


def _parallel(host: Host, mode: str, n: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(lambda _: _run_once(host, mode), range(n)))
    return time.perf_counter() - started


def _count(rows: list[str]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row or "?"] = counts.get(row or "?", 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def _drain(host: Host, timeout: float = 30) -> None:
    """Untimed: until the sandboxes of finished overlay runs are gone (torn down lazily)."""
    deadline = time.monotonic() + timeout
    while host.sandboxes() and time.monotonic() < deadline:
        time.sleep(0.2)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serial", type=int, default=15, help="timed serial runs per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per mode first")
    parser.add_argument("--parallel", type=int, default=20, help="runs launched at once")
    parser.add_argument("--rounds", type=int, default=3, help="parallel batches per mode")
    args = parser.parse_args()

    began = time.perf_counter()
    with (tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as workdir,
          E2ELab(1, Path(workdir)) as lab):
        host = lab.hosts[0]
        setup = time.perf_counter() - began
        for _ in range(args.warmup):
            for mode in MODES:
                _run_once(host, mode)
        serial: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.serial):
            for mode in MODES:
                serial[mode].append(_run_once(host, mode))
        parallel: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                _drain(host)
                parallel[mode].append(_parallel(host, mode, args.parallel))
        fmt = '{{.Label "io.powerplane.role"}}:{{.State}}'
        leftover = host.docker_cli("ps", "-a", "--format", fmt, direct=True).stdout.split()
        time.sleep(5)
        later = host.docker_cli("ps", "-a", "--format", fmt, direct=True).stdout.split()

    n = args.parallel
    med = {mode: statistics.median(v) for mode, v in serial.items()}
    par = {mode: statistics.median(v) for mode, v in parallel.items()}
    ratio = med["overlay"] / med["none"]
    print(f"lab setup {setup:.1f} s, total {time.perf_counter() - began:.1f} s; "
          f"{args.serial} serial runs/mode after {args.warmup} warm-ups, "
          f"{args.rounds} x {n} parallel/mode")
    print(f"containers on the daemon right after the last batch: {_count(leftover)}; "
          f"5 s later: {_count(later)}")
    print()
    print("| measurement | overlay (proxy) | --net=none (direct) | result | target |")
    print("|---|---|---|---|---|")
    print(f"| serial run, median | {med['overlay']:.3f} s | {med['none']:.3f} s "
          f"| overlay/none {ratio:.2f}x "
          f"| <= {SERIAL_TARGET}x: {_verdict(ratio <= SERIAL_TARGET)} |")
    print(f"| serial run, min / max | {min(serial['overlay']):.3f} / "
          f"{max(serial['overlay']):.3f} s | {min(serial['none']):.3f} / "
          f"{max(serial['none']):.3f} s | | |")
    print(f"| {n} at once, median wall | {par['overlay']:.2f} s | {par['none']:.2f} s "
          f"| overlay/none {par['overlay'] / par['none']:.2f}x | |")
    for mode, label in (("overlay", "overlay"), ("none", "--net=none")):
        x = par[mode] / med[mode]
        ok = x < n * PARALLEL_FRACTION
        print(f"| {n} at once / 1 serial, {label} | | | {x:.1f}x "
              f"| < {n * PARALLEL_FRACTION:.0f}x (not {n}x): {_verdict(ok)} |")
    print()
    print("raw parallel wall times (s): "
          + "; ".join(f"{m}: {', '.join(f'{t:.2f}' for t in v)}" for m, v in parallel.items()))


if __name__ == "__main__":
    main()
