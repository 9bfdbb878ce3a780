"""A private Open vSwitch (ovsdb-server + ovs-vswitchd) for tests, optionally inside a netns.

Every daemon gets OVS_RUNDIR/OVS_DBDIR/OVS_LOGDIR/OVS_SYSCONFDIR pointing into its own work
directory, so several instances (one per simulated host) never share a socket or a pidfile. The
daemons run in the foreground as our children (no ``--detach``): ``stop()`` can wait for them and
nothing is left for PID 1 to reap.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


def _accepts(path: Path) -> bool:
    """True when something listens on the unix socket ``path`` and accepts a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def netns_path(netns: str) -> str:
    """A netns given by name (as in /run/netns) or by path, as a path."""
    return netns if "/" in netns else f"/run/netns/{netns}"


class OvsInstance:
    """One running ovsdb-server + ovs-vswitchd pair; start with ``OvsInstance.start``."""

    def __init__(self, workdir: Path, netns: str | None) -> None:
        self.workdir = workdir
        self.netns = netns
        self.env = {
            **os.environ,
            "OVS_RUNDIR": str(workdir),
            "OVS_DBDIR": str(workdir),
            "OVS_LOGDIR": str(workdir),
            "OVS_SYSCONFDIR": str(workdir),
        }
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def db_sock(self) -> Path:
        return self.workdir / "db.sock"

    @property
    def db_url(self) -> str:
        return f"unix:{self.db_sock}"

    @classmethod
    def start(cls, workdir: Path, *, netns: str | None = None) -> OvsInstance:
        """Create a fresh database in ``workdir`` and start both daemons (about 0.1 s)."""
        workdir.mkdir(parents=True, exist_ok=True)
        ovs = cls(workdir, netns)
        try:
            ovs._start()
        except BaseException:
            ovs.stop()
            raise
        return ovs

    def _command(self, args: list[str]) -> list[str]:
        if self.netns is None:
            return args
        return ["nsenter", f"--net={netns_path(self.netns)}", *args]

    def _spawn(self, args: list[str], log_name: str) -> None:
        log = open(self.workdir / f"{log_name}.out", "wb")  # noqa: SIM115 - owned by the child
        try:
            process = subprocess.Popen(
                self._command(args), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.workdir,
            )
        finally:
            log.close()
        self._processes.append(process)

    def _start(self) -> None:
        db = self.workdir / "conf.db"
        subprocess.run(["ovsdb-tool", "create", str(db), str(SCHEMA)], check=True,
                       capture_output=True, env=self.env)
        self._start_daemons()

    def _start_daemons(self) -> None:
        db = self.workdir / "conf.db"
        self._spawn(["ovsdb-server", str(db), f"--remote=punix:{self.db_sock}",
                     f"--pidfile={self.workdir / 'ovsdb-server.pid'}",
                     f"--log-file={self.workdir / 'ovsdb-server.log'}", "--no-chdir"],
                    "ovsdb-server")
        # The socket file appears when it is bound, a moment before ovsdb-server listens on it:
        # only a connection that is accepted says it is ready.
        self._wait_for(lambda: _accepts(self.db_sock), "ovsdb-server socket")
        self.vsctl("--no-wait", "init")
        self._start_vswitchd()

    def _start_vswitchd(self) -> None:
        self._spawn(["ovs-vswitchd", self.db_url,
                     f"--pidfile={self.workdir / 'ovs-vswitchd.pid'}",
                     f"--log-file={self.workdir / 'ovs-vswitchd.log'}", "--no-chdir"],
                    "ovs-vswitchd")
        # vswitchd is ready when it has written its pidfile and answers on its control socket.
        self._wait_for(lambda: (self.workdir / "ovs-vswitchd.pid").exists(), "ovs-vswitchd")
        self._wait_for(lambda: self.appctl("version", check=False).returncode == 0,
                       "ovs-vswitchd control socket")

    def stop_vswitchd(self) -> None:
        """Stop ovs-vswitchd alone (``ovs-appctl exit``); ovsdb-server goes on answering."""
        vswitchd = self._processes.pop()  # spawned last
        self.appctl("exit", check=False)
        vswitchd.wait(10)

    def start_vswitchd(self) -> None:
        """Start ovs-vswitchd again (after ``stop_vswitchd``) on the same database."""
        (self.workdir / "ovs-vswitchd.pid").unlink(missing_ok=True)
        self._start_vswitchd()

    def kill(self) -> None:
        """SIGKILL both daemons (a crash): the database file and kernel devices stay."""
        for process in reversed(self._processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self._processes.clear()

    def restart(self, *, fresh_database: bool = False) -> None:
        """Start both daemons again (after ``kill``) on the database file they used before, or
        on a new empty one (``fresh_database``: as after a reinstall)."""
        if self._processes:
            raise RuntimeError("OVS is still running; kill it first")
        for stale in ("ovsdb-server.pid", "ovs-vswitchd.pid"):
            (self.workdir / stale).unlink(missing_ok=True)
        if fresh_database:
            db = self.workdir / "conf.db"
            db.unlink()
            subprocess.run(["ovsdb-tool", "create", str(db), str(SCHEMA)], check=True,
                           capture_output=True, env=self.env)
        self._start_daemons()

    def _wait_for(self, ready: object, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{what}: daemon exited {process.returncode}; see "
                                       f"{self.workdir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout} s")
            time.sleep(0.02)

    def vsctl(self, *args: str) -> str:
        """Run ovs-vsctl against this instance; return its stdout (raise on failure)."""
        result = subprocess.run(["ovs-vsctl", f"--db={self.db_url}", "--timeout=10", *args],
                                capture_output=True, text=True, env=self.env)
        if result.returncode != 0:
            raise RuntimeError(f"ovs-vsctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def appctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ovs-appctl -t ovs-vswitchd`` against this instance."""
        result = subprocess.run(["ovs-appctl", "-t", "ovs-vswitchd", *args],
                                capture_output=True, text=True, env=self.env)
        if check and result.returncode != 0:
            raise RuntimeError(f"ovs-appctl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def ofctl(self, *args: str) -> str:
        """Run ovs-ofctl (management socket in this instance's run dir); return stdout."""
        result = subprocess.run(["ovs-ofctl", *args], capture_output=True, text=True,
                                env=self.env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"ovs-ofctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        """Stop vswitchd, then ovsdb-server, and reap both (idempotent).

        vswitchd is asked to ``exit --cleanup`` first: the userspace datapath's tap devices
        (``ovs-netdev`` and one per internal port) outlive a plain SIGTERM.
        """
        if len(self._processes) > 1 and self._processes[1].poll() is None:
            self.appctl("exit", "--cleanup", check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._processes[1].wait(10)
        for process in reversed(self._processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)
        self._processes.clear()
