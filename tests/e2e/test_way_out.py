"""A way in and out (issue 14): gateways, egress NAT, isolation with routing, internal networks.

Three complete hosts and an "outside" machine on the underlay that is no Powerplane host and
knows no overlay route: whatever reaches it from a container left through a host's gateway and
NAT. The outside server answers every request with the source address it saw.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.cluster import REPO, E2ELab, Host, addresses_of
from tests.lab.netns import LabHost

pytestmark = pytest.mark.lab

OUTSIDE_PORT = 80
WAIT_SECONDS = 20.0


class WayOutLab:
    def __init__(self, lab: E2ELab, outside: LabHost) -> None:
        self.lab = lab
        self.hosts = lab.hosts
        self.outside = outside


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WayOutLab]:
    with E2ELab(3, tmp_path_factory.mktemp("wayout")) as built:
        outside = built.underlay.add_outside()
        server = outside.popen([sys.executable, "-m", "tests.support.outside_server",
                                str(OUTSIDE_PORT)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", "the outside server did not start"
        yield WayOutLab(built, outside)


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)
    return result


def run_app(host: Host, name: str, *args: str, command: tuple[str, ...] = ("sleep", "100000"),
            ) -> str:
    """``docker run -d`` through the host's proxy; the container's overlay address."""
    host.docker_cli("run", "-d", "--name", name, *args, "busybox", *command)
    out = host.docker_cli("exec", name, "ip", "-4", "addr", "show", "eth0", direct=True).stdout
    found = addresses_of(out)
    assert found, f"{name} has no overlay address: {out}"
    return found[0]


def in_container(host: Host, name: str, *command: str) -> subprocess.CompletedProcess[str]:
    return host.docker_cli("exec", name, *command, check=False, direct=True)


def fetch(host: Host, name: str, url: str, seconds: int = 3) -> str | None:
    """The body busybox wget gets from ``url`` inside container ``name``; None on failure."""
    # busybox's own `wget -T` crashes in this build (SIGSEGV): its timeout(1) bounds it instead.
    result = in_container(host, name, "timeout", str(seconds), "wget", "-q", "-O-", url)
    return result.stdout.strip() if result.returncode == 0 else None


def received(result: subprocess.CompletedProcess[str]) -> int:
    """How many replies a ping run got, from its summary line."""
    for line in result.stdout.splitlines():
        if "packets transmitted" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(f"no ping summary in: {result.stdout}{result.stderr}")


def gateway_ports(host: Host) -> list[str]:
    return [p for p in host.ovs_ports() if p.startswith("gw-")]


def nft_tables(host: Host) -> list[str]:
    out = host.netns.run(["nft", "-j", "list", "tables"]).stdout
    return [item["table"]["name"] for item in json.loads(out)["nftables"] if "table" in item]


def remove(host: Host, *names: str) -> None:
    host.docker_cli("rm", "-f", *names)


# -- the tests -----------------------------------------------------------------------------------


def test_each_host_is_the_gateway_and_nat_of_its_containers(lab: WayOutLab) -> None:
    """From a container on every host: the gateway answers ping, the outside server answers
    wget, and it saw the address of the container's own host."""
    cidr = "10.14.1.0/24"
    names = []
    for host in lab.hosts:
        name = f"out-{host.name}"
        run_app(host, name, "-e", f"SOCKETPLANE_CIDR={cidr}")
        names.append(name)
        assert received(in_container(host, name, "ping", "-c", "1", "-W", "2", "10.14.1.1")) == 1
        body = fetch(host, name, f"http://{lab.outside.ip}:{OUTSIDE_PORT}/")
        assert body == f"from {host.netns.ip}", f"{host.name}: the outside saw {body!r}"
    # Each host's own gateway answered: the gateway's MAC was never learned on a tunnel.
    for host, name in zip(lab.hosts, names, strict=True):
        neigh = in_container(host, name, "ip", "neigh", "show", "10.14.1.1").stdout
        assert "02:70:70:" in neigh, neigh
        remove(host, name)
    for host in lab.hosts:
        wait_for(f"{host.name}: gateway port gone with the last container",
                 lambda h=host: not gateway_ports(h))


