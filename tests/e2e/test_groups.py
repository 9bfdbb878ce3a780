"""Security groups, anti-spoofing and connected networks (issue 16), on three complete hosts.

web (group ``web``: tcp/80 from ``group:client``) on h1; c1 (group ``client``) on h2; c2 (no
group) on h3, and one more container without groups on each of h1 and h2, all on one network.
Every "cannot" below has its "can" next to it, from another container or after a rule change,
so that a check which sees nothing cannot pass for a switch that blocks.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import E2ELab, Host
from tests.e2e.test_way_out import fetch, httpd, in_container, received, remove, run_app, wait_for

pytestmark = pytest.mark.lab

CIDR = "10.16.1.0/24"
NETWORK = "grp"
ENFORCED_WITHIN = 2.0  # seconds: a rule change is in force on every host (issue 16)
OURS = "0x7070000000000000/0xffff000000000000"


class GroupsLab:
    def __init__(self, lab: E2ELab, ips: dict[str, str]) -> None:
        self.lab = lab
        self.hosts = lab.hosts
        self.ips = ips

    def host_of(self, name: str) -> Host:
        return self.hosts[{"web": 0, "open-a": 0, "c1": 1, "open-b": 1, "c2": 2}[name]]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GroupsLab]:
    with E2ELab(3, tmp_path_factory.mktemp("groups")) as built:
        a, b, c = built.hosts
        a.powerplane("network", "create", NETWORK, CIDR)
        a.powerplane("group", "create", "client")
        a.powerplane("group", "create", "web")
        a.powerplane("group", "rule", "add", "web", "--proto", "tcp", "--port", "80",
                     "--from", "group:client")
        a.powerplane("group", "rule", "add", "web", "--proto", "tcp", "--port", "81",
                     "--from", "group:client")
        net = ("-e", f"SOCKETPLANE_NETWORK={NETWORK}")
        ips = {
            "web": run_app(a, "web", *net, "-e", "SOCKETPLANE_GROUPS=web",
                           command=httpd("hello-web")),
            "open-a": run_app(a, "open-a", *net),
            "c1": run_app(b, "c1", *net, "-e", "SOCKETPLANE_GROUPS=client"),
            "open-b": run_app(b, "open-b", *net),
            "c2": run_app(c, "c2", *net, "--cap-add", "NET_ADMIN", command=httpd("hello-c2")),
        }
        yield GroupsLab(built, ips)
        for host in built.hosts:
            assert "Traceback" not in host.serve_log(), host.serve_log()[-3000:]


def page(lab: GroupsLab, client: str, server: str, seconds: int = 3) -> str | None:
    return fetch(lab.host_of(client), client, f"http://{lab.ips[server]}/", seconds)


def pings(lab: GroupsLab, source: str, target: str, count: int = 1) -> int:
    return received(in_container(lab.host_of(source), source, "ping", "-c", str(count), "-W",
                                 "1", lab.ips[target]))


def enforced(lab: GroupsLab) -> None:
    """The acceptance's picture: c1 gets web's page, c2 gets nothing, web still reaches c2."""
    assert wait_for("c1 fetches web's page", lambda: page(lab, "c1", "web")) == "hello-web"
    assert page(lab, "c2", "web", seconds=2) is None, "c2 (no group) reached web's port 80"
    assert page(lab, "open-a", "web", seconds=2) is None, "open-a reached web on its own host"
    assert pings(lab, "c2", "web", 2) == 0
    assert page(lab, "web", "c2") == "hello-c2", "web's own connection out got no reply"
    assert pings(lab, "web", "c2") == 1


def test_web_accepts_only_its_groups_rules(lab: GroupsLab) -> None:
    enforced(lab)
    # Containers in no group are open, as before groups existed; c1 is in a group without
    # rules, so it accepts nothing new, while its own connections out work.
    assert pings(lab, "c2", "open-a") == 1
    assert pings(lab, "open-a", "c2") == 1
    assert pings(lab, "open-b", "c1", 2) == 0
    assert pings(lab, "c1", "open-b") == 1


def test_group_check_names_the_rule(lab: GroupsLab) -> None:
    a = lab.hosts[0]
    allowed = a.powerplane("group", "check", "c1", "web", "80").stdout
    assert "allow" in allowed.lower() and "group:client" in allowed, allowed
    denied = a.powerplane("group", "check", "c2", "web", "80", check=False)
    assert denied.returncode != 0 and "web" in denied.stdout + denied.stderr


def stream_from_web(lab: GroupsLab, seconds: int) -> subprocess.Popen[str]:
    """c1 holds a TCP connection to web's port 81 for ``seconds``, a line every 0.2 s."""
    in_container(lab.hosts[0], "web", "sh", "-c",
                 "pkill -f 'nc -l -p 81' ; true")
    lab.hosts[0].docker_cli("exec", "-d", "web", "sh", "-c",
                            "i=0; while [ $i -lt 1000 ]; do i=$((i+1)); echo $i; sleep 0.2; "
                            "done | nc -l -p 81", direct=True)
    time.sleep(0.5)
    c1 = lab.host_of("c1")
    # nc's stdin stays open (an EOF there would end the connection from our side).
    return subprocess.Popen(
        ["docker", "-H", c1.docker.url, "exec", "c1", "sh", "-c",
         f"sleep {seconds + 1} | timeout {seconds} nc {lab.ips['web']} 81"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_rule_changes_reach_every_host_within_2_s_and_cut_no_connection(lab: GroupsLab) -> None:
    a = lab.hosts[0]
    stream = stream_from_web(lab, 8)
    try:
        assert pings(lab, "c2", "web") == 0
        a.powerplane("group", "rule", "add", "web", "--proto", "icmp", "--from",
                     f"network:{NETWORK}")
        # The bound is the 2 s plus one ping's own 1 s wait (a ping sent just before
        # the rule lands waits that long for nothing); bench/groups.py measures the time itself.
        for name in ("c2", "open-a", "open-b"):  # one container without groups per host
            wait_for(f"{name} pings web", lambda n=name: pings(lab, n, "web") == 1,
                     timeout=ENFORCED_WITHIN + 1)
        a.powerplane("group", "rule", "rm", "web", "--proto", "icmp", "--from",
                     f"network:{NETWORK}")
        time.sleep(ENFORCED_WITHIN)
        for name in ("c2", "open-a", "open-b"):
            assert pings(lab, name, "web", 2) == 0, f"{name} still pings web"
        out, _ = stream.communicate(timeout=30)
    finally:
        if stream.poll() is None:
            stream.kill()
    lines = out.split()
    # 8 s at 5 lines a second, minus start-up: a connection cut at the rule's removal (~3 s
    # in) would have stopped near 15.
    assert len(lines) >= 30, f"c1's connection to web was cut: {len(lines)} lines"
    assert lines == [str(i) for i in range(1, len(lines) + 1)]


def captured(host: Host, container: str, bpf: str, action: object) -> int:
    """Frames matching ``bpf`` that reach ``container``'s eth0 while ``action()`` runs."""
    pid = host.docker_cli("inspect", "-f", "{{.State.Pid}}", container, direct=True).stdout.strip()
    capture = subprocess.Popen(["nsenter", "-t", pid, "-n", "tcpdump", "-i", "eth0", "-n",
                                "-l", "-p", bpf], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert capture.stderr is not None
    capture.stderr.readline()  # listening: armed
    assert callable(action)
    action()
    time.sleep(1.5)
    capture.terminate()
    out, _ = capture.communicate(timeout=10)
    return len([line for line in out.splitlines() if line.strip()])


def test_spoofing_from_a_container_with_net_admin_delivers_nothing(lab: GroupsLab) -> None:
    """c2 (NET_ADMIN) on h3 forges a source address, a MAC, and ARP claiming web's address,
    towards open-a on h1: nothing arrives, while its true frames do."""
    c, a = lab.host_of("c2"), lab.host_of("open-a")
    target = lab.ips["open-a"]

    def ping_from(*extra: str) -> None:
        in_container(c, "c2", "ping", "-c", "3", "-i", "0.2", "-W", "1", *extra, target)

    true_source = lab.ips["c2"]
    assert captured(a, "open-a", f"icmp and src host {true_source}", ping_from) >= 3
    forged = "10.16.1.250"
    in_container(c, "c2", "ip", "addr", "add", f"{forged}/32", "dev", "eth0")
    try:
        assert captured(a, "open-a", f"icmp and src host {forged}",
                        lambda: ping_from("-I", forged)) == 0
    finally:
        in_container(c, "c2", "ip", "addr", "del", f"{forged}/32", "dev", "eth0")
    own_mac = in_container(c, "c2", "cat", "/sys/class/net/eth0/address").stdout.strip()
    in_container(c, "c2", "ip", "link", "set", "eth0", "address", "02:16:01:00:00:99")
    try:
        assert captured(a, "open-a", "icmp and ether src 02:16:01:00:00:99", ping_from) == 0
    finally:
        in_container(c, "c2", "ip", "link", "set", "eth0", "address", own_mac)
    assert captured(a, "open-a", f"arp and ether src {own_mac}", lambda: in_container(
        c, "c2", "arping", "-U", "-c", "3", "-s", lab.ips["web"], "-I", "eth0",
        lab.ips["web"])) == 0
    # web's traffic undisturbed.
    assert page(lab, "c1", "web") == "hello-web"



def test_a_published_port_meets_the_rules_too(lab: GroupsLab) -> None:
    """A port published by a container in group web is reached from another host's address
    only once a rule admits that address: the host forwards it with its source kept."""
    a, b = lab.hosts[0], lab.hosts[1]
    run_app(a, "pub", "-e", f"SOCKETPLANE_NETWORK={NETWORK}", "-e", "SOCKETPLANE_GROUPS=web",
            "-p", "18080:80", command=httpd("hello-pub"))
    url = f"http://{a.netns.ip}:18080/"

    def from_b() -> str:
        return b.netns.run(["curl", "-s", "-m", "2", url], check=False).stdout.strip()

    try:
        assert from_b() == "", "web's rules do not admit h2's address, yet it got in"
        a.powerplane("group", "rule", "add", "web", "--proto", "tcp", "--port", "80",
                     "--from", f"{b.netns.ip}/32")
        assert wait_for("h2 reaches the published port", from_b) == "hello-pub"
        a.powerplane("group", "rule", "rm", "web", "--proto", "tcp", "--port", "80",
                     "--from", f"{b.netns.ip}/32")
    finally:
        remove(a, "pub")


def test_serve_killed_and_ovs_restarted_keep_the_rules(lab: GroupsLab) -> None:
    a = lab.hosts[0]
    a.kill_serve(signal.SIGKILL)
    a.start_serve()
    enforced(lab)
    a.ovs.kill()
    a.ovs.restart()
    # The restarted vswitchd forwards nothing until serve notices it (a pidfile check a
    # second) and installs the flows again: enforced() first waits for c1's page.
    enforced(lab)


def ours(host: Host) -> list[str]:
    return [line for line in host.ovs.ofctl("dump-flows", "powerplane0",
                                            f"cookie={OURS}").splitlines()
            if "cookie=" in line]


def test_connected_networks_reach_each_other_across_hosts(lab: GroupsLab) -> None:
    a, b, c = lab.hosts
    other = "grp2"
    a.powerplane("network", "create", other, "10.16.2.0/24")
    far = run_app(b, "far", "-e", f"SOCKETPLANE_NETWORK={other}", command=httpd("hello-far"))
    run_app(c, "third", "-e", "SOCKETPLANE_CIDR=10.16.3.0/24")
    assert pings(lab, "open-a", "c2") == 1  # the control: open-a reaches its own network
    assert received(in_container(a, "open-a", "ping", "-c", "2", "-W", "1", far)) == 0
    a.powerplane("network", "connect", NETWORK, other)
    wait_for("open-a (h1) reaches far (h2) on the connected network", lambda: received(
        in_container(a, "open-a", "ping", "-c", "1", "-W", "1", far)) == 1)
    assert fetch(c, "c2", f"http://{far}/") == "hello-far"
    # Still subject to the receiving container's groups: far's traffic to web is a new
    # connection web's rules do not allow.
    assert fetch(b, "far", f"http://{lab.ips['web']}/", 2) is None
    # Unconnected networks still do not reach each other.
    assert received(in_container(c, "third", "ping", "-c", "2", "-W", "1", far)) == 0
    assert received(in_container(c, "third", "ping", "-c", "2", "-W", "1",
                                 lab.ips["open-a"])) == 0
    a.powerplane("network", "disconnect", NETWORK, other)
    wait_for("open-a no longer reaches far", lambda: received(
        in_container(a, "open-a", "ping", "-c", "2", "-W", "1", far)) == 0)
    remove(b, "far")
    remove(c, "third")


def test_nothing_of_groups_is_left_when_everything_is_gone(lab: GroupsLab) -> None:
    for name in ("web", "open-a", "c1", "open-b", "c2"):
        remove(lab.host_of(name), name)
    a = lab.hosts[0]
    refused = a.powerplane("group", "rm", "client", check=False)  # web's rule names it
    assert refused.returncode != 0
    a.powerplane("group", "rm", "web")
    a.powerplane("group", "rm", "client")
    for host in lab.hosts:
        wait_for(f"{host.name} keeps only base flows", lambda h=host: all(
            "cookie=0x70700000" in line for line in ours(h)))
