"""serve's one start sequence on a single host: readiness reported, a create waits for it.

Real components: a private dockerd, a Consul dev agent and Open vSwitch, with serve, Consul and
OVS inside one lab namespace (the bridge's devices stay out of the host's own namespace).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.netns import LabHost, Underlay
from tests.support.consul import ConsulAgent
from tests.support.dockerd import DockerDaemon
from tests.support.images import DOCKER
from tests.support.ovs import OvsInstance
from tests.support.serve import POWERPLANE, ServeProcess

pytestmark = pytest.mark.lab

CIDR = "10.33.0.0/24"


class SingleHost:
    """One lab namespace holding Consul; OVS and serve are started by each test."""

    def __init__(self, netns: LabHost, consul: ConsulAgent, dockerd: DockerDaemon,
                 workdir: Path) -> None:
        self.netns = netns
        self.consul = consul
        self.dockerd = dockerd
        self.workdir = workdir

    def serve(self, name: str, *extra: str) -> ServeProcess:
        ovs_dir = self.workdir / name / "ovs"
        return ServeProcess.start(
            self.workdir / name, self.dockerd.url,
            ["--consul", self.consul.http_addr, "--consul-prefix", f"{name}/",
             "--ovsdb", f"unix:{ovs_dir / 'db.sock'}", "--datapath", "netdev",
             "--bridge", f"pp{name}", "--host-id", name, "--reconcile-interval", "3600",
             *extra],
            command_prefix=self.netns.command([]))

    def start_ovs(self, name: str) -> OvsInstance:
        return OvsInstance.start(self.workdir / name / "ovs", netns=self.netns.name)

    def powerplane(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.netns.run([POWERPLANE, *args, "--consul", self.consul.http_addr,
                               "--consul-prefix", f"{name}/"], check=False)

    def sandboxes(self) -> list[str]:
        return subprocess.run(
            [DOCKER, "-H", self.dockerd.url, "ps", "-aq", "--filter",
             "label=io.powerplane.role=sandbox"], capture_output=True, text=True,
            check=True).stdout.split()


@pytest.fixture(scope="module")
def host(dockerd: DockerDaemon, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[SingleHost]:
    with Underlay(1) as lab:
        consul = ConsulAgent.start_dev(tmp_path_factory.mktemp("consul"),
                                       netns=lab.hosts[0].name)
        try:
            yield SingleHost(lab.hosts[0], consul, dockerd, tmp_path_factory.mktemp("start"))
        finally:
            consul.kill()


def _docker(serve: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, "-H", serve.url, *args], capture_output=True, text=True,
                          timeout=120, check=False)


def _wait_for(predicate: object, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {seconds} s")
        time.sleep(0.05)


def test_a_create_during_start_up_waits_for_the_data_plane(
    host: SingleHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With OVS not up yet, serve says `starting` (to systemd too); a create waits instead of
    being refused, and completes once OVS answers; then serve is `ready` and tells systemd
    READY=1, the host is registered, and the container has its overlay address."""
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    serve = host.serve("early", "--dataplane-wait", "90")
    ovs: OvsInstance | None = None
    try:
        _wait_for(lambda: "dataplane" in ((serve.status() or {}).get("waiting_for") or {}),
                  "serve waiting for the data plane")
        status = serve.status() or {}
        assert status["state"] == "starting"
        outcome: list[subprocess.CompletedProcess[str]] = []
        create = threading.Thread(target=lambda: outcome.append(_docker(
            serve, "run", "-d", "--name", "early-app", "-e", f"SOCKETPLANE_CIDR={CIDR}",
            "busybox", "sleep", "1000")))
        create.start()
        time.sleep(1.5)
        assert create.is_alive(), f"the create did not wait: {outcome}"
        ovs = host.start_ovs("early")
        create.join(timeout=120)
        assert outcome and outcome[0].returncode == 0, outcome
        _wait_for(lambda: (serve.status() or {}).get("state") == "ready", "serve ready")
        told: list[bytes] = []
        while b"READY=1" not in told:
            told.append(systemd.recv(4096))
        assert any(m.startswith(b"STATUS=waiting for dataplane") for m in told), told
        assert (serve.status() or {}).get("overlay_mtu") == 1450
        address = _docker(serve, "exec", "early-app", "ip", "-4", "addr", "show", "eth0")
        assert "inet 10.33.0.2/24" in address.stdout, address.stdout + address.stderr
        hosts = json.loads(host.powerplane("early", "hosts", "--json").stdout)
        assert [h["host_id"] for h in hosts] == ["early"]
        info = json.loads(host.powerplane("early", "network", "info", "net-10.33.0.0-24",
                                          "--json").stdout)
        app_id = _docker(serve, "inspect", "-f", "{{.Id}}", "early-app").stdout.strip()
        assert [(e["container"], e["ip"], e["host"]) for e in info["endpoints"]] == [
            (app_id, "10.33.0.2", "early")]
        assert info["endpoints"][0]["port"].startswith("ovs")
        assert _docker(serve, "rm", "-f", "early-app").returncode == 0
    finally:
        serve.stop()
        systemd.close()
        if ovs is not None:
            ovs.stop()


def test_a_create_that_waits_too_long_is_refused_and_leaves_nothing(host: SingleHost) -> None:
    """Past --dataplane-wait the create gets a 503 naming the data plane and why; no sandbox,
    network or address is left behind."""
    serve = host.serve("never", "--dataplane-wait", "1")
    try:
        result = _docker(serve, "run", "-d", "--name", "never-app", "-e",
                         f"SOCKETPLANE_CIDR={CIDR}", "busybox", "sleep", "1000")
        assert result.returncode != 0
        assert "dataplane of this host is not ready after 1 s" in result.stderr
        assert "Open vSwitch at unix:" in result.stderr
        assert host.sandboxes() == []
        # Nothing was created in Consul either: not even the network SOCKETPLANE_CIDR names.
        assert json.loads(host.powerplane("never", "network", "list", "--json").stdout) == []
        assert (serve.status() or {}).get("state") == "starting"
    finally:
        serve.stop()