def test_host_reaches_its_containers_by_overlay_address(lab: WayOutLab) -> None:
    a = lab.hosts[0]
    web = run_app(a, "web-local", "-e", "SOCKETPLANE_CIDR=10.14.2.0/24",
                  command=httpd("hello-host"))
    assert received(a.netns.run(["ping", "-c", "1", "-W", "2", web], check=False)) == 1
    body = wait_for("httpd answers the host",
                    lambda: a.netns.run(["curl", "-s", "-m", "3", f"http://{web}/"],
                                        check=False).stdout.strip())
    assert body == "hello-host"
    remove(a, "web-local")


def test_networks_never_reach_each_other_through_a_host(lab: WayOutLab) -> None:
    """Two networks on the same hosts: a container on one, with NET_ADMIN and a forged address
    of the other, reaches nothing of the other on its host or across hosts: 0 replies."""
    a, b = lab.hosts[0], lab.hosts[1]
    red, blue = "10.14.3.0/24", "10.14.4.0/24"
    blue_here = run_app(a, "blue-a", "-e", f"SOCKETPLANE_CIDR={blue}")
    blue_there = run_app(b, "blue-b", "-e", f"SOCKETPLANE_CIDR={blue}")
    run_app(a, "red-a", "-e", f"SOCKETPLANE_CIDR={red}", "--cap-add", "NET_ADMIN")
    targets = [blue_here, blue_there, "10.14.4.1"]
    # Routed through red's gateway with red's own address.
    for ip in targets:
        assert received(in_container(a, "red-a", "ping", "-c", "2", "-W", "1", ip)) == 0, ip
    # With a forged source of blue's subnet, still through red's gateway.
    in_container(a, "red-a", "ip", "addr", "add", "10.14.4.99/32", "dev", "eth0")
    in_container(a, "red-a", "ip", "route", "replace", blue, "via", "10.14.3.1", "src",
                 "10.14.4.99")
    for ip in targets:
        assert received(in_container(a, "red-a", "ping", "-c", "2", "-W", "1", ip)) == 0, ip
    # Frames to the broadcast MAC reach the host's own stack on the container's port (the
    # userspace datapath shows the kernel every frame a container sends): blue's gateway
    # address is a local address of the host, so it would answer there, past the gateways.
    in_container(a, "red-a", "ip", "route", "replace", "10.14.4.1/32", "dev", "eth0")
    in_container(a, "red-a", "arp", "-s", "10.14.4.1", "ff:ff:ff:ff:ff:ff")
    assert received(in_container(a, "red-a", "ping", "-c", "2", "-W", "1", "10.14.4.1")) == 0
    # The blue containers still reach each other: the check above could have passed.
    assert received(in_container(a, "blue-a", "ping", "-c", "1", "-W", "2", blue_there)) == 1
    remove(a, "red-a", "blue-a")
    remove(b, "blue-b")


def test_internal_network_has_no_way_out(lab: WayOutLab) -> None:
    a = lab.hosts[0]
    a.powerplane("network", "create", "sealed", "10.14.5.0/24", "--internal")
    run_app(a, "sealed-a", "-e", "SOCKETPLANE_NETWORK=sealed")
    assert received(in_container(a, "sealed-a", "ping", "-c", "1", "-W", "2", "10.14.5.1")) == 1
    assert fetch(a, "sealed-a", f"http://{lab.outside.ip}:{OUTSIDE_PORT}/", seconds=2) is None
    assert received(in_container(a, "sealed-a", "ping", "-c", "2", "-W", "1",
                                 lab.outside.ip)) == 0
    remove(a, "sealed-a")
    a.powerplane("network", "rm", "sealed")


def httpd(text: str) -> tuple[str, ...]:
    return ("sh", "-c", f"mkdir -p /www && echo {text} > /www/index.html "
            "&& exec httpd -f -p 80 -h /www")


def outside_fetch(lab: WayOutLab, ip: str) -> str:
    return lab.outside.run(["curl", "-s", "-m", "2", f"http://{ip}/"], check=False).stdout.strip()


