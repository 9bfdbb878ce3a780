"""Docker API proxy overhead: request latency, stream throughput and memory under a big upload.

Run as root from the repository: ``/opt/powerplane/bin/python bench/proxy.py [--requests 500]``.
One private dockerd, ``powerplane serve`` in front of it, and two plain byte copiers as
baselines: ``socat`` (C) and ``bench/byte_relay.py`` (the least a Python asyncio relay can do, no
HTTP). Three measurements, all in the same run:

- p50/p99 of ``GET /_ping`` and ``GET /containers/json`` over one keep-alive connection per path
  (direct dockerd socket, proxy, socat, byte relay, and a second proxy with ``--metrics-addr``);
  the paths are interleaved in shuffled rounds so a noisy machine hurts all of them alike. What
  the proxy adds to the direct median is compared with what socat adds: no process in the path
  can add less than a plain copier; what metrics cost is the metered proxy's median over the
  plain one's, and its CPU per request over the plain one's;
- throughput of two long streams, direct, proxy and socat alternating, five times each, median
  MB/s: ``GET /containers/{id}/logs`` of a container that wrote 520 MB of 1 kB lines (a chunked
  multiplexed stream) and ``GET /images/get`` of a 600 MB image (``docker save``, a chunked tar);
- the proxy's peak RSS (VmHWM) around a 1 GB build-context upload (``POST /build``, the tar made
  on the fly: a Dockerfile plus 1 GB of zeros, sent in 1 MiB pieces).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository's packages come from its root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.consul import free_port
from tests.support.dockerd import DockerDaemon
from tests.support.images import import_busybox
from tests.support.serve import ServeProcess

IMAGE_BYTES = 600_000_000
LOG_BYTES = 520_000_000
LOG_LINE = 1000
CONTEXT_BYTES = 1 << 30
CHUNK = 1 << 20
STREAM_RUNS = 5
# The proxy's added latency, as a multiple of socat's (a C byte copier in the same place).
TARGET_ADDED = 1.5
TARGET_STREAM = 0.95
TARGET_RSS_MB = 100


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket; keep-alive as long as the server allows."""

    def __init__(self, path: Path, timeout: float = 300.0) -> None:
        super().__init__("docker", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _call(conn: UnixHTTPConnection, method: str, path: str, body: object = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
    return payload


def latency(paths: dict[str, Path], endpoint: str, requests: int) -> dict[str, list[float]]:
    conns = {name: UnixHTTPConnection(sock) for name, sock in paths.items()}
    timings: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(50):  # warm-up: connections opened, caches hot
            for conn in conns.values():
                _call(conn, "GET", endpoint)
        names = list(paths)
        for _ in range(requests):
            random.shuffle(names)
            for name in names:
                started = time.perf_counter()
                _call(conns[name], "GET", endpoint)
                timings[name].append((time.perf_counter() - started) * 1000)
    finally:
        for conn in conns.values():
            conn.close()
    return timings


def read_stream(sock: Path, path: str) -> tuple[int, float]:
    """Bytes received (head and framing included) and seconds, for one raw GET until close."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(300)
        conn.connect(str(sock))
        started = time.perf_counter()
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n".encode())
        first = conn.recv_into(view)
        if not bytes(view[:first]).startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {path}: {bytes(view[:200])!r}")
        total = first
        while n := conn.recv_into(view):
            total += n
        return total, time.perf_counter() - started


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def build_context() -> tuple[int, Iterator[bytes]]:
    """(length, pieces) of a tar with a Dockerfile and ``CONTEXT_BYTES`` of zeros."""
    dockerfile = b"FROM busybox\n"

    def padded(size: int) -> int:
        return -size % 512

    length = (512 + len(dockerfile) + padded(len(dockerfile))
              + 512 + CONTEXT_BYTES + padded(CONTEXT_BYTES) + 1024)

    def pieces() -> Iterator[bytes]:
        yield _tar_header("Dockerfile", len(dockerfile))
        yield dockerfile + b"\0" * padded(len(dockerfile))
        yield _tar_header("zeros", CONTEXT_BYTES)
        zeros = bytes(CHUNK)
        left = CONTEXT_BYTES
        while left:
            piece = min(left, CHUNK)
            yield zeros if piece == CHUNK else zeros[:piece]
            left -= piece
        yield b"\0" * (padded(CONTEXT_BYTES) + 1024)

    return length, pieces()


def _cpu_seconds(pid: int) -> float:
    """CPU time all of a process's threads have run so far (schedstat: nanoseconds, where
    /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def upload_peak_rss(sock: Path, pid: int) -> tuple[float, float, float, int, str]:
    """(VmHWM before MB, VmHWM after MB, upload seconds, HTTP status, last build line)."""
    before = _status_kb(pid, "VmHWM") / 1024
    length, body = build_context()
    conn = UnixHTTPConnection(sock, timeout=600)
    try:
        started = time.perf_counter()
        conn.request("POST", "/build?t=bench-big-context&rm=1&forcerm=1&networkmode=none",
                     body=body, headers={"Content-Type": "application/x-tar",
                                         "Content-Length": str(length)})
        uploaded = time.perf_counter() - started
        response = conn.getresponse()
        output = response.read().decode(errors="replace").strip().splitlines()
    finally:
        conn.close()
    after = _status_kb(pid, "VmHWM") / 1024
    return before, after, uploaded, response.status, (output[-1] if output else "")[:120]


def stream_sources(daemon: DockerDaemon) -> dict[str, str]:
    """The paths of the streams measured: a long log and a big image, made once."""
    conn = UnixHTTPConnection(daemon.socket)
    try:
        line = "x" * (LOG_LINE - 1)
        logger = json.loads(_call(conn, "POST", "/containers/create", {
            "Image": "busybox", "NetworkDisabled": True,
            "Cmd": ["sh", "-c", f"yes {line} | head -c {LOG_BYTES}"]}))["Id"]
        holder = json.loads(_call(conn, "POST", "/containers/create", {
            "Image": "busybox", "NetworkDisabled": True,
            "Cmd": ["sh", "-c", f"head -c {IMAGE_BYTES} /dev/urandom > /big"]}))["Id"]
        for cid in (logger, holder):
            _call(conn, "POST", f"/containers/{cid}/start")
        for cid in (logger, holder):
            status = json.loads(_call(conn, "POST", f"/containers/{cid}/wait"))
            if status.get("StatusCode") != 0:
                raise RuntimeError(f"stream container failed: {status}")
        _call(conn, "POST", f"/commit?container={holder}&repo=bench-big&tag=latest")
    finally:
        conn.close()
    return {"logs": f"/containers/{logger}/logs?stdout=1&stderr=1",
            "save": "/images/get?names=bench-big:latest"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--stream-runs", type=int, default=STREAM_RUNS)
    parser.add_argument("--skip", action="append", default=[],
                        choices=["latency", "streams", "upload"],
                        help="leave a measurement out (quicker runs while working)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        daemon = serve = metered = socat = byte_relay = None
        relay_dir = Path(tempfile.mkdtemp(prefix="ppsc-", dir="/tmp"))
        try:
            daemon = DockerDaemon.start(workdir)
            import_busybox(daemon.url)
            serve = ServeProcess.start(workdir, daemon.url)
            metrics_port = free_port()
            metered = ServeProcess.start(workdir / "metered", daemon.url,
                                         ["--metrics-addr", f"127.0.0.1:{metrics_port}"])
            relay = relay_dir / "socat.sock"
            socat = subprocess.Popen(
                ["socat", f"UNIX-LISTEN:{relay},fork", f"UNIX-CONNECT:{daemon.socket}"],
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            copier = relay_dir / "byte-relay.sock"
            byte_relay = subprocess.Popen(
                [sys.executable, "-m", "bench.byte_relay", str(copier), str(daemon.socket)],
                stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            deadline = time.monotonic() + 10
            while not (relay.exists() and copier.exists()):
                if time.monotonic() > deadline:
                    raise TimeoutError("socat or the byte relay did not listen")
                time.sleep(0.05)
            paths = {"direct": daemon.socket, "proxy": serve.socket, "socat": relay,
                     "pyrelay": copier, "metrics": metered.socket}
            pid = serve.process.pid
            rss_start = _status_kb(pid, "VmHWM") / 1024

            verdicts: list[str] = []

            def verdict(ok: bool) -> str:
                return "PASS" if ok else "FAIL"

            if "latency" not in args.skip:
                print(f"latency: {args.requests} keep-alive requests per path and endpoint, "
                      "shuffled rounds")
                print(f"{'endpoint':<17} {'path':<7} {'p50 ms':>8} {'p99 ms':>8} "
                      f"{'p50/direct':>11} {'added ms':>9}")
                added_ratios = []
                relays = {"proxy": pid, "pyrelay": byte_relay.pid,
                          "metrics": metered.process.pid}
                for endpoint in ("/_ping", "/containers/json"):
                    cpu_before = {name: _cpu_seconds(relay_pid)
                                  for name, relay_pid in relays.items()}
                    timings = latency(paths, endpoint, args.requests)
                    # CPU time is what the process itself spent: unlike wall time, it does not
                    # grow with the machine's load.
                    cpu_per_request = {
                        name: (_cpu_seconds(relay_pid) - cpu_before[name]) / (args.requests + 50)
                        for name, relay_pid in relays.items()}
                    medians = {name: statistics.median(timings[name]) for name in paths}
                    base = medians["direct"]
                    for name in paths:
                        print(f"{endpoint:<17} {name:<7} {medians[name]:>8.3f} "
                              f"{_percentile(timings[name], 0.99):>8.3f} "
                              f"{medians[name] / base:>10.2f}x {medians[name] - base:>9.3f}")
                    proxy_added = medians["proxy"] - base
                    socat_added = medians["socat"] - base
                    ratio = proxy_added / socat_added if socat_added > 0 else float("inf")
                    added_ratios.append(ratio)
                    print(f"{endpoint:<17} proxy adds {proxy_added * 1000:.0f} us, socat adds "
                          f"{socat_added * 1000:.0f} us: {ratio:.2f}x socat's; CPU per request: "
                          f"proxy {cpu_per_request['proxy'] * 1e6:.0f} us, Python byte relay "
                          f"{cpu_per_request['pyrelay'] * 1e6:.0f} us")
                    print(f"{endpoint:<17} with --metrics-addr: p50 "
                          f"{medians['metrics'] / medians['proxy']:.3f}x the plain proxy's "
                          f"({(medians['metrics'] - medians['proxy']) * 1000:+.0f} us); CPU per "
                          f"request {cpu_per_request['metrics'] * 1e6:.0f} us "
                          f"({(cpu_per_request['metrics'] - cpu_per_request['proxy']) * 1e6:+.0f}"
                          " us)")
                worst = max(added_ratios)
                verdicts.append(f"  added latency <= {TARGET_ADDED}x socat's: worst "
                                f"{worst:.2f}x  {verdict(worst <= TARGET_ADDED)}")

            rss_stream = _status_kb(pid, "VmHWM") / 1024
            if "streams" not in args.skip:
                sources = stream_sources(daemon)
                for kind, source in sources.items():
                    read_stream(daemon.socket, source)  # warm the page cache
                    rates: dict[str, list[float]] = {"direct": [], "proxy": [], "socat": []}
                    size = 0
                    for _ in range(args.stream_runs):
                        for name in rates:
                            size, seconds = read_stream(paths[name], source)
                            rates[name].append(size / seconds / 1e6)
                    print(f"\nstream {kind}: GET {source.split('?')[0]}, {size / 1e6:.0f} MB, "
                          f"{args.stream_runs} runs each, alternating")
                    print(f"{'path':<7} {'median MB/s':>12} {'/direct':>8} {'runs MB/s':>30}")
                    direct_rate = statistics.median(rates["direct"])
                    for name, values in rates.items():
                        runs = ", ".join(f"{v:.0f}" for v in values)
                        median = statistics.median(values)
                        print(f"{name:<7} {median:>12.0f} {median / direct_rate:>7.2f}x "
                              f"{runs:>30}")
                    ratio = statistics.median(rates["proxy"]) / direct_rate
                    verdicts.append(f"  stream {kind} proxy/direct >= {TARGET_STREAM}x: "
                                    f"{ratio:.2f}x  {verdict(ratio >= TARGET_STREAM)}")
                rss_stream = _status_kb(pid, "VmHWM") / 1024

            if "upload" not in args.skip:
                before, after, seconds, code, last = upload_peak_rss(serve.socket, pid)
                print(f"\nbuild upload: {CONTEXT_BYTES / 2**20:.0f} MiB context through the "
                      f"proxy in {seconds:.1f} s ({CONTEXT_BYTES / seconds / 1e6:.0f} MB/s), "
                      f"HTTP {code}, last line: {last}")
                print(f"proxy VmHWM: {rss_start:.1f} MB at start, {before:.1f} MB after latency "
                      f"and stream runs ({rss_stream:.1f}), {after:.1f} MB after the upload")
                verdicts.append(f"  peak RSS < {TARGET_RSS_MB} MB: {after:.1f} MB  "
                                f"{verdict(after < TARGET_RSS_MB)}")

            print("\ntargets")
            print("\n".join(verdicts))
        finally:
            for copier_process in (socat, byte_relay):
                if copier_process is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(copier_process.pid, signal.SIGTERM)
                    copier_process.wait(timeout=10)
            for proxy_process in (serve, metered):
                if proxy_process is not None:
                    proxy_process.stop()
            if daemon is not None:
                daemon.stop()
            shutil.rmtree(relay_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
