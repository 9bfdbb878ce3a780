"""The end-to-end lab: N namespace hosts, each a complete Powerplane host.

Every host has its own dockerd (inside its namespace), its own OVS (userspace datapath), a
Consul server (the hosts form one cluster) and ``powerplane serve`` in front of its dockerd.
Tests drive it with the real ``docker`` CLI pointed at a host's proxy socket, exactly as a user
with ``DOCKER_HOST`` set would. ``close()`` stops everything and asserts nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.lab.netns import LabHost, Underlay
from tests.support.consul import ConsulAgent
from tests.support.dockerd import CGROUP_ROOT, DockerDaemon, ping, session_members
from tests.support.images import import_busybox
from tests.support.ovs import OvsInstance

REPO = Path(__file__).resolve().parents[2]
# The powerplane of the environment running the tests, as tests/support/serve.py finds it.
POWERPLANE = str(Path(sys.executable).with_name("powerplane"))
DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
RECONCILE_INTERVAL = 3.0
# Outside addresses of the lab's underlay (192.168.50.0/24) that floating IPs come from.
FLOATING_RANGE = "192.168.50.128/26"


class Host:
    """One simulated host of the end-to-end lab."""

    def __init__(self, lab: E2ELab, index: int, netns: LabHost, consul: ConsulAgent) -> None:
        self.lab = lab
        self.index = index
        self.netns = netns
        self.consul = consul
        self.name = f"h{index + 1}"
        self.dir = lab.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proxy_socket = lab.sockets / f"{self.name}.sock"
        self.ovs = OvsInstance.start(self.dir / "ovs", netns=netns.name)
        self.docker = DockerDaemon.start(self.dir / "docker", netns=netns.name,
                                         cgroup_parent=f"{lab.tag}-{self.name}")
        import_busybox(self.docker.url)
        self.serve: subprocess.Popen[bytes] | None = None
        self._dockerd_args: list[str] = []  # dockerd's command line while it is down

    @property
    def env(self) -> dict[str, str]:
        """The POWERPLANE_* settings this host's `powerplane serve` runs with."""
        return {
            "POWERPLANE_LISTEN": f"unix://{self.proxy_socket}",
            "POWERPLANE_DOCKER": self.docker.url,
            "POWERPLANE_CONSUL": self.consul.http_addr,
            "POWERPLANE_UNDERLAY_IP": self.netns.ip,
            "POWERPLANE_DATAPATH": "netdev",
            "POWERPLANE_OVSDB": self.ovs.db_url,
            "POWERPLANE_HOST_ID": self.name,
            "POWERPLANE_HOST_TTL": "10",
            "POWERPLANE_RECONCILE_INTERVAL": str(RECONCILE_INTERVAL),
            "POWERPLANE_LOG_LEVEL": "info",
            "POWERPLANE_RUN_DIR": str(self.dir / "run"),
            "POWERPLANE_FLOATING_RANGE": FLOATING_RANGE,
        }

    def start_serve(self, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERPLANE_", "CONSUL_"))}
        log = (self.dir / "serve.log").open("ab")
        try:
            self.serve = self.netns.popen([POWERPLANE, "serve", *self.lab.serve_args, *extra],
                                          env={**env, **self.env},
                                          stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        # Ready as serve reports it: listeners, Consul session and data plane all up.
        deadline = time.monotonic() + 30
        while not self.serve_ready():
            if self.serve.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: serve did not come up:\n{self.serve_log()}")
            time.sleep(0.1)

    def serve_ready(self) -> bool:
        try:
            status = json.loads((self.dir / "run" / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(status.get("state") == "ready" and self.serve is not None
                    and status.get("pid") == self.serve.pid)

    def kill_serve(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to serve and reap it. One that has not exited 20 s later is SIGKILLed,
        so nothing outlives the lab, and the stop is reported as the failure it is."""
        serve, self.serve = self.serve, None
        if serve is None or serve.poll() is not None:
            return
        os.killpg(serve.pid, sig)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
            raise AssertionError(f"{self.name}: serve did not exit within 20 s of signal "
                                 f"{sig}:\n{self.serve_log()[-3000:]}") from None

    def serve_log(self) -> str:
        path = self.dir / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def docker_cli(self, *args: str, check: bool = True, direct: bool = False,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the real docker CLI against this host's proxy (or its dockerd when ``direct``)."""
        url = self.docker.url if direct else f"unix://{self.proxy_socket}"
        result = subprocess.run([DOCKER, "-H", url, *args], capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: docker {' '.join(args)} exited "
                                 f"{result.returncode}:\n{result.stdout}{result.stderr}\n"
                                 f"--- serve log (tail) ---\n{self.serve_log()[-3000:]}")
        return result

    def powerplane(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the powerplane CLI inside this host, with this host's settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERPLANE_", "CONSUL_"))}
        result = self.netns.run([POWERPLANE, *args], check=False, env={**env, **self.env})
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: powerplane {' '.join(args)} exited "
                                 f"{result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def ovs_ports(self) -> list[str]:
        return self.ovs.vsctl("list-ports", "powerplane0").split()

    def sandboxes(self, network: str | None = None) -> list[str]:
        """Sandbox containers on this host's dockerd (of ``network`` only, when given)."""
        filters = ["--filter", "label=io.powerplane.role=sandbox"]
        if network is not None:
            filters += ["--filter", f"label=io.powerplane.network={network}"]
        return self.docker_cli("ps", "-aq", "--no-trunc", *filters, direct=True).stdout.split()

    def stop(self) -> None:
        """Stop serve, dockerd and OVS: each one even when an earlier one failed; the first
        failure is raised afterwards."""
        _all_of(self.kill_serve, self.docker.stop, self.ovs.stop)

    # -- faults: one host's daemons stopped, killed and started again ---------------------------

    def stop_dockerd(self) -> None:
        """Stop this host's dockerd as an operator would (SIGTERM); its data-root stays."""
        self._dockerd_args = self._dockerd_command()
        self.docker.process.send_signal(signal.SIGTERM)
        self.docker.process.wait(30)

    def kill_dockerd(self) -> None:
        """SIGKILL dockerd, its containerd and shims and every container of this host."""
        self._dockerd_args = self._dockerd_command()
        session = self.docker.process.pid
        cgroup = self.lab.tag + "-" + self.name
        while victims := session_members(session) | _cgroup_members(cgroup):
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.docker.process.wait(30)

    def _dockerd_command(self) -> list[str]:
        # nsenter has exec'd dockerd: the process shows dockerd's own command line.
        return ["nsenter", f"--net={self.netns.netns_path}", *_cmdline(self.docker.process.pid)]

    def start_dockerd(self) -> None:
        """Start dockerd again with the command line (and data-root) it had; wait for /_ping."""
        log = self.docker.log_path.open("ab")
        try:
            self.docker.process = subprocess.Popen(
                self._dockerd_args, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 60
        while not ping(self.docker.socket, timeout=1.0):
            if self.docker.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: dockerd did not come back:\n"
                                     f"{self.docker.log_tail()}")
            time.sleep(0.05)

    def forget_mounts(self) -> None:
        """What a reboot does to dockerd's mounts and runtime state: gone (after kill_dockerd)."""
        roots = [self.docker.data_root, self.docker.exec_root, self.docker.run_dir]
        for mount_point in _mounts_under(roots):
            subprocess.run(["umount", "-l", mount_point], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.docker.exec_root, ignore_errors=True)
        for stale in ("docker.sock", "dockerd.pid"):
            (self.docker.run_dir / stale).unlink(missing_ok=True)

    def power_cycle_kernel_state(self) -> None:
        """What a reboot does to this host's kernel once its processes are dead (kill them
        first): dockerd's mounts and runtime files, OVS's tap devices and the XDP program on
        the underlay port are gone, and the boot network configuration puts the underlay
        address back on eth0."""
        self.forget_mounts()
        for tap in ("br-phy", "powerplane0", "ovs-netdev"):
            self.netns.run(["ip", "link", "del", tap], check=False)
        for mode in ("xdpgeneric", "xdpdrv", "xdp"):
            self.netns.run(["ip", "link", "set", "dev", "eth0", mode, "off"], check=False)
        self.netns.run(["ip", "addr", "replace", f"{self.netns.ip}/24", "dev", "eth0"])
        self.netns.run(["ip", "link", "set", "eth0", "up"])

    def stray_veths(self) -> list[str]:
        """Container port veths (``ovs…``) in this host's namespace that OVS does not hold."""
        out = self.netns.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        held = set(self.ovs_ports())
        return sorted(n for n in names if n.startswith("ovs") and n not in held)

    def veths(self) -> list[str]:
        out = self.netns.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        return sorted(n for n in names if n.startswith("ovs"))


class E2ELab:
    """N complete hosts; a context manager that leaves nothing behind. ``serve_args`` are
    passed to every host's ``powerplane serve``."""

    def __init__(self, n_hosts: int, workdir: Path, serve_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.serve_args = tuple(serve_args)  # every serve of the lab gets these, restarts too
        self.sockets = Path(tempfile.mkdtemp(prefix="ppe-", dir="/tmp"))
        self.underlay = Underlay(n_hosts)
        self.tag = self.underlay.hosts[0].name.split("-")[0]
        self.hosts: list[Host] = []
        self.consul: list[ConsulAgent] = []
        try:
            self.consul = ConsulAgent.start_cluster(
                workdir / "consul", [(h.name, h.ip) for h in self.underlay.hosts])
            for index, netns in enumerate(self.underlay.hosts):
                self.hosts.append(Host(self, index, netns, self.consul[index]))
            for host in self.hosts:
                host.start_serve()
            self.wait_for_mesh()
        except BaseException:
            self.close(check=False)
            raise

    def wait_for_mesh(self, timeout: float = 30) -> None:
        """Until every host sees every other in `powerplane hosts`."""
        deadline = time.monotonic() + timeout
        want = {h.name for h in self.hosts}
        while True:
            out = self.hosts[0].powerplane("hosts", "--json", check=False).stdout
            seen = {h["host_id"] for h in json.loads(out or "[]")} if out.strip() else set()
            if seen >= want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"hosts registered: {seen}, wanted {want}")
            time.sleep(0.2)

    def consul_kv(self, prefix: str) -> dict[str, Any]:
        """Every key under powerplane/<prefix> as Consul holds it (read with curl in the lab)."""
        agent = self.consul[0]
        result = self.underlay.hosts[0].run(
            ["curl", "-s", f"http://{agent.http_addr}/v1/kv/powerplane/{prefix}?recurse=true"],
            check=False)
        if not result.stdout.strip():
            return {}
        return {item["Key"]: item for item in json.loads(result.stdout)}

    def close(self, check: bool = True) -> None:
        """Stop every host and Consul agent, then remove the namespaces: all of it even when a
        step fails (a serve that would not stop left the whole lab behind once)."""
        _all_of(*(host.stop for host in self.hosts), *(agent.stop for agent in self.consul),
                lambda: self.underlay.close(check=check),
                lambda: shutil.rmtree(self.sockets, ignore_errors=True))

    def __enter__(self) -> E2ELab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(check=exc_info[0] is None)


def _all_of(*steps: Callable[[], object]) -> None:
    """Run every step; raise the first failure once all have run."""
    failures: list[BaseException] = []
    for step in steps:
        try:
            step()
        except Exception as exc:  # collected, raised below
            failures.append(exc)
    if failures:
        raise failures[0]


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cgroup_members(name: str) -> set[int]:
    found = set()
    for root in (CGROUP_ROOT / name, *(h / name for h in CGROUP_ROOT.iterdir() if h.is_dir())):
        if not root.is_dir():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                found.update(int(pid) for pid in procs.read_text().split())
    return {pid for pid in found if _alive(pid)}


def _mounts_under(roots: list[Path]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if any(mount_point == str(r) or mount_point.startswith(f"{r}/") for r in roots):
            found.append(mount_point)
    return sorted(set(found), key=len, reverse=True)


def addresses_of(output: str) -> Sequence[str]:
    """IPv4 addresses in `ip -4 addr` output."""
    return [word.split("/")[0] for line in output.splitlines()
            if (words := line.split()) and words[0] == "inet" for word in words[1:2]]