def floating_on(host: Host) -> list[str]:
    out = host.netns.run(["ip", "-4", "-o", "addr", "show"]).stdout
    return [word.split("/")[0] for word in out.split() if word.startswith("192.168.50.")
            and word.endswith("/32")]


def test_floating_address_follows_its_container_across_hosts(lab: WayOutLab) -> None:
    a, c = lab.hosts[0], lab.hosts[2]
    fip = "192.168.50.130"
    cidr = "10.14.6.0/24"
    c.powerplane("ip", "create", fip)
    run_app(c, "fip-c", "-e", f"SOCKETPLANE_CIDR={cidr}", command=httpd("on-c"))
    c.powerplane("ip", "attach", fip, "fip-c")
    wait_for("the outside reaches fip-c at the floating address",
             lambda: outside_fetch(lab, fip) == "on-c")
    assert floating_on(c) == [fip] and floating_on(a) == []
    # Its own outbound connections leave with the floating address.
    assert fetch(c, "fip-c", f"http://{lab.outside.ip}:{OUTSIDE_PORT}/") == f"from {fip}"

    run_app(a, "fip-a", "-e", f"SOCKETPLANE_CIDR={cidr}", command=httpd("on-a"))
    c.powerplane("ip", "detach", fip)
    a.powerplane("ip", "attach", fip, "fip-a")
    started = time.monotonic()
    # Before the outside sends anything: only A's gratuitous ARP can move its neighbour entry.
    a_mac = json.loads(a.netns.run(["ip", "-j", "link", "show", "br-phy"]).stdout)[0]["address"]
    wait_for("the outside's neighbour entry moved to A",
             lambda: a_mac in lab.outside.run(["ip", "neigh", "show", fip]).stdout)
    wait_for("the outside reaches fip-a after the move",
             lambda: outside_fetch(lab, fip) == "on-a")
    print(f"floating address moved across hosts in {time.monotonic() - started:.2f} s")
    wait_for("the old host let the address go", lambda: floating_on(c) == [])
    assert fetch(a, "fip-a", f"http://{lab.outside.ip}:{OUTSIDE_PORT}/") == f"from {fip}"
    # fip-c, no longer attached, leaves through its host's address again.
    assert fetch(c, "fip-c", f"http://{lab.outside.ip}:{OUTSIDE_PORT}/") == f"from {c.netns.ip}"

    listing = json.loads(a.powerplane("ip", "ls", "--json").stdout)
    assert [(r["ip"], r["host"]) for r in listing] == [(fip, a.name)]
    # Removing the container detaches the address and takes it off the host.
    remove(a, "fip-a")
    wait_for("the address detached with its container", lambda: not json.loads(
        a.powerplane("ip", "ls", "--json").stdout)[0]["container"])
    wait_for("the address gone from the host", lambda: floating_on(a) == [])
    a.powerplane("ip", "rm", fip)
    remove(c, "fip-c")


