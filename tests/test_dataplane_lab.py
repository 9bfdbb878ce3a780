"""Data plane acceptance on 4 namespace hosts x 2 networks: real userspace OVS, VXLAN, Consul."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.lab.hosts import Lab
from tests.lab.netns import LabHost

pytestmark = pytest.mark.lab

NETWORKS = {"red": ("10.71.0.0/24", 5001), "blue": ("10.72.0.0/24", 5002)}


def _wait(condition: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def wired(lab4: Lab) -> dict[str, Any]:
    """Two networks and one container namespace per (host, network), plugged via DataPlane."""
    networks = {name: lab4.dataplane(0, {"op": "create_network", "name": name, "cidr": cidr,
                                         "vni": vni})[0]
                for name, (cidr, vni) in NETWORKS.items()}
    containers: dict[str, list[tuple[LabHost, str]]] = {name: [] for name in networks}
    for index in range(4):
        ops = []
        for name, network in networks.items():
            ns = lab4.underlay.add_namespace(f"c{index + 1}{name[0]}")
            ip = network["cidr"].rsplit(".", 1)[0] + f".{10 + index}"
            ops.append({"op": "plug", "container_id": f"{name}{index}".ljust(64, "0"),
                        "netns": ns.netns_path, "network": network, "ip": ip})
            containers[name].append((ns, ip))
        lab4.dataplane(index, *ops)
    for index in range(4):  # every agent has its 3 peers x 2 networks
        _wait(lambda i=index: len(lab4.dataplane(i, {"op": "tunnels"})[0]) == 6,
              f"tunnels on host {index + 1}")
    return {"networks": networks, "containers": containers}


def _ping(source: LabHost, ip: str, *args: str) -> Any:
    return source.run(["ping", "-c2", "-i0.2", "-W2", *args, ip], check=False)


def test_all_pairs_ping_without_duplicates(wired: dict[str, Any]) -> None:
    """Every container reaches every other of its network, both ways, with no DUP! replies."""
    for members in wired["containers"].values():
        for source, _ in members:
            for _, ip in members:
                result = _ping(source, ip)
                assert result.returncode == 0, f"{source.name} -> {ip}: {result.stdout}"
                assert "DUP!" not in result.stdout, result.stdout
                assert " 0% packet loss" in result.stdout, result.stdout


def test_networks_are_isolated(wired: dict[str, Any]) -> None:
    """No container reaches any address of the other network (100 % loss)."""
    red, blue = wired["containers"]["red"], wired["containers"]["blue"]
    for source, _ in red[:2]:
        for _, ip in blue:
            result = source.run(["ping", "-c1", "-W1", ip], check=False)
            assert result.returncode != 0 and "100% packet loss" in result.stdout


def _underlay_packets(lab: Lab) -> int:
    """Frames on the lab switch's ports so far (both directions, all hosts)."""
    links = json.loads(lab.underlay.underlay.run(["ip", "-j", "-s", "link"]).stdout)
    return sum(link["stats64"]["rx"]["packets"] + link["stats64"]["tx"]["packets"]
               for link in links if re.fullmatch(r"p\d+", link["ifname"]))


def test_idle_underlay_is_quiet(lab4: Lab, wired: dict[str, Any]) -> None:
    """After a broadcast from every container, the underlay carries ~0 packets/s (no storm)."""
    for members in wired["containers"].values():
        for source, _ in members:  # ARP broadcasts for an absent address flood the mesh
            source.run(["ping", "-c1", "-W1", "-b", members[0][1].rsplit(".", 1)[0] + ".250"],
                       check=False)
    time.sleep(2)
    before = _underlay_packets(lab4)
    time.sleep(3)
    rate = (_underlay_packets(lab4) - before) / 3
    # A storm is tens of thousands of packets/s; what remains is Consul session renewals and
    # blocking queries of the four agents, and ARP probes for the absent address dying out.
    assert rate < 100, f"{rate:.0f} packets/s on an idle underlay"


