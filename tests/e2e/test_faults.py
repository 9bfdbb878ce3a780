"""Faults survived (issue 13): one host's daemons fail, the overlay comes back whole.

Each test breaks one host of a 3-host lab the way production breaks (a daemon restarted, a crash,
a Consul outage, a reboot, serve killed mid-create), waits for what the failed part reports as
ready, and ends with ``assert_consistent``: nothing lost, nothing leaked, as Consul, OVS, Docker
and the kernel each see it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.cluster import DOCKER, RECONCILE_INTERVAL, E2ELab, Host, addresses_of

pytestmark = pytest.mark.lab

SANDBOX_LABEL = "io.powerplane.sandbox"
ROLE_FILTER = "label=io.powerplane.role=sandbox"
# Bounds on waiting for a condition, in reconcile intervals; never a sleep before a check.
CONVERGE_SECONDS = RECONCILE_INTERVAL * 4 + 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ELab]:
    with E2ELab(3, tmp_path_factory.mktemp("faults")) as built:
        yield built


@pytest.fixture(autouse=True)
def healthy(lab: E2ELab) -> None:
    """Each fault starts on a healthy lab: every Consul agent sees a leader, every serve is
    ready (a previous fault's host may still be rejoining its Consul cluster)."""
    for host in lab.hosts:
        host.consul.wait_ready(need_leader=True)
        serve_waits_ready(host)


# -- waiting -------------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], object], timeout: float = CONVERGE_SECONDS,
             interval: float = 0.2) -> object:
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


def overlay_ip(host: Host, container: str) -> str | None:
    result = host.docker_cli("exec", container, "ip", "-4", "addr", "show", "eth0",
                             check=False, direct=True)
    found = addresses_of(result.stdout) if result.returncode == 0 else []
    return found[0] if found else None


def pings(host: Host, container: str, ip: str, count: int = 1) -> bool:
    result = host.docker_cli("exec", container, "ping", "-c", str(count), "-W", "1", ip,
                             check=False, direct=True)
    return result.returncode == 0


def wait_ping(host: Host, container: str, ip: str) -> None:
    wait_for(f"{host.name}/{container} reaches {ip}", lambda: pings(host, container, ip))


def running(host: Host, container: str) -> bool:
    result = host.docker_cli("inspect", "-f", "{{.State.Running}}", container, check=False,
                             direct=True)
    return result.stdout.strip() == "true"


def run_app(host: Host, name: str, cidr: str, *extra: str) -> str:
    """``docker run -d`` through the proxy; the container's overlay address."""
    host.docker_cli("run", "-d", "--name", name, "-e", f"SOCKETPLANE_CIDR={cidr}", *extra,
                    "busybox", "sleep", "100000")
    ip = overlay_ip(host, name)
    assert ip is not None, f"{name} has no overlay address"
    return ip


def serve_waits_ready(host: Host) -> None:
    wait_for(f"{host.name}: serve reports ready", host.serve_ready)


# -- nothing lost, nothing leaked ----------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    """What one host holds, from Docker, OVS and the kernel."""

    apps: dict[str, str]  # app id -> its sandbox id
    sandboxes: set[str]
    ports: set[str]  # OVS container ports (ovs…)
    veths: set[str]  # host-side veths named ovs…


def inventory(host: Host) -> Inventory:
    ids = host.docker_cli("ps", "-aq", "--no-trunc", "--filter", f"label={SANDBOX_LABEL}",
                          direct=True).stdout.split()
    apps: dict[str, str] = {}
    if ids:
        for info in json.loads(host.docker_cli("inspect", *ids, direct=True).stdout):
            apps[info["Id"]] = info["Config"]["Labels"][SANDBOX_LABEL]
    sandboxes = set(host.docker_cli("ps", "-aq", "--no-trunc", "--filter", ROLE_FILTER,
                                    direct=True).stdout.split())
    ports = {p for p in host.ovs_ports() if p.startswith("ovs")}
    return Inventory(apps, sandboxes, ports, set(host.veths()))


def port_of(container_id: str) -> str:
    return "ovs" + container_id[:12]