def test_floating_address_bad_input_is_refused(lab: WayOutLab) -> None:
    a = lab.hosts[0]
    outside_pool = a.powerplane("ip", "create", "192.168.50.20", check=False)
    assert outside_pool.returncode == 1
    assert "outside the floating range 192.168.50.128/26" in outside_pool.stderr
    a.powerplane("ip", "create", "192.168.50.140")
    again = a.powerplane("ip", "create", "192.168.50.140", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    unknown = a.powerplane("ip", "attach", "192.168.50.140", "no-such-container", check=False)
    assert unknown.returncode == 1 and "no overlay container" in unknown.stderr
    run_app(a, "fip-one", "-e", "SOCKETPLANE_CIDR=10.14.7.0/24")
    run_app(a, "fip-two", "-e", "SOCKETPLANE_CIDR=10.14.7.0/24")
    a.powerplane("ip", "attach", "192.168.50.140", "fip-one")
    taken = a.powerplane("ip", "attach", "192.168.50.140", "fip-two", check=False)
    assert taken.returncode == 1 and "is attached to container" in taken.stderr
    still = a.powerplane("ip", "rm", "192.168.50.140", check=False)
    assert still.returncode == 1 and "detach it first" in still.stderr
    remove(a, "fip-one", "fip-two")
    wait_for("the address detached", lambda: not json.loads(
        a.powerplane("ip", "ls", "--json").stdout)[0]["container"])
    a.powerplane("ip", "rm", "192.168.50.140")
    assert json.loads(a.powerplane("ip", "ls", "--json").stdout) == []


def test_published_port_answers_on_the_host_that_runs_the_container(lab: WayOutLab) -> None:
    a, b = lab.hosts[0], lab.hosts[1]
    cidr = "10.14.8.0/24"
    b.docker_cli("run", "-d", "--name", "pub-b", "-p", "8080:80", "-e",
                 f"SOCKETPLANE_CIDR={cidr}", "busybox", *httpd("published"))
    wait_for("the outside reaches pub-b at B's address, port 8080",
             lambda: outside_fetch(lab, f"{b.netns.ip}:8080") == "published")
    assert outside_fetch(lab, f"{a.netns.ip}:8080") == "", "published on a host without it"
    assert b.docker_cli("port", "pub-b").stdout.split() == ["80/tcp", "->", "0.0.0.0:8080"]
    assert b.docker_cli("ps", "--filter", "name=pub-b", "--format",
                        "{{.Ports}}").stdout.strip() == "0.0.0.0:8080->80/tcp"
    # The port is taken on B: a second container asking for it is refused, nothing made.
    sandboxes = b.sandboxes()
    taken = b.docker_cli("run", "-d", "--name", "pub-b2", "-p", "8080:80", "-e",
                         f"SOCKETPLANE_CIDR={cidr}", "busybox", "sleep", "1000", check=False)
    assert taken.returncode != 0 and "port is already allocated" in taken.stderr, taken.stderr
    assert b.sandboxes() == sandboxes
    remove(b, "pub-b")
    wait_for("the port closed with its container",
             lambda: outside_fetch(lab, f"{b.netns.ip}:8080") == "")


def test_the_way_out_is_rebuilt_after_a_crash_and_removed_by_cleanup(lab: WayOutLab) -> None:
    """serve SIGKILLed, then its nftables table and gateway address lost (as after a reboot's
    firewall reset): started again, it puts both back and the container gets out again.
    Stopped with --cleanup, it takes gateway and table away; started again, they return."""
    a = lab.hosts[0]
    url = f"http://{lab.outside.ip}:{OUTSIDE_PORT}/"
    run_app(a, "crash-a", "-e", "SOCKETPLANE_CIDR=10.14.9.0/24")
    assert fetch(a, "crash-a", url) == f"from {a.netns.ip}"
    (gateway,) = gateway_ports(a)
    a.kill_serve(signal.SIGKILL)
    a.netns.run(["nft", "delete", "table", "inet", "powerplane"])
    a.netns.run(["ip", "addr", "flush", "dev", gateway])
    assert fetch(a, "crash-a", url, seconds=2) is None  # really broken
    a.start_serve()
    wait_for("egress back after the restart", lambda: fetch(a, "crash-a", url, seconds=2))
    assert "powerplane" in nft_tables(a)

    a.kill_serve()
    a.start_serve("--cleanup")
    a.kill_serve()  # SIGTERM: the orderly stop that --cleanup acts on
    assert gateway_ports(a) == [] and "powerplane" not in nft_tables(a)
    a.start_serve()
    wait_for("egress back without --cleanup", lambda: fetch(a, "crash-a", url, seconds=2))
    remove(a, "crash-a")


def test_nothing_of_the_way_out_is_left_behind(lab: WayOutLab) -> None:
    """After every container is gone: no gateway port and no Powerplane nftables table."""
    for host in lab.hosts:
        left = host.docker_cli("ps", "-aq", "--filter", "label=io.powerplane.sandbox",
                               direct=True).stdout.split()
        assert not left, f"{host.name}: the tests above left containers {left}"
        wait_for(f"{host.name}: no gateway port", lambda h=host: not gateway_ports(h))
        wait_for(f"{host.name}: no powerplane table",
                 lambda h=host: "powerplane" not in nft_tables(h))
        assert floating_on(host) == [], f"{host.name} still answers a floating address"
