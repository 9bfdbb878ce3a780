"""Real Consul agents for tests: a private dev agent, or a server cluster inside lab namespaces.

Several test runs share this machine, so a dev agent takes free ports for everything it listens
on and keeps its files under the caller's directory. Cluster members live in their own network
namespaces, where the standard ports are free. ``raft_multiplier = 1`` makes leader elections
take about a second instead of several (LAB.md); the update check is always off, as nothing may
leave the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONSUL = "consul"
STANDARD_HTTP_PORT = 8500
READY_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port that nothing listens on right now (a small race we accept in tests)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports: all are held at once while they are chosen, since a
    port just released may be handed out again by the next bind."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _nsenter(netns: str | None, args: Sequence[str]) -> list[str]:
    if netns is None:
        return list(args)
    return ["nsenter", f"--net=/run/netns/{netns}", *args]


class ConsulAgent:
    """One consul agent process; ``http_addr`` is ``HOST:PORT`` as seen from its namespace."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        args: Sequence[str],
        *,
        http_addr: str,
        netns: str | None,
        name: str,
    ) -> None:
        self.workdir = workdir
        self.netns = netns
        self.name = name
        self.http_addr = http_addr
        self.config_file = workdir / "config.json"
        self.log_file = workdir / "consul.log"
        self._args = list(args)
        self._process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(config, indent=2))

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def start_dev(
        cls,
        workdir: Path,
        *,
        netns: str | None = None,
        client_addr: str = "127.0.0.1",
        extra_config: dict[str, Any] | None = None,
    ) -> ConsulAgent:
        """Start ``consul agent -dev`` on free ports; return once its KV store answers.

        ``extra_config`` is merged into the agent's JSON config (e.g. an ``acl`` block).
        """
        name = f"dev-{secrets.token_hex(3)}"
        http_port, server_port, serf_lan_port, serf_wan_port = free_ports(4)
        config = {
            "disable_update_check": True,
            "node_name": name,
            "ports": {
                "http": http_port,
                "dns": -1,
                "grpc": -1,
                "server": server_port,
                "serf_lan": serf_lan_port,
                "serf_wan": serf_wan_port,
            },
            **(extra_config or {}),
        }
        workdir = Path(workdir)
        args = ["agent", "-dev", "-bind", "127.0.0.1", "-client", client_addr]
        host = "127.0.0.1" if client_addr in ("0.0.0.0", "127.0.0.1") else client_addr.split()[0]
        agent = cls(workdir, config, args, http_addr=f"{host}:{http_port}", netns=netns, name=name)
        agent.start()
        return agent

    @classmethod
    def start_cluster(
        cls, workdir: Path, members: Sequence[tuple[str, str]]
    ) -> list[ConsulAgent]:
        """Start one server per (netns, ip); return once a leader is elected and KV answers."""
        agents: list[ConsulAgent] = []
        tag = secrets.token_hex(2)
        ips = [ip for _, ip in members]
        try:
            for index, (netns, ip) in enumerate(members, start=1):
                home = Path(workdir) / f"server{index}"
                config = {
                    "disable_update_check": True,
                    "node_name": f"server{index}-{tag}",
                    "server": True,
                    "bootstrap_expect": len(members),
                    "bind_addr": ip,
                    "client_addr": f"127.0.0.1 {ip}",
                    "retry_join": [other for other in ips if other != ip],
                    "retry_interval": "1s",
                    "data_dir": str(home / "data"),
                    "performance": {"raft_multiplier": 1},
                    "ports": {"dns": -1, "grpc": -1},
                    "leave_on_terminate": False,
                    "skip_leave_on_interrupt": True,
                }
                agent = cls(
                    home,
                    config,
                    ["agent"],
                    http_addr=f"{ip}:{STANDARD_HTTP_PORT}",
                    netns=netns,
                    name=f"server{index}-{tag}",
                )
                agent.start(wait=False)
                agents.append(agent)
            for agent in agents:
                agent.wait_ready(need_leader=True)
        except BaseException:
            for agent in agents:
                agent.kill()
            raise
        return agents

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, *, wait: bool = True) -> None:
        if self.running:
            return
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                _nsenter(self.netns, [CONSUL, *self._args, "-config-file", str(self.config_file)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if wait:
            try:
                self.wait_ready(need_leader=True)
            except BaseException:
                self.kill()
                raise

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL the agent (a crash); no-op if it is not running."""
        self._signal(signal.SIGKILL, timeout=10.0)

    def stop(self) -> None:
        """Stop the agent gracefully, SIGKILL after 10 s."""
        if not self._signal(signal.SIGTERM, timeout=10.0):
            self.kill()

    def restart(self) -> None:
        """Kill and start again with the same configuration and data; wait until ready."""
        self.kill()
        self.start()

    def _signal(self, signum: int, timeout: float) -> bool:
        process = self._process
        if process is None or process.poll() is not None:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    # -- queries -----------------------------------------------------------------------------

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` from the agent's HTTP API, from inside its namespace."""
        url = f"http://{self.http_addr}{path}"
        if self.netns is None:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return int(response.status), response.read().decode()
            except urllib.error.HTTPError as exc:
                return int(exc.code), exc.read().decode(errors="replace")
        result = subprocess.run(
            _nsenter(self.netns, ["curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}", url]),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise OSError(f"curl {url} failed with {result.returncode}: {result.stderr.strip()}")
        body, _, code = result.stdout.rpartition("\n")
        return int(code), body

    def leader(self) -> str:
        """The leader's server address (``IP:8300``) as this agent sees it; "" if none."""
        try:
            status, body = self.http_get("/v1/status/leader")
        except OSError:
            return ""
        return json.loads(body) if status == 200 and body else ""

    @property
    def bind_ip(self) -> str:
        return self.http_addr.rsplit(":", 1)[0]

    def is_leader(self) -> bool:
        return self.leader().rsplit(":", 1)[0] == self.bind_ip

    def wait_ready(self, *, need_leader: bool = True, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the agent answers KV reads (and sees a leader); raise if it died."""
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"consul {self.name} exited with {self._process.returncode}: {self.log_tail()}"
                )
            try:
                if not need_leader or self.leader():
                    status, _ = self.http_get("/v1/kv/powerplane-readiness-probe")
                    if status in (200, 403, 404):  # 403: ACLs on, KV is up
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"consul {self.name} not ready in {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"ConsulAgent({self.name!r}, http_addr={self.http_addr!r}, netns={self.netns!r})"