def problems(lab: E2ELab) -> list[str]:
    """Every disagreement between Consul, OVS, Docker and the kernel; [] when consistent."""
    found: list[str] = []
    endpoints = {key.rsplit("/", 1)[1]: json.loads(_value(item))
                 for key, item in lab.consul_kv("endpoints/").items()}
    addresses = {key.split("addresses/", 1)[1]: json.loads(_value(item))
                 for key, item in lab.consul_kv("addresses/").items()}
    held = {(f"{record['network']}/{record['ip']}") for record in endpoints.values()}
    for key in sorted(set(addresses) - held):
        found.append(f"Consul: address {key} held by no endpoint ({addresses[key]})")
    for key in sorted(held - set(addresses)):
        found.append(f"Consul: an endpoint holds {key} but no address key does")
    for host in lab.hosts:
        inv = inventory(host)
        mine = {app: e for app, e in endpoints.items() if e["host"] == host.name}
        for app in sorted(set(mine) - set(inv.apps)):
            found.append(f"{host.name}: endpoint of {app[:12]} but no such container")
        for app in sorted(set(inv.apps) - set(mine)):
            found.append(f"{host.name}: container {app[:12]} has no endpoint record")
        for app, record in mine.items():
            sandbox = inv.apps.get(app)
            if sandbox is None:
                continue
            owner = addresses.get(f"{record['network']}/{record['ip']}", {}).get("container")
            if owner != sandbox:
                found.append(f"{host.name}: {record['ip']} of {app[:12]} is held by "
                             f"{str(owner)[:12]}, not its sandbox {sandbox[:12]}")
        used = set(inv.apps.values())
        for sandbox in sorted(inv.sandboxes - used):
            found.append(f"{host.name}: orphan sandbox {sandbox[:12]}")
        for sandbox in sorted(used - inv.sandboxes):
            found.append(f"{host.name}: sandbox {sandbox[:12]} of an app is gone")
        wanted_ports = {port_of(s) for s in used & inv.sandboxes}
        for port in sorted(inv.ports - wanted_ports):
            found.append(f"{host.name}: OVS port {port} has no sandbox")
        for port in sorted(wanted_ports - inv.ports):
            found.append(f"{host.name}: sandbox of {port} has no OVS port")
        for veth in sorted(inv.veths - inv.ports):
            found.append(f"{host.name}: stray veth {veth}")
        for port in sorted(inv.ports - inv.veths):
            found.append(f"{host.name}: OVS port {port} has no veth")
    return found


def _value(item: dict[str, object]) -> str:
    import base64

    raw = item.get("Value")
    return base64.b64decode(str(raw)).decode() if raw else "null"


def assert_consistent(lab: E2ELab) -> None:
    """Nothing lost, nothing leaked: waits (bounded) for reconciliation to agree everywhere."""
    last: list[str] = []

    def check() -> bool:
        nonlocal last
        last = problems(lab)
        return not last

    try:
        wait_for("Consul, OVS, Docker and the kernel agree", check)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n  " + "\n  ".join(last)) from None


def remove(host: Host, *names: str) -> None:
    if names:
        host.docker_cli("rm", "-f", *names)


# -- the faults ----------------------------------------------------------------------------------


def test_dockerd_restart_brings_restart_policy_containers_back(lab: E2ELab) -> None:
    """dockerd stopped and started on the same data-root: `--restart unless-stopped` containers
    return on their old addresses and reach a peer on another host."""
    a, b = lab.hosts[0], lab.hosts[1]
    cidr = "10.13.1.0/24"
    kept = run_app(a, "dr-kept", cidr, "--restart", "unless-stopped")
    peer = run_app(b, "dr-peer", cidr)
    wait_ping(b, "dr-peer", kept)

    a.stop_dockerd()
    a.start_dockerd()

    wait_for("dr-kept running again", lambda: running(a, "dr-kept"))
    wait_for("dr-kept back on its old address", lambda: overlay_ip(a, "dr-kept") == kept)
    wait_ping(a, "dr-kept", peer)
    wait_ping(b, "dr-peer", kept)
    assert_consistent(lab)
    remove(a, "dr-kept")
    remove(b, "dr-peer")
    assert_consistent(lab)


def switch_state(host: Host) -> tuple[list[str], str] | None:
    """The bridge's ports (containers and tunnels) and its OpenFlow table, without counters;
    None while there is no bridge, or while a restarted vswitchd has not opened its
    management socket yet (`ovs-ofctl` then fails: "not a bridge or a socket")."""
    try:
        if "powerplane0" not in host.ovs.vsctl("list-br").split():
            return None
        # Ports by name: a bridge made again on a fresh database numbers them anew.
        dump = host.ovs.ofctl("--names", "dump-flows", "powerplane0")
    except RuntimeError:
        return None
    flows = [" ".join(word for word in line.split() if not word.startswith(
                 ("cookie=", "duration=", "n_packets=", "n_bytes=", "idle_age=", "hard_age=")))
             for line in dump.splitlines()[1:]]
    return sorted(host.ovs_ports()), "\n".join(sorted(flows))