def test_df_ping_mtu_boundary(wired: dict[str, Any]) -> None:
    """A DF ping of MTU-28 bytes crosses hosts; one byte more fails at the sender."""
    (source, _), (_, target) = wired["containers"]["red"][0], wired["containers"]["red"][1]
    mtu = json.loads(source.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["mtu"]
    assert mtu == 1450
    ok = _ping(source, target, "-M", "do", "-s", str(mtu - 28))
    assert ok.returncode == 0 and " 0% packet loss" in ok.stdout, ok.stdout
    too_big = source.run(["ping", "-c1", "-W1", "-M", "do", "-s", str(mtu - 27), target],
                         check=False)
    assert too_big.returncode != 0
    assert re.search(r"message too long", too_big.stdout + too_big.stderr, re.I), too_big


def _fdb_ports(lab: Lab, index: int, mac: str) -> set[str]:
    """The ports host ``index``'s bridge learned ``mac`` on, by name."""
    names = {}
    for line in lab.ovs[index].vsctl("--format=csv", "--no-headings", "--columns=name,ofport",
                                     "list", "Interface").splitlines():
        name, ofport = line.rsplit(",", 1)
        names[ofport.strip()] = name.strip().strip('"')
    fdb = lab.ovs[index].appctl("fdb/show", "powerplane0").stdout
    return {names.get(line.split()[0], line.split()[0]) for line in fdb.splitlines()[1:]
            if line.split()[2] == mac}


def test_each_host_is_the_gateway_of_its_own_containers(lab4: Lab,
                                                        wired: dict[str, Any]) -> None:
    """Every container's gateway answers with the network's MAC; each host's bridge learned
    that MAC on its own gateway port and never on a tunnel."""
    for name, network in wired["networks"].items():
        mac = "02:70:70:" + ":".join(f"{(network['vni'] >> s) & 0xff:02x}" for s in (16, 8, 0))
        for index, (source, _) in enumerate(wired["containers"][name]):
            result = _ping(source, network["gateway"])
            assert result.returncode == 0, f"{source.name} -> gateway: {result.stdout}"
            neigh = source.run(["ip", "neigh", "show", network["gateway"]]).stdout
            assert mac in neigh, f"{source.name}: {neigh}"
            assert _fdb_ports(lab4, index, mac) == {f"gw-{name}"}, f"host {index + 1}"
    gateways = lab4.dataplane(0, {"op": "gateways"})[0]
    assert {g["network"] for g in gateways} == set(wired["networks"])
    # The reconciler's repair changes nothing when nothing was lost.
    assert lab4.dataplane(0, {"op": "set_gateways",
                              "networks": list(wired["networks"].values())})[0] == []


def test_gateway_address_lost_is_put_back(lab4: Lab, wired: dict[str, Any]) -> None:
    host = lab4.hosts[1]
    network = wired["networks"]["red"]
    host.run(["ip", "addr", "flush", "dev", "gw-red"])
    changed = lab4.dataplane(1, {"op": "set_gateways",
                                 "networks": list(wired["networks"].values())})[0]
    assert changed == ["gw-red"]
    assert f"{network['gateway']}/24" in host.run(["ip", "-4", "addr", "show", "gw-red"]).stdout


def _ovsdb_snapshot(lab: Lab, index: int) -> str:
    return lab.ovs[index].vsctl("--format=json", "--columns=_uuid,name,tag,external_ids,"
                                "protected", "list", "Port")


def test_plug_unplug_reconcile_twice_change_nothing(lab4: Lab, wired: dict[str, Any]) -> None:
    """Repeating plug, set_tunnels and unplug changes no OVSDB row or link the second time."""
    network = wired["networks"]["red"]
    ns = lab4.underlay.add_namespace("c1x")
    plug = {"op": "plug", "container_id": "feed".ljust(64, "0"), "netns": ns.netns_path,
            "network": network, "ip": "10.71.0.99"}
    lab4.dataplane(0, plug)
    ovs_before = _ovsdb_snapshot(lab4, 0)
    # The kernel marks the IPv6 link-local address tentative until its duplicate address
    # detection ends (about a second): a change of its own, not ours, so wait it out first.
    link_before = _wait(lambda: (out := ns.run(["ip", "-d", "addr", "show", "eth0"]).stdout)
                        and "tentative" not in out and out, "eth0's addresses to settle")
    lab4.dataplane(0, plug)
    assert _ovsdb_snapshot(lab4, 0) == ovs_before
    assert ns.run(["ip", "-d", "addr", "show", "eth0"]).stdout == link_before

    hosts = [{"host_id": h.name, "underlay_ip": h.ip} for h in lab4.hosts]
    networks = list(wired["networks"].values())
    reconcile = {"op": "set_tunnels", "hosts": hosts, "networks": networks}
    lab4.dataplane(0, reconcile)
    before = _ovsdb_snapshot(lab4, 0)
    second = lab4.dataplane(0, reconcile)[0]
    assert second == {"added": [], "removed": []}
    assert _ovsdb_snapshot(lab4, 0) == before

    unplug = {"op": "unplug", "container_id": plug["container_id"]}
    lab4.dataplane(0, unplug)
    after_unplug = _ovsdb_snapshot(lab4, 0)
    assert "ovsfeed" not in after_unplug
    assert "eth0" not in ns.run(["ip", "-br", "link"]).stdout
    lab4.dataplane(0, unplug)
    assert _ovsdb_snapshot(lab4, 0) == after_unplug


def test_host_leave_and_join_change_tunnels(lab4: Lab, wired: dict[str, Any]) -> None:
    """A host that leaves loses its tunnels on the others; when it rejoins they come back."""
    leaving = lab4.hosts[3]

    def remotes(index: int) -> set[str]:
        return {t["remote_ip"] for t in lab4.dataplane(index, {"op": "tunnels"})[0]}

    lab4.stop_agent(3)
    for index in range(3):
        _wait(lambda i=index: leaving.ip not in remotes(i), f"tunnels to h4 gone on h{index + 1}")
    lab4.start_agent(3)
    for index in range(3):
        _wait(lambda i=index: leaving.ip in remotes(i), f"tunnels to h4 back on h{index + 1}")
    (source, _), (_, target) = wired["containers"]["blue"][0], wired["containers"]["blue"][3]
    result = _ping(source, target)
    assert result.returncode == 0 and "DUP!" not in result.stdout, result.stdout
