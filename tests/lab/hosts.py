"""The multi-host lab: namespace hosts, each with its own OVS and host agent, and Consul.

``Lab(n, workdir)`` builds on ``Underlay``: a ``consul agent -dev`` in the underlay namespace on
its bridge address, an ovsdb-server + ovs-vswitchd per host started inside the host's namespace
with the host's own OVS_* directories, and on request the host agent (tests/lab/agent.py, i.e.
``host_runtime`` as ``serve`` runs it) per host. ``host_env(i)`` is the POWERPLANE_* environment
of host i, so a later end-to-end test can run ``powerplane serve`` (and a private dockerd from
tests/support/dockerd.py) inside ``lab.hosts[i]`` instead.

Container namespaces are named namespaces of the lab (``add_namespace``), so teardown removes
and checks them with everything else. ``close()`` asserts nothing is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.lab.netns import LabHost, Underlay
from tests.support.consul import ConsulAgent
from tests.support.ovs import OvsInstance

REPO = Path(__file__).resolve().parents[2]


class Lab:
    """N simulated hosts on an isolated underlay, with OVS per host and one Consul."""

    def __init__(self, n_hosts: int, workdir: Path, *, datapath: str = "netdev") -> None:
        self.workdir = workdir
        self.datapath = datapath
        self.underlay = Underlay(n_hosts)
        self.consul: ConsulAgent | None = None
        self.ovs: list[OvsInstance] = []
        self.agents: dict[int, subprocess.Popen[Any]] = {}
        try:
            switch = self.underlay.underlay
            self.consul = ConsulAgent.start_dev(workdir / "consul", netns=switch.name,
                                                client_addr=switch.ip)
            for index, host in enumerate(self.hosts):
                self.ovs.append(OvsInstance.start(workdir / f"h{index + 1}" / "ovs",
                                                  netns=host.name))
        except BaseException:
            self.close(check=False)
            raise

    @property
    def hosts(self) -> list[LabHost]:
        return self.underlay.hosts

    def host_env(self, index: int) -> dict[str, str]:
        """The POWERPLANE_* settings of host ``index`` (0-based)."""
        assert self.consul is not None
        host = self.hosts[index]
        return {
            "POWERPLANE_CONSUL": self.consul.http_addr,
            # The lab has no Docker: its tests plug ports themselves, with no sandbox behind
            # them. Pointing the agent at a socket where nothing listens keeps it off the host's
            # own dockerd, and its endpoint reconciler, which needs Docker to know what exists,
            # postpones every run instead of removing those ports (e2e tests cover it).
            "POWERPLANE_DOCKER": f"unix://{self.workdir / 'no-docker.sock'}",
            "POWERPLANE_UNDERLAY_IP": host.ip,
            "POWERPLANE_DATAPATH": self.datapath,
            "POWERPLANE_OVSDB": self.ovs[index].db_url,
            "POWERPLANE_HOST_ID": host.name,
            "POWERPLANE_HOST_TTL": "10",
            # Often, so that a module's tests run through many reconciliations whatever the
            # machine's speed: what they plug must survive them.
            "POWERPLANE_RECONCILE_INTERVAL": "2",
            "POWERPLANE_LOG_LEVEL": "debug",
        }

    def _python(self, index: int, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def _env(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERPLANE_", "CONSUL_"))}
        return {**env, **self.host_env(index), "PYTHONPATH": str(REPO)}

    def start_agent(self, index: int) -> None:
        """Start host ``index``'s agent and wait until its runtime is up."""
        log = open(self.workdir / f"h{index + 1}" / "agent.log", "ab")  # noqa: SIM115
        try:
            process = self.hosts[index].popen(self._python(index, "tests.lab.agent"),
                                              env=self._env(index), cwd=REPO, stdout=log,
                                              stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.agents[index] = process
        log_path = self.workdir / f"h{index + 1}" / "agent.log"
        deadline = time.monotonic() + 30
        while "agent ready" not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent {index + 1} did not start:\n{log_path.read_text()}")
            time.sleep(0.05)

    def stop_agent(self, index: int) -> None:
        process = self.agents.pop(index)
        process.terminate()
        process.wait(20)

    def dataplane(self, index: int, *ops: dict[str, Any]) -> list[Any]:
        """Run data-plane operations (see tests/lab/dp.py) inside host ``index``."""
        result = self.hosts[index].run(self._python(index, "tests.lab.dp", json.dumps(ops)),
                                       env=self._env(index), cwd=REPO)
        value: list[Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return value

    def close(self, check: bool = True) -> None:
        """Stop agents, OVS and Consul; remove the namespaces; assert nothing is left."""
        for index in list(self.agents):
            try:
                self.stop_agent(index)
            except subprocess.TimeoutExpired:
                self.agents.pop(index, None)
        for ovs in self.ovs:
            ovs.stop()
        if self.consul is not None:
            self.consul.stop()
        self.underlay.close(check=check)
