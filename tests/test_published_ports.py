"""`docker run -p/-P/--expose` on overlay networks through the real proxy (issue #14).

One ``powerplane serve`` for the module in front of a private dockerd, with Consul and Open
vSwitch, serve, Consul and OVS inside one lab namespace: the host ports serve checks are that
namespace's, and the sockets a test holds there are the only processes in it. What is checked
is the API side: the create is accepted or refused in Docker's words with nothing left behind,
and `docker port`, `docker ps` and `docker inspect` show the mapping. Forwarding traffic to the
container is the firewall's (not here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from tests.lab.netns import LabHost
from tests.support import rawhttp
from tests.support.consul import ConsulAgent
from tests.support.dockerd import DockerDaemon
from tests.support.images import DOCKER
from tests.support.one_host import one_host
from tests.support.ovs import OvsInstance
from tests.support.serve import POWERPLANE, ServeProcess

pytestmark = pytest.mark.lab

PREFIX = "ports/"
BRIDGE = "ppports"
CIDR = "10.79.0.0/24"
INTERNAL_NETWORK, INTERNAL_CIDR = "inside", "10.78.0.0/24"
OVERLAY = ("-e", f"SOCKETPLANE_CIDR={CIDR}")
SLEEP = ("busybox", "sleep", "1000")


@dataclass(frozen=True)
class Snapshot:
    """What an overlay create makes: sandboxes, addresses in Consul, ports on the bridge."""

    sandboxes: frozenset[str]
    addresses: frozenset[str]
    ovs_ports: frozenset[str]


class Host:
    """serve, dockerd, Consul and OVS of this module."""

    def __init__(self, netns: LabHost, consul: ConsulAgent, dockerd: DockerDaemon,
                 serve: ServeProcess, ovs: OvsInstance) -> None:
        self.netns = netns
        self.consul = consul
        self.dockerd = dockerd
        self.serve = serve
        self.ovs = ovs

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The docker CLI through the proxy."""
        return subprocess.run([DOCKER, "-H", self.serve.url, *args], capture_output=True,
                              text=True, timeout=120, check=False)

    def run(self, *args: str) -> str:
        """``docker run -d`` through the proxy, which must succeed; the container id."""
        result = self.docker("run", "-d", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def snapshot(self) -> Snapshot:
        listed = rawhttp.request(
            self.dockerd.socket, "GET", "/v1.41/containers/json?all=1&filters="
            + quote(json.dumps({"label": ["io.powerplane.role=sandbox"]})), content_type=None)
        code, body = self.consul.http_get(f"/v1/kv/{PREFIX}addresses/?keys")
        assert code in (200, 404), (code, body)
        return Snapshot(
            frozenset(c["Id"] for c in listed.json),
            frozenset(json.loads(body) if code == 200 else ()),
            frozenset(self.ovs.vsctl("list-ports", BRIDGE).split()))

    def refused(self, before: Snapshot, result: subprocess.CompletedProcess[str],
                *needles: str) -> None:
        """The create failed with a message naming every needle, and nothing was made: no
        sandbox, no address in Consul, no port on the bridge; serve logged no traceback."""
        assert result.returncode != 0, result.stdout
        for needle in needles:
            assert needle in result.stderr, result.stderr
        assert self.snapshot() == before
        assert "Traceback" not in self.serve.log()


@pytest.fixture(scope="module")
def host(dockerd: DockerDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    workdir = tmp_path_factory.mktemp("ports")
    with one_host(workdir, dockerd.url, prefix=PREFIX, bridge=BRIDGE, host_id="ports") as one:
        made = one.netns.run([POWERPLANE, "network", "create", INTERNAL_NETWORK, INTERNAL_CIDR,
                              "--internal", "--consul", one.consul.http_addr,
                              "--consul-prefix", PREFIX], check=False)
        assert made.returncode == 0, made.stderr
        yield Host(one.netns, one.consul, dockerd, one.serve, one.ovs)
        assert "Traceback" not in one.serve.log(), one.serve.log()


@pytest.fixture
def containers(host: Host) -> Iterator[list[str]]:
    """Names of containers the test makes; removed through the proxy afterwards."""
    names: list[str] = []
    yield names
    if names:
        host.docker("rm", "-f", *names)


def test_published_port_shows_in_port_ps_and_inspect(host: Host, containers: list[str]) -> None:
    """-p 18080:80: the create succeeds, `docker port` and `docker ps` print the mapping,
    inspect shows it where Docker does, and the label holds it in docker run's notation."""
    containers.append("web")
    host.run("--name", "web", "-p", "18080:80", *OVERLAY, *SLEEP)
    assert host.docker("port", "web").stdout == "80/tcp -> 0.0.0.0:18080\n"
    assert host.docker("port", "web", "80").stdout == "0.0.0.0:18080\n"
    ps = host.docker("ps", "--filter", "name=^web$", "--format", "{{.Ports}}")
    assert ps.stdout == "0.0.0.0:18080->80/tcp\n", ps.stderr
    info = json.loads(host.docker("inspect", "web").stdout)[0]
    assert info["HostConfig"]["PortBindings"] == {
        "80/tcp": [{"HostIp": "", "HostPort": "18080"}]}
    assert "80/tcp" in info["Config"]["ExposedPorts"]
    assert info["NetworkSettings"]["Ports"]["80/tcp"] == [
        {"HostIp": "0.0.0.0", "HostPort": "18080"}]
    assert info["HostConfig"]["NetworkMode"].startswith("container:")
    assert json.loads(info["Config"]["Labels"]["io.powerplane.ports"]) == {
        "published": ["18080:80/tcp"], "exposed": ["80/tcp"]}


def test_publish_all_gives_exposed_ports_a_free_port(host: Host, containers: list[str]) -> None:
    """-P --expose 90 --expose 91/udp: each gets a port of the kernel's ephemeral range (of
    serve's namespace), as Docker picks them."""
    containers.append("all")
    host.run("--name", "all", "-P", "--expose", "90", "--expose", "91/udp", *OVERLAY, *SLEEP)
    low, high = map(int, host.netns.run(
        ["cat", "/proc/sys/net/ipv4/ip_local_port_range"]).stdout.split())
    mapped = dict(line.split(" -> ") for line in host.docker("port", "all").stdout.splitlines())
    assert set(mapped) == {"90/tcp", "91/udp"}
    for address in mapped.values():
        ip, _, port = address.rpartition(":")
        assert ip == "0.0.0.0" and low <= int(port) <= high


def test_ranges_udp_and_an_address(host: Host, containers: list[str]) -> None:
    """-p 18100-18102:80-82, -p 18053:53/udp, -p 127.0.0.1:18090:90 and a host range: each
    port as asked, the range's first free port taken."""
    containers.extend(["ranges", "ranges2"])
    host.run("--name", "ranges", "-p", "18100-18102:80-82", "-p", "18053:53/udp",
             "-p", "127.0.0.1:18090:90", *OVERLAY, *SLEEP)
    assert sorted(host.docker("port", "ranges").stdout.splitlines()) == [
        "53/udp -> 0.0.0.0:18053", "80/tcp -> 0.0.0.0:18100", "81/tcp -> 0.0.0.0:18101",
        "82/tcp -> 0.0.0.0:18102", "90/tcp -> 127.0.0.1:18090"]
    host.run("--name", "ranges2", "-p", "18101-18105:80", *OVERLAY, *SLEEP)
    assert host.docker("port", "ranges2").stdout == "80/tcp -> 0.0.0.0:18103\n"
    ps = host.docker("ps", "--filter", "name=^ranges$", "--format", "{{.Ports}}").stdout
    assert ps == ("0.0.0.0:18053->53/udp, 0.0.0.0:18100->80/tcp, 0.0.0.0:18101->81/tcp, "
                  "0.0.0.0:18102->82/tcp, 127.0.0.1:18090->90/tcp\n")


def test_exposed_only_is_listed_without_a_host_port(host: Host, containers: list[str]) -> None:
    """--expose 8000 alone: no mapping for `docker port`, `8000/tcp` in `docker ps`."""
    containers.append("exposed")
    host.run("--name", "exposed", "--expose", "8000", *OVERLAY, *SLEEP)
    assert host.docker("port", "exposed").stdout == ""
    ps = host.docker("ps", "--filter", "name=^exposed$", "--format", "{{.Ports}}")
    assert ps.stdout == "8000/tcp\n"


def test_a_port_another_overlay_container_publishes_is_refused(
        host: Host, containers: list[str]) -> None:
    """The second -p 18200:80 gets Docker's message and nothing is made; a created (never
    started) container holds its port too; once it is removed the port is free again."""
    containers.extend(["first", "second"])
    host.run("--name", "first", "-p", "18200:80", *OVERLAY, *SLEEP)
    before = host.snapshot()
    for address in ("", "127.0.0.1:"):
        result = host.docker("run", "-d", "--name", "second", "-p", f"{address}18200:81",
                             *OVERLAY, *SLEEP)
        host.refused(before, result, "driver failed programming external connectivity on "
                     f"endpoint second: Bind for {address or '0.0.0.0:'}18200 failed: "
                     "port is already allocated")
    host.docker("rm", "-f", "first")
    created = host.docker("create", "--name", "first", "-p", "18200:80", *OVERLAY, *SLEEP)
    assert created.returncode == 0, created.stderr
    before = host.snapshot()
    result = host.docker("run", "-d", "--name", "second", "-p", "18200:80", *OVERLAY, *SLEEP)
    host.refused(before, result, "port is already allocated")
    host.docker("rm", "-f", "first")
    host.run("--name", "second", "-p", "18200:80", *OVERLAY, *SLEEP)


@pytest.fixture
def listener(host: Host) -> Iterator[Any]:
    """Start a process in serve's namespace holding a port: listen(address, port, proto)."""
    started: list[subprocess.Popen[str]] = []

    def listen(address: str, port: int, proto: str = "tcp") -> None:
        kind = "SOCK_STREAM" if proto == "tcp" else "SOCK_DGRAM"
        code = (f"import socket, sys, time; s = socket.socket(socket.AF_INET, socket.{kind}); "
                f"s.bind(({address!r}, {port}))"
                + ("; s.listen(1)" if proto == "tcp" else "")
                + "; print('ready', flush=True); time.sleep(600)")
        process = host.netns.popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                   text=True)
        started.append(process)
        assert process.stdout is not None and process.stdout.readline() == "ready\n"

    yield listen
    for process in started:
        process.kill()
        process.wait()


@pytest.mark.parametrize(("held", "proto", "asked", "shown"), [
    ("127.0.0.1", "tcp", "18300:80", "0.0.0.0:18300"),
    ("0.0.0.0", "tcp", "127.0.0.1:18300:80", "127.0.0.1:18300"),
    ("0.0.0.0", "udp", "18300:53/udp", "0.0.0.0:18300"),
])
def test_a_port_a_process_holds_is_refused(host: Host, listener: Any, held: str, proto: str,
                                           asked: str, shown: str) -> None:
    """A socket bound in serve's namespace holds the port: Docker's userland-proxy message,
    nothing made."""
    listener(held, 18300, proto)
    before = host.snapshot()
    result = host.docker("run", "-d", "--name", "held", "-p", asked, *OVERLAY, *SLEEP)
    host.refused(before, result, "driver failed programming external connectivity on endpoint "
                 f"held: Error starting userland proxy: listen {proto}4 {shown}: bind: "
                 "address already in use")


def test_an_internal_network_refuses_published_ports(host: Host, containers: list[str]) -> None:
    """-p and -P on an --internal network: a 400 naming it; --expose alone is fine."""
    internal = ("-e", f"SOCKETPLANE_NETWORK={INTERNAL_NETWORK}")
    before = host.snapshot()
    for flags in (("-p", "18400:80"), ("-P", "--expose", "80")):
        result = host.docker("run", "-d", "--name", "inner", *flags, *internal, *SLEEP)
        host.refused(before, result, f"network {INTERNAL_NETWORK} is internal",
                     "no published ports")
    reply = rawhttp.request(host.serve.socket, "POST", "/v1.41/containers/create", json.dumps({
        "Image": "busybox", "Env": [f"SOCKETPLANE_NETWORK={INTERNAL_NETWORK}"],
        "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": "18400"}]}}}).encode())
    assert reply.status == 400, reply
    containers.append("inner")
    host.run("--name", "inner", "--expose", "80", *internal, *SLEEP)