def test_ovs_killed_and_restarted_comes_back(lab: E2ELab) -> None:
    """ovs-vswitchd and ovsdb-server SIGKILLed and started again on their database: bridge,
    ports, tunnels and flows are back within one reconcile interval; traffic resumes."""
    a, b = lab.hosts[0], lab.hosts[1]
    cidr = "10.13.2.0/24"
    mine = run_app(a, "ovs-mine", cidr)
    peer = run_app(b, "ovs-peer", cidr)
    wait_ping(a, "ovs-mine", peer)
    before = switch_state(a)

    a.ovs.kill()
    a.ovs.restart()
    restarted = time.monotonic()

    wait_for("the bridge as it was", lambda: switch_state(a) == before,
             timeout=RECONCILE_INTERVAL * 2)
    wait_ping(a, "ovs-mine", peer)
    wait_ping(b, "ovs-peer", mine)
    print(f"traffic back {time.monotonic() - restarted:.1f} s after OVS restarted")
    serve_waits_ready(a)
    assert_consistent(lab)
    remove(a, "ovs-mine")
    remove(b, "ovs-peer")
    assert_consistent(lab)


def test_ovs_restarted_on_a_fresh_database(lab: E2ELab) -> None:
    """OVS killed and started on an empty database (as after a reinstall): serve notices the
    bridge is gone and puts back bridge, underlay, ports and tunnels within one reconcile
    interval; traffic resumes."""
    a, b = lab.hosts[0], lab.hosts[1]
    cidr = "10.13.6.0/24"
    mine = run_app(a, "ovsf-mine", cidr)
    peer = run_app(b, "ovsf-peer", cidr)
    wait_ping(a, "ovsf-mine", peer)
    before = switch_state(a)

    a.ovs.kill()
    a.ovs.restart(fresh_database=True)
    # The underlay address sits on an OVS bridge: this host's Consul was cut off with OVS and
    # rejoins its cluster only once serve put the underlay back. Ports need Consul (their
    # network and address) to be plugged again; the bound starts once it answers.
    wait_for(f"{a.name}: bridge put back", lambda: switch_state(a) is not None)
    a.consul.wait_ready(need_leader=True)

    # One interval to notice, one for the work: the bound, not a wait.
    wait_for("the bridge as it was", lambda: switch_state(a) == before,
             timeout=RECONCILE_INTERVAL * 2)
    wait_ping(a, "ovsf-mine", peer)
    wait_ping(b, "ovsf-peer", mine)
    assert_consistent(lab)
    remove(a, "ovsf-mine")
    remove(b, "ovsf-peer")
    assert_consistent(lab)


