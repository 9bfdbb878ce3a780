"""The socketplane + Powerstrip walkthrough, automated on three complete namespace hosts."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.cluster import DOCKER, RECONCILE_INTERVAL, E2ELab, Host, addresses_of

pytestmark = pytest.mark.lab

CIDR = "10.0.6.1/24"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ELab]:
    with E2ELab(3, tmp_path_factory.mktemp("e2e")) as built:
        yield built


def overlay_ip(host: Host, container: str) -> str:
    out = host.docker_cli("exec", container, "ip", "-4", "addr", "show", "eth0").stdout
    (ip,) = addresses_of(out)
    return ip


def test_containers_on_two_hosts_ping_each_other(lab: E2ELab) -> None:
    """docker create/start on hosts A and B; B pings A's overlay address; inspect shows it."""
    a, b = lab.hosts[0], lab.hosts[1]
    a.docker_cli("create", "--name", "t1", "-e", f"SOCKETPLANE_CIDR={CIDR}", "busybox",
                 "sleep", "1000")
    b.docker_cli("create", "--name", "t2", "-e", f"SOCKETPLANE_CIDR={CIDR}", "busybox",
                 "sleep", "1000")
    a.docker_cli("start", "t1")
    b.docker_cli("start", "t2")
    t1, t2 = overlay_ip(a, "t1"), overlay_ip(b, "t2")
    assert t1.startswith("10.0.6.") and t2.startswith("10.0.6.") and t1 != t2
    ping = b.docker_cli("exec", "t2", "ping", "-c3", "-W2", t1, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "3 packets received" in ping.stdout
    inspected = json.loads(b.docker_cli("inspect", "t2").stdout)[0]
    assert inspected["NetworkSettings"]["IPAddress"] == t2
    fmt = b.docker_cli("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "t2").stdout.strip()
    assert fmt == t2


def test_network_is_up_before_the_entrypoint(lab: E2ELab) -> None:
    """`docker run --rm` on the overlay: the first process already sees eth0 with its address."""
    host = lab.hosts[2]
    out = host.docker_cli("run", "--rm", "-e", "SOCKETPLANE_CIDR=10.0.6.0/24", "busybox",
                          "ip", "-4", "addr", "show", "eth0").stdout
    (ip,) = addresses_of(out)
    assert ip.startswith("10.0.6.")


def test_restart_after_the_sandbox_stopped_replugs(lab: E2ELab) -> None:
    """The sandbox stopped behind our back (as after a daemon restart): `docker start` through
    the proxy starts it again, wires its new namespace, and the app keeps its address."""
    a, b = lab.hosts[0], lab.hosts[1]
    a.docker_cli("run", "-d", "--name", "phoenix", "-e", f"SOCKETPLANE_CIDR={CIDR}", "busybox",
                 "sleep", "1000")
    before = overlay_ip(a, "phoenix")
    sandbox = a.docker_cli("inspect", "-f", '{{index .Config.Labels "io.powerplane.sandbox"}}',
                           "phoenix").stdout.strip()
    a.docker_cli("stop", "-t", "1", "phoenix", direct=True)
    a.docker_cli("stop", "-t", "1", sandbox, direct=True)
    a.docker_cli("start", "phoenix")
    assert overlay_ip(a, "phoenix") == before
    b.docker_cli("run", "-d", "--name", "phoenix-peer", "-e", f"SOCKETPLANE_CIDR={CIDR}",
                 "busybox", "sleep", "1000")
    ping = b.docker_cli("exec", "phoenix-peer", "ping", "-c3", "-W2", before, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    for host, name in ((a, "phoenix"), (b, "phoenix-peer")):
        host.docker_cli("rm", "-f", name)


def test_web_server_on_one_host_serves_another(lab: E2ELab) -> None:
    """A busybox httpd on host C answers wget from a container on host A over the overlay."""
    a, c = lab.hosts[0], lab.hosts[2]
    c.docker_cli("run", "-d", "--name", "web", "-e", f"SOCKETPLANE_CIDR={CIDR}", "busybox",
                 "sh", "-c", "mkdir -p /www && echo hello-from-c > /www/index.html && "
                             "exec httpd -f -p 80 -h /www")
    web = overlay_ip(c, "web")
    out = a.docker_cli("run", "--rm", "-e", f"SOCKETPLANE_CIDR={CIDR}", "busybox",
                       "wget", "-qO-", f"http://{web}/").stdout
    assert out.strip() == "hello-from-c"


def test_networks_are_isolated(lab: E2ELab) -> None:
    """A container on a second network cannot reach the first one, even with a forged address."""
    a, b = lab.hosts[0], lab.hosts[1]
    a.powerplane("network", "create", "blue", "10.0.7.0/24")
    b.docker_cli("run", "-d", "--name", "blue1", "--cap-add", "NET_ADMIN",
                 "-e", "SOCKETPLANE_NETWORK=blue", "busybox", "sleep", "1000")
    assert overlay_ip(b, "blue1").startswith("10.0.7.")
    target = overlay_ip(a, "t1") if a.docker_cli("ps", "-q", "-f", "name=t1").stdout.strip() \
        else None
    if target is None:
        a.docker_cli("run", "-d", "--name", "t1", "-e", f"SOCKETPLANE_CIDR={CIDR}", "busybox",
                     "sleep", "1000")
        target = overlay_ip(a, "t1")
    # Same subnet, forged: only L2 isolation between VNIs can stop this ping.
    b.docker_cli("exec", "blue1", "ip", "addr", "add", "10.0.6.250/24", "dev", "eth0")
    ping = b.docker_cli("exec", "blue1", "ping", "-c2", "-W1", target, check=False)
    assert ping.returncode != 0
    assert " 0 packets received" in ping.stdout


def test_thirty_parallel_containers_get_distinct_addresses(lab: E2ELab) -> None:
    """30 containers started at once across 3 hosts: distinct addresses; cross-host pairs ping."""
    def run(index: int) -> tuple[int, str]:
        host = lab.hosts[index % 3]
        name = f"par{index}"
        host.docker_cli("run", "-d", "--name", name, "-e", "SOCKETPLANE_CIDR=10.0.8.0/24",
                        "busybox", "sleep", "1000", timeout=120)
        return index, overlay_ip(host, name)

    with ThreadPoolExecutor(max_workers=30) as pool:
        ips = dict(pool.map(run, range(30)))
    assert len(set(ips.values())) == 30
    assert all(ip.startswith("10.0.8.") and ip not in ("10.0.8.0", "10.0.8.1", "10.0.8.255")
               for ip in ips.values())
    for src, dst in ((0, 1), (4, 2), (8, 9), (13, 29)):
        host = lab.hosts[src % 3]
        ping = host.docker_cli("exec", f"par{src}", "ping", "-c1", "-W2", ips[dst], check=False)
        assert ping.returncode == 0, f"par{src} -> par{dst} ({ips[dst]}): {ping.stdout}"
    for index in range(30):
        lab.hosts[index % 3].docker_cli("rm", "-f", f"par{index}")


def leftovers(lab: E2ELab, network: str) -> dict[str, list[str]]:
    """What ``network`` still holds anywhere: Consul addresses, OVS ports, sandboxes."""
    ports = []
    for host in lab.hosts:
        for port in host.ovs_ports():
            if port.startswith("ovs") and network in host.ovs.vsctl(
                    "get", "interface", port, "external_ids"):
                ports.append(f"{host.name}/{port}")
    sandboxes = [f"{host.name}/{sandbox[:12]}" for host in lab.hosts
                 for sandbox in host.sandboxes(network)]
    return {"addresses": sorted(lab.consul_kv(f"addresses/{network}/")), "ports": ports,
            "sandboxes": sandboxes}


def wait_until_empty(lab: E2ELab, network: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(lab, network)
        if not any(found.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{network} still holds {found}")
        time.sleep(0.5)


def test_nothing_leaks_however_containers_go(lab: E2ELab) -> None:
    """--rm, rm -f via proxy, rm -f behind the proxy's back, SIGKILLed serve: all cleaned up."""
    net, network = "10.0.9.0/24", "net-10.0.9.0-24"
    a, b = lab.hosts[0], lab.hosts[1]
    a.docker_cli("run", "--rm", "-e", f"SOCKETPLANE_CIDR={net}", "busybox", "true")
    a.docker_cli("run", "-d", "--name", "leak1", "-e", f"SOCKETPLANE_CIDR={net}", "busybox",
                 "sleep", "1000")
    b.docker_cli("run", "-d", "--name", "leak2", "-e", f"SOCKETPLANE_CIDR={net}", "busybox",
                 "sleep", "1000")
    assert leftovers(lab, network)["addresses"], "the two running containers hold addresses"
    a.docker_cli("rm", "-f", "leak1")
    b.docker_cli("rm", "-f", "leak2", direct=True)
    # A create in flight when serve dies: whatever it had made must be found and undone.
    creating = subprocess.Popen(
        [DOCKER, "-H", f"unix://{a.proxy_socket}", "create", "--name", "leak3",
         "-e", f"SOCKETPLANE_CIDR={net}", "busybox", "sleep", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    a.kill_serve(signal.SIGKILL)
    creating.wait(30)
    a.start_serve()
    a.docker_cli("rm", "-f", "leak3", check=False)
    wait_until_empty(lab, network, timeout=RECONCILE_INTERVAL * 2 + 10)


def test_bad_input_is_refused_with_nothing_left(lab: E2ELab) -> None:
    """Malformed CIDR, unknown network, exhausted /29, Consul down: a clear error, no leftovers."""
    host = lab.hosts[0]
    before = set(host.docker_cli("ps", "-aq", direct=True).stdout.split())

    def refused(*env: str) -> str:
        # --pull=never: a refusal must never turn into a registry pull attempt.
        result = host.docker_cli("run", "--rm", "--pull=never", *env, "busybox", "true",
                                 check=False)
        assert "Unable to find image" not in result.stderr
        assert result.returncode != 0
        return result.stderr

    assert "invalid CIDR" in refused("-e", "SOCKETPLANE_CIDR=10.0.300.0/24")
    assert "does not exist" in refused("-e", "SOCKETPLANE_NETWORK=nosuchnet")
    host.powerplane("network", "create", "tiny", "10.0.10.0/29")
    for index in range(5):  # a /29 has 6 hosts; one is the gateway
        host.docker_cli("run", "-d", "--name", f"tiny{index}", "-e", "SOCKETPLANE_NETWORK=tiny",
                        "busybox", "sleep", "1000")
    message = refused("-e", "SOCKETPLANE_NETWORK=tiny")
    assert "tiny" in message and ("exhausted" in message or "no free" in message), message
    for index in range(5):
        host.docker_cli("rm", "-f", f"tiny{index}")
    wait_until_empty(lab, "tiny", timeout=10)

    for agent in lab.consul:
        agent.stop()
    try:
        message = refused("-e", "SOCKETPLANE_CIDR=10.0.11.0/24")
        assert "Consul" in message and "unreachable" in message, message
        # Plain Docker traffic still passes.
        assert host.docker_cli("run", "--rm", "busybox", "echo", "plain").stdout.strip() == "plain"
    finally:
        for agent in lab.consul:
            agent.start(wait=False)
        for agent in lab.consul:
            agent.wait_ready(need_leader=True)
    after = set(host.docker_cli("ps", "-aq", direct=True).stdout.split())
    assert after == before, f"containers created by refused requests: {after - before}"


def _tunnel_neighbors(host: Host) -> str:
    return host.ovs.appctl("tnl/neigh/show").stdout


def test_first_ping_to_a_fresh_container_gets_its_first_reply(lab: E2ELab) -> None:
    """The userspace datapath knows every peer's underlay MAC from Consul: even with its
    neighbour table flushed (as an ovs-vswitchd restart does), the agent puts the peers back,
    and the first ping between two fresh containers on different hosts is answered at once
    instead of after an ARP retry (about 1 s)."""
    a, c = lab.hosts[0], lab.hosts[2]
    for host in (a, c):
        host.ovs.appctl("tnl/neigh/flush")
    deadline = time.monotonic() + 10 * RECONCILE_INTERVAL
    while not (c.netns.ip in _tunnel_neighbors(a) and a.netns.ip in _tunnel_neighbors(c)):
        assert time.monotonic() < deadline, "the agents did not set the tunnel neighbours again"
        time.sleep(0.1)
    a.docker_cli("run", "-d", "--name", "first-a", "-e", "SOCKETPLANE_CIDR=10.0.8.0/24",
                 "busybox", "sleep", "1000")
    c.docker_cli("run", "-d", "--name", "first-c", "-e", "SOCKETPLANE_CIDR=10.0.8.0/24",
                 "busybox", "sleep", "1000")
    try:
        target = overlay_ip(a, "first-a")
        ping = c.docker_cli("exec", "first-c", "ping", "-c", "1", "-W", "3", target, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        first = re.search(r"seq=0 ttl=\d+ time=([\d.]+) ms", ping.stdout)
        assert first, ping.stdout
        assert float(first.group(1)) < 500, f"first reply after {first.group(1)} ms: lost, resent"
    finally:
        a.docker_cli("rm", "-f", "first-a")
        c.docker_cli("rm", "-f", "first-c")
