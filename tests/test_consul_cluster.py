"""Multi-host IPAM against a real 3-server Consul cluster, one server per lab host namespace.

Each simulated host runs its own allocating process against its own Consul server, like
``powerplane serve`` would; uniqueness must come from Consul alone.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.lab.netns import LabHost, Underlay
from tests.support.consul import ConsulAgent

pytestmark = pytest.mark.lab

# Run as a module from the repository root: run as a file, tests/support/consul.py would
# shadow the consul package.
REPO = Path(__file__).resolve().parent.parent
WORKER = "tests.support.state_worker"
PYTHON = sys.executable


class Cluster:
    def __init__(self, lab: Underlay, agents: list[ConsulAgent]) -> None:
        self.lab = lab
        self.agents = agents

    @property
    def hosts(self) -> list[LabHost]:
        return self.lab.hosts

    def worker(
        self, host: LabHost, prefix: str, *args: str, go_file: Path | None = None
    ) -> subprocess.Popen[str]:
        """Start the state worker in ``host``'s namespace, talking to that host's server."""
        go = ["--go-file", str(go_file)] if go_file else []
        return host.popen(
            [PYTHON, "-m", WORKER, "--consul", "127.0.0.1:8500", "--prefix", prefix, *go,
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )

    def leader(self) -> ConsulAgent:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for agent in self.agents:
                if agent.running and agent.is_leader():
                    return agent
            time.sleep(0.05)
        raise AssertionError("no Consul leader elected")


def _go(workers: Sequence[subprocess.Popen[str]], go_file: Path) -> None:
    """Wait until every worker has started up, then release them all at once."""
    for worker in workers:
        assert worker.stdout is not None
        assert json.loads(worker.stdout.readline()) == {"ready": True}
    go_file.touch()


def _results(processes: Sequence[subprocess.Popen[str]], timeout: float = 90) -> list[dict]:  # type: ignore[type-arg]
    documents = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, f"worker failed ({process.returncode}): {err}"
        documents.append(json.loads(out.strip().splitlines()[-1]))
    return documents


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three lab hosts, each running one server of a freshly bootstrapped Consul cluster."""
    with Underlay(3) as lab:
        agents = ConsulAgent.start_cluster(
            tmp_path_factory.mktemp("cluster"), [(h.name, h.ip) for h in lab.hosts]
        )
        try:
            yield Cluster(lab, agents)
        finally:
            for agent in agents:
                agent.kill()


def _prefix() -> str:
    return f"test-{secrets.token_hex(4)}/"


def _create_network(cluster: Cluster, prefix: str, cidr: str) -> dict:  # type: ignore[type-arg]
    [network] = _results([cluster.worker(cluster.hosts[0], prefix, "network-for-cidr", cidr)])
    return network


def _check_allocations(
    cluster: Cluster, prefix: str, network: dict, results: list[dict]  # type: ignore[type-arg]
) -> list[str]:
    subnet = ipaddress.IPv4Network(network["cidr"])
    reserved = {str(subnet.network_address), str(subnet.broadcast_address), network["gateway"]}
    assert [r["failed"] for r in results] == [[], [], []]
    pairs = [pair for r in results for pair in r["allocated"]]
    ips = [ip for _, ip in pairs]
    assert len(pairs) == 150
    assert len(set(ips)) == 150, "an address was handed out twice"
    assert not reserved & set(ips)
    assert all(ipaddress.IPv4Address(ip) in subnet for ip in ips)
    [stored] = _results([cluster.worker(cluster.hosts[1], prefix, "addresses", network["name"])])
    for container, ip in pairs:
        assert stored[ip] == container, f"{ip} is recorded for {stored[ip]}, not {container}"
    return ips


def test_three_hosts_allocating_at_once_never_share_an_address(
    cluster: Cluster, tmp_path: Path
) -> None:
    """3 hosts x 50 concurrent allocations on one /24 give 150 distinct usable addresses."""
    prefix = _prefix()
    network = _create_network(cluster, prefix, "10.20.0.0/24")
    go_file = tmp_path / "go"
    workers = [
        cluster.worker(host, prefix, "allocate", network["name"], "--count", "50",
                       "--tag", f"h{host.index}", "--spread", "0.3", go_file=go_file)
        for host in cluster.hosts
    ]
    _go(workers, go_file)
    _check_allocations(cluster, prefix, network, _results(workers))


def test_allocations_stay_unique_while_the_leader_is_killed_and_restarted(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Killing the Consul leader mid-run and restarting it yields no duplicate address."""
    prefix = _prefix()
    network = _create_network(cluster, prefix, "10.21.0.0/24")
    go_file = tmp_path / "go"
    workers = [
        cluster.worker(host, prefix, "allocate", network["name"], "--count", "50",
                       "--tag", f"h{host.index}", "--spread", "3", "--retry-for", "60",
                       go_file=go_file)
        for host in cluster.hosts
    ]
    _go(workers, go_file)
    time.sleep(1.0)
    leader = cluster.leader()
    leader.kill()
    time.sleep(0.5)
    leader.start()
    results = _results(workers)
    _check_allocations(cluster, prefix, network, results)
    assert any(r["retries"] for r in results), "the outage was not seen: the test proved nothing"


def test_hosts_racing_to_create_one_network_end_with_one(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Three hosts creating the network for one SOCKETPLANE_CIDR at once all get the same one."""
    prefix = _prefix()
    go_file = tmp_path / "go"
    workers = [
        cluster.worker(host, prefix, "network-for-cidr", f"10.22.0.{host.index}/24",
                       go_file=go_file)
        for host in cluster.hosts
    ]
    _go(workers, go_file)
    networks = _results(workers)
    assert networks[0]["name"] == "net-10.22.0.0-24"
    assert networks[0] == networks[1] == networks[2]