def test_concurrent_creates_for_one_port_one_succeeds(host: Host,
                                                     containers: list[str]) -> None:
    """Four creates asking for 18500 at once: one is made, three get Docker's message, and
    only the winner's sandbox and address exist."""
    names = [f"race{i}" for i in range(4)]
    containers.extend(names)
    before = host.snapshot()
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    start = threading.Barrier(len(names))

    def create(name: str) -> None:
        start.wait()
        results[name] = host.docker("create", "--name", name, "-p", "18500:80", *OVERLAY,
                                    *SLEEP)

    threads = [threading.Thread(target=create, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    winners = [name for name, result in results.items() if result.returncode == 0]
    assert len(winners) == 1, {name: r.stderr for name, r in results.items()}
    for name, result in results.items():
        if name not in winners:
            assert "Bind for 0.0.0.0:18500 failed: port is already allocated" in result.stderr
    after = host.snapshot()
    assert len(after.sandboxes - before.sandboxes) == 1
    assert len(after.addresses - before.addresses) == 1
    # One container port (and the network's gateway port, made with its first container).
    assert len({p for p in after.ovs_ports - before.ovs_ports if p.startswith("ovs")}) == 1


def test_bad_port_flags_are_refused_before_anything_is_made(host: Host) -> None:
    """sctp and IPv6 host addresses: a clear 400 from the CLI, nothing made."""
    before = host.snapshot()
    for flags, needle in ((("-p", "18600:80/sctp"), "sctp is not supported on overlay networks"),
                          (("-p", "[::1]:18600:80"), "IPv6 host addresses are not supported")):
        result = host.docker("run", "-d", *flags, *OVERLAY, *SLEEP)
        host.refused(before, result, needle)


def test_listing_is_dockers_own_for_other_containers(host: Host,
                                                     containers: list[str]) -> None:
    """With overlay apps publishing ports in the listing, every other container is listed
    exactly as dockerd lists it, with sizes too (?size=1)."""
    containers.extend(["listed", "plain"])
    host.run("--name", "listed", "-p", "18700:80", *OVERLAY, *SLEEP)
    host.run("--name", "plain", "--net=none", "--expose", "80", *SLEEP)
    for query in ("?all=1", "?all=1&size=1"):
        proxied = rawhttp.request(host.serve.socket, "GET", f"/v1.41/containers/json{query}",
                                  content_type=None)
        direct = rawhttp.request(host.dockerd.socket, "GET", f"/v1.41/containers/json{query}",
                                 content_type=None)
        assert proxied.status == direct.status == 200
        assert proxied.headers["content-type"] == "application/json"
        ours = {c["Id"]: c for c in proxied.json}
        theirs = {c["Id"]: c for c in direct.json}
        assert set(ours) == set(theirs)
        for container_id, container in theirs.items():
            names = container["Names"]
            if names == ["/listed"]:
                assert ours[container_id]["Ports"] == [
                    {"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 18700, "Type": "tcp"}]
                assert {k: v for k, v in ours[container_id].items() if k != "Ports"} == {
                    k: v for k, v in container.items() if k != "Ports"}
            else:
                assert ours[container_id] == container, names
