"""`powerplane doctor` (issue 17): a healthy lab host passes; each fault is named, one at a time.

One 3-host lab for the module, with an overlay container on h1 and on h2. Every test breaks one
thing on the way from h1 (the underlay MTU towards h2, h1's ovs-vswitchd, a stale endpoint
record of h1, h1's Consul agent), runs `powerplane doctor` on h1 as a user would, with
DOCKER_HOST pointing at h1's proxy, and puts the thing back; the next test starts only once
doctor finds h1 healthy again.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.cluster import POWERPLANE, E2ELab, Host

pytestmark = pytest.mark.lab

CIDR = "10.0.6.0/24"
# h1's serve reconciles at start and on Docker events only: a stale record injected for it
# stays until doctor has looked (with the lab's 3 s interval serve would release it at once).
H1_RECONCILE = "3600"
HEALTHY_WITHIN = 90.0


def doctor(host: Host, *args: str) -> tuple[int, str]:
    """Run `powerplane doctor` inside ``host`` with its serve's settings, as its user would."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POWERPLANE_", "CONSUL_", "DOCKER_"))}
    env.update(host.env, DOCKER_HOST=f"unix://{host.proxy_socket}", PYTHONIOENCODING="utf-8")
    started = time.monotonic()
    result = host.netns.run([POWERPLANE, "doctor", *args], check=False, env=env, timeout=120)
    took = time.monotonic() - started
    # Bounded: a broken dependency is reported, not waited for.
    assert took < 30, f"doctor took {took:.1f} s:\n{result.stdout}{result.stderr}"
    assert not result.stderr.strip() or result.returncode in (0, 1), result.stderr
    return result.returncode, result.stdout


def findings(host: Host) -> tuple[int, dict[str, Any]]:
    code, out = doctor(host, "--json")
    return code, json.loads(out)


def problems(report: dict[str, Any]) -> dict[str, list[str]]:
    """The problems found, by check (printed: what a user would read, in the test's log)."""
    found: dict[str, list[str]] = {}
    for finding in report["findings"]:
        if finding["status"] == "problem":
            found.setdefault(finding["check"], []).append(finding["problem"])
            print(f"{finding['check']}: {finding['problem']}\n    -> {finding['fix']}")
    return found


def wait_healthy(host: Host) -> None:
    """Until doctor finds ``host`` healthy (after a fault was put back)."""
    deadline = time.monotonic() + HEALTHY_WITHIN
    while True:
        code, report = findings(host)
        if code == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{host.name} not healthy {HEALTHY_WITHIN:g} s after the "
                                 f"fault was put back: {problems(report)}")
        time.sleep(1)


def restart_serve(host: Host) -> None:
    host.kill_serve()
    host.start_serve("--reconcile-interval", H1_RECONCILE)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ELab]:
    with E2ELab(3, tmp_path_factory.mktemp("doctor")) as built:
        h1, h2 = built.hosts[0], built.hosts[1]
        restart_serve(h1)
        for host in (h1, h2):
            host.docker_cli("run", "-d", "--name", f"app-{host.name}", "-e",
                            f"SOCKETPLANE_CIDR={CIDR}", "busybox", "sleep", "100000")
        # The tunnels follow the network's creation on every host: wait for h1's.
        deadline = time.monotonic() + 30
        while len([p for p in h1.ovs_ports() if p.startswith("vx")]) < 2:
            assert time.monotonic() < deadline, f"h1 has no tunnels: {h1.ovs_ports()}"
            time.sleep(0.2)
        yield built


@pytest.fixture
def h1(lab: E2ELab) -> Iterator[Host]:
    """h1, healthy before the test; after it, healthy again once the fault is put back."""
    host = lab.hosts[0]
    for each in lab.hosts:
        each.consul.wait_ready(need_leader=True)
    wait_healthy(host)
    yield host
    wait_healthy(host)


def test_healthy_host_exits_0(lab: E2ELab) -> None:
    """Nothing wrong: every check passes, the text says so, exit 0; --json agrees."""
    host = lab.hosts[0]
    for each in lab.hosts:
        each.consul.wait_ready(need_leader=True)
    code, report = findings(host)
    assert code == 0, problems(report)
    assert report["ok"] is True
    checks = {f["check"]: f for f in report["findings"]}
    for check in ("serve", "DOCKER_HOST", "docker", "consul", "clock", "registration", "ovs",
                  "ovs-vswitchd", "ovs bridge", "kernel", "ports vs state", "tunnels",
                  "stale records", "peer h2", "peer h3"):
        assert checks[check]["status"] == "ok", checks.get(check)
    assert "1500-byte packets pass" in checks["peer h2"]["detail"]
    code, text = doctor(host)
    assert code == 0, text
    assert "✘" not in text and re.search(r"all \d+ checks passed", text), text


