"""A private Docker daemon for tests: own socket, data-root, exec-root, pidfile, cgroup parent
and network namespace.

Several engineers' test runs share this machine, so every daemon gets fresh directories and
touches nothing global: no bridge, no iptables, no ip forwarding (LAB.md). Flags are not enough
for the network: a dockerd started with ``--bridge=none`` deletes a ``docker0`` it finds in its
namespace, which broke the machine's own Docker ("could not find bridge docker0"). So a daemon
always runs in a network namespace: the caller's (a lab host's) or, by default, a fresh one of
its own that ``stop`` removes. Its containers use ``--net=none`` or another container's network;
clients reach it through its unix socket, which no namespace hides.

The exec-root and the socket live in a short directory under /tmp because unix socket paths are
limited to 107 bytes and containerd puts its own sockets below the exec-root. The daemon is
started with ``nsenter --net=...``; ``ip netns exec`` would remount /sys and dockerd fails there.

``stop`` is idempotent and leaves nothing behind: the daemon and its containerd are stopped,
mounts left under the data-root or exec-root are unmounted, the cgroup parent is emptied and
removed, and a namespace of its own is deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.netns import add_netns, delete_netns

DOCKERD = "dockerd"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _process_alive(pid: int) -> bool:
    # PID 1 reaps orphans only every few seconds here: a zombie counts as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def session_members(session: int) -> set[int]:
    """The live processes of the session ``session`` (its leader's pid)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields after the command: state, ppid, pgrp, session.
        if int(fields[3]) == session and _process_alive(int(entry.name)):
            found.add(int(entry.name))
    return found


def ping(sock: Path, timeout: float = 2.0) -> bool:
    """True when a Docker daemon answers ``GET /_ping`` with OK on the unix socket ``sock``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(sock))
            conn.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"OK")


def _mounts_under(roots: list[Path]) -> list[str]:
    """Mount points below any of ``roots``, deepest first, from this process's mount table."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mount_point = line.split()[4].replace("\\040", " ")
            if any(mount_point == str(r) or mount_point.startswith(f"{r}/") for r in roots):
                found.append(mount_point)
    return sorted(set(found), key=len, reverse=True)


def _remove_cgroup_tree(path: Path) -> None:
    """Kill whatever still runs in the cgroup ``path`` (cgroup v1 or v2) and remove it."""
    if not path.is_dir():
        return
    children = [p for p in path.iterdir() if p.is_dir()]
    for child in children:
        _remove_cgroup_tree(child)
    for procs_file in ("cgroup.procs", "tasks"):
        with contextlib.suppress(OSError):
            for pid in (path / procs_file).read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


class DockerDaemon:
    """One running dockerd; ``url`` is what ``docker -H`` and docker-py take."""

    def __init__(
        self,
        root: Path,
        run_dir: Path,
        process: subprocess.Popen[bytes],
        cgroup_parent: str | None,
        netns: str,
        owns_netns: bool,
    ) -> None:
        self.root = root
        self.run_dir = run_dir
        self.process = process
        self.cgroup_parent = cgroup_parent
        self.netns = netns
        self._owns_netns = owns_netns
        self.socket = run_dir / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.data_root = root / "data"
        self.exec_root = run_dir / "exec"
        self.log_path = root / "dockerd.log"
        self._stopped = False

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        netns: str | None = None,
        cgroup_parent: str | None = None,
    ) -> DockerDaemon:
        """Start a daemon keeping its files under ``workdir``; return once ``/_ping`` answers.

        It runs in the network namespace ``netns``, or in a new one of its own when None.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        owns_netns = netns is None
        if netns is None:
            netns = add_netns("dockerd")
        root = Path(tempfile.mkdtemp(prefix="dockerd-", dir=workdir))
        run_dir = Path(tempfile.mkdtemp(prefix="ppd-", dir="/tmp"))
        data_root, exec_root = root / "data", run_dir / "exec"
        args = [
            DOCKERD,
            "-H", f"unix://{run_dir / 'docker.sock'}",
            "--data-root", str(data_root),
            "--exec-root", str(exec_root),
            "--pidfile", str(run_dir / "dockerd.pid"),
            "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
            "--ip-masq=false", "--userland-proxy=false",
            # Containers get 1 s, not 10, to stop on SIGTERM: teardown stays fast.
            "--shutdown-timeout=1",
        ]
        if cgroup_parent is not None:
            args.append(f"--cgroup-parent=/{cgroup_parent.strip('/')}")
        args = ["nsenter", f"--net=/run/netns/{netns}", *args]
        try:
            with (root / "dockerd.log").open("wb") as log:
                process = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except BaseException:
            if owns_netns:
                delete_netns(netns)
            raise
        daemon = cls(root, run_dir, process, cgroup_parent, netns, owns_netns)
        try:
            daemon._wait_ready()
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ping(self.socket, timeout=1.0):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.process.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"dockerd not ready after {READY_TIMEOUT}s: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the daemon logged, for error messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """Stop the daemon and remove every trace of it; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self._kill_containers()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The whole session: dockerd, its containerd and any shims it started.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        self._kill_leftover_session()
        for mount_point in _mounts_under([self.data_root, self.exec_root, self.run_dir]):
            subprocess.run(["umount", "-l", mount_point], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.cgroup_parent is not None:
            name = self.cgroup_parent.strip("/")
            for hierarchy in CGROUP_ROOT.iterdir():
                _remove_cgroup_tree(hierarchy / name)
            _remove_cgroup_tree(CGROUP_ROOT / name)
        if self._owns_netns:
            delete_netns(self.netns)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_containers(self) -> None:
        """Kill running containers first: dockerd gives each one 10 s to stop on shutdown."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            ids = subprocess.run(
                ["docker", "-H", self.url, "ps", "-q"], capture_output=True, text=True,
                timeout=10, check=True,
            ).stdout.split()
            if ids:
                subprocess.run(["docker", "-H", self.url, "kill", *ids], capture_output=True,
                               timeout=10, check=False)

    def _kill_leftover_session(self) -> None:
        """containerd shims outlive dockerd in its session; they must not outlive the test."""
        for pid in session_members(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> DockerDaemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