class Pinger:
    """``ping`` from a container, running in the background for a stretch of time."""

    def __init__(self, host: Host, container: str, ip: str, seconds: float) -> None:
        count = int(seconds / 0.5) + 1
        self.process = subprocess.Popen(
            [DOCKER, "-H", host.docker.url, "exec", container, "ping", "-i", "0.5", "-W", "2",
             "-c", str(count), ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.what = f"{host.name}/{container} -> {ip}"

    def lost(self) -> tuple[int, str]:
        """Packets lost (waits for the run to end) and ping's summary."""
        out, _ = self.process.communicate(timeout=120)
        summary = next((line for line in out.splitlines() if "packets transmitted" in line), "")
        words = summary.replace(",", "").split()
        sent, received = int(words[0]), int(words[3])
        return sent - received, f"{self.what}: {summary}"


OUTAGE_SECONDS = 30.0


def test_consul_agent_down_for_30s(lab: E2ELab) -> None:
    """The local Consul agent of one host stopped for 30 s: traffic between containers goes on,
    a create on that host fails within seconds naming Consul, and afterwards all agrees."""
    a, b = lab.hosts[0], lab.hosts[1]
    cidr = "10.13.3.0/24"
    mine = run_app(a, "cs-mine", cidr)
    peer = run_app(b, "cs-peer", cidr)
    wait_ping(a, "cs-mine", peer)
    wait_ping(b, "cs-peer", mine)
    before = a.docker_cli("ps", "-aq", direct=True).stdout.split()

    pingers = [Pinger(a, "cs-mine", peer, OUTAGE_SECONDS + 5),
               Pinger(b, "cs-peer", mine, OUTAGE_SECONDS + 5)]
    a.consul.stop()
    stopped = time.monotonic()
    try:
        started = time.monotonic()
        refused = a.docker_cli("run", "-d", "--name", "cs-refused", "-e",
                               f"SOCKETPLANE_CIDR={cidr}", "busybox", "true", check=False)
        took = time.monotonic() - started
        assert refused.returncode != 0, refused.stdout
        assert "Consul" in refused.stderr, refused.stderr
        assert took < 15, f"a create with Consul down took {took:.1f} s: {refused.stderr}"
        # The outage lasts its full length whatever happens above: that is the fault.
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
    finally:
        a.consul.start(wait=False)
    a.consul.wait_ready(need_leader=True)
    for pinger in pingers:
        lost, summary = pinger.lost()
        assert lost == 0, summary

    assert a.docker_cli("ps", "-aq", direct=True).stdout.split() == before
    serve_waits_ready(a)
    wait_ping(a, "cs-mine", peer)
    a.docker_cli("run", "-d", "--name", "cs-after", "-e", f"SOCKETPLANE_CIDR={cidr}",
                 "busybox", "sleep", "100000")
    assert_consistent(lab)
    remove(a, "cs-mine", "cs-after")
    remove(b, "cs-peer")
    assert_consistent(lab)


def tunnels_to(host: Host, ip: str) -> list[str]:
    out = host.ovs.vsctl("--columns=name,options", "find", "interface", "type=vxlan")
    return [line for line in out.split("\n\n") if f'remote_ip="{ip}"' in line]


def test_host_reboot(lab: E2ELab) -> None:
    """Every process of one host SIGKILLed and its runtime state lost, as in a power cut; then
    started in the documented order (OVS, Consul, Docker, serve): restart-policy containers
    return on their addresses and peers reach them again."""
    a, c = lab.hosts[0], lab.hosts[2]
    cidr = "10.13.4.0/24"
    kept = run_app(c, "rb-kept", cidr, "--restart", "unless-stopped")
    peer = run_app(a, "rb-peer", cidr)
    wait_ping(a, "rb-peer", kept)

    c.kill_serve(signal.SIGKILL)
    c.kill_dockerd()
    c.ovs.kill()
    c.consul.kill()
    c.power_cycle_kernel_state()

    c.ovs.restart()
    c.consul.start(wait=False)
    c.start_dockerd()
    c.start_serve()  # returns once serve reports ready: data plane, Consul session, listeners
    c.consul.wait_ready(need_leader=True)

    wait_for("rb-kept running again", lambda: running(c, "rb-kept"))
    wait_for("rb-kept back on its old address", lambda: overlay_ip(c, "rb-kept") == kept)
    wait_ping(c, "rb-kept", peer)
    wait_ping(a, "rb-peer", kept)
    for other in (a, lab.hosts[1]):
        # c registers again asynchronously once its Consul has a leader: tunnels follow.
        wait_for(f"{other.name} has a tunnel to {c.name}",
                 lambda other=other: bool(tunnels_to(other, c.netns.ip)))
    assert_consistent(lab)
    remove(c, "rb-kept")
    remove(a, "rb-peer")
    assert_consistent(lab)


def apps_of(host: Host) -> list[str]:
    return host.docker_cli("ps", "-aq", "--filter", f"label={SANDBOX_LABEL}",
                           direct=True).stdout.split()


def test_serve_killed_during_parallel_creates(lab: E2ELab) -> None:
    """serve SIGKILLed while 20 `docker run -d` are under way, then started again: containers
    whose run succeeded work, the others are gone or complete; nothing leaks."""
    a, b = lab.hosts[0], lab.hosts[1]
    cidr = "10.13.5.0/24"
    peer = run_app(a, "par-peer", cidr)
    outcome: dict[int, bool] = {}

    def create(index: int) -> None:
        result = b.docker_cli("run", "-d", "--name", f"par{index}", "-e",
                              f"SOCKETPLANE_CIDR={cidr}", "busybox", "sleep", "100000",
                              check=False, timeout=120)
        outcome[index] = result.returncode == 0

    threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    # Mid-flight: some apps created already, others still on their way.
    wait_for("creates under way", lambda: len(apps_of(b)) >= 3, interval=0.05)
    b.kill_serve(signal.SIGKILL)
    for thread in threads:
        thread.join(150)
    b.start_serve()

    done = sorted(i for i, ok in outcome.items() if ok)
    print(f"serve killed: {len(done)} of 20 runs succeeded, {len(apps_of(b))} apps exist")
    assert_consistent(lab)
    for index in done:
        assert running(b, f"par{index}"), f"par{index} was created but does not run"
        wait_ping(b, f"par{index}", peer)
    # Created but never started (serve died between create and start): complete, so a
    # `docker start` through the proxy gives a working container.
    for name in b.docker_cli("ps", "-a", "--format", "{{.Names}}", "--filter", "name=par",
                             "--filter", "status=created", direct=True).stdout.split():
        b.docker_cli("start", name)
        wait_ping(b, name, peer)
    leftover = b.docker_cli("ps", "-aq", "--filter", "name=par", direct=True).stdout.split()
    remove(b, *leftover)
    remove(a, "par-peer")
    assert_consistent(lab)