def test_lowered_underlay_mtu_names_the_path_mtu(lab: E2ELab, h1: Host) -> None:
    """The underlay switch's port to h2 at MTU 1400: small packets pass, full-size VXLAN ones
    do not; doctor names peer h2, the path MTU it found and the overlay MTU to use."""
    switch = lab.underlay.underlay
    switch.run(["ip", "link", "set", "p2", "mtu", "1400"])
    try:
        code, report = findings(h1)
        code_text, text = doctor(h1)
    finally:
        switch.run(["ip", "link", "set", "p2", "mtu", "1500"])
    assert code == 1 and code_text == 1
    found = problems(report)
    # Consul's own traffic to h2 may stall too (that is what the fault does to TCP): only the
    # peers' verdicts are asserted.
    statuses = {f["check"]: f["status"] for f in report["findings"]}
    assert statuses["peer h3"] == "ok", found
    problem = found["peer h2"][0]
    assert "packets of 1500 bytes" in problem and "do not pass" in problem, problem
    largest = int(re.search(r"the largest that passes is (\d+) bytes", problem).group(1))
    # A veth lets 4 bytes more through than its MTU (room for a VLAN tag).
    assert 1400 <= largest <= 1404, problem
    fix = next(f["fix"] for f in report["findings"] if f["check"] == "peer h2")
    assert f"--mtu {largest - 50}" in fix, fix
    assert "✘ peer h2:" in text and "path MTU" in text, text


def test_stopped_vswitchd_is_named(lab: E2ELab, h1: Host) -> None:
    """ovs-vswitchd stopped (OVSDB still answers): doctor names ovs-vswitchd."""
    h1.ovs.stop_vswitchd()
    try:
        code, report = findings(h1)
    finally:
        h1.ovs.start_vswitchd()
        # The userspace datapath's underlay tap came back without its address: serve's start
        # puts it there (the lab's own reconciliation would too, every 3 s; h1's is slow).
        restart_serve(h1)
    assert code == 1
    found = problems(report)
    assert "ovs-vswitchd" in found, found
    assert "does not answer" in found["ovs-vswitchd"][0], found


def test_stale_endpoint_record_is_named(lab: E2ELab, h1: Host) -> None:
    """An endpoint record of h1 for a container Docker does not have: doctor names it."""
    ghost = secrets.token_hex(32)
    real = next(item for item in lab.consul_kv("endpoints/").values()
                if json.loads(_value(item))["host"] == "h1")
    record = {**json.loads(_value(real)), "ip": "10.0.6.250", "port": "ovs" + ghost[:12],
              "sandbox": secrets.token_hex(32), "name": "ghost"}
    key = f"http://{h1.consul.http_addr}/v1/kv/powerplane/endpoints/{ghost}"
    h1.netns.run(["curl", "-sf", "-X", "PUT", "--data-binary", json.dumps(record), key])
    try:
        code, report = findings(h1)
    finally:
        h1.netns.run(["curl", "-sf", "-X", "DELETE", key])
    assert code == 1
    found = problems(report)
    assert any(ghost[:12] in p and "Docker has no such container" in p
               for p in found.get("stale records", [])), found


def test_stopped_consul_is_named_quickly(lab: E2ELab, h1: Host) -> None:
    """h1's Consul agent stopped: doctor names Consul, fast, and still checks the rest."""
    h1.consul.stop()
    try:
        started = time.monotonic()
        code, report = findings(h1)
        took = time.monotonic() - started
    finally:
        h1.consul.start()
    assert code == 1
    found = problems(report)
    assert "consul" in found and "unreachable" in found["consul"][0], found
    assert took < 15, f"doctor took {took:.1f} s with Consul down"
    statuses = {f["check"]: f["status"] for f in report["findings"]}
    assert statuses["ovs-vswitchd"] == "ok" and statuses["docker"] == "ok", statuses
    assert statuses["stale records"] == "skipped", statuses
    # Without Consul, the peers are the tunnels' far ends: still probed.
    assert statuses["peer h2"] == "ok", statuses


def _value(item: dict[str, Any]) -> str:
    return base64.b64decode(item["Value"]).decode()
