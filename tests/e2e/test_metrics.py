"""Metrics and logs on three complete namespace hosts: what the flow does, the counters say.

Every host's serve runs with ``--metrics-addr 127.0.0.1:9323`` (each namespace has its own
loopback) and ``--log-format json``; the test scrapes ``/metrics`` inside each namespace with
curl, exactly as a Prometheus on the host would, and reads serve's log as JSON lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cluster import E2ELab, Host

pytestmark = pytest.mark.lab

NETWORK = "metered"
CIDR = "10.0.9.0/24"
METRICS_URL = "http://127.0.0.1:9323/metrics"
# Gauges follow Consul watches and the tunnel reconciler (every 3 s in the lab): they settle a
# moment after the call that changed them, where counters have moved before it returns.
SETTLE_SECONDS = 15.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ELab]:
    args = ("--metrics-addr", "127.0.0.1:9323", "--log-format", "json")
    with E2ELab(3, tmp_path_factory.mktemp("e2e-metrics"), serve_args=args) as built:
        yield built


def scrape(host: Host) -> Samples:
    result = host.netns.run(["curl", "-sf", "--max-time", "10", METRICS_URL], check=False)
    assert result.returncode == 0, f"{host.name}: scrape failed: {result.stderr}"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(result.stdout)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` that has ``labels`` (and any others)."""
    return sum(v for (n, series), v in samples.items()
               if n == name and set(labels.items()) <= set(series))


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def settled(host: Host, check: Callable[[Samples], bool]) -> Samples:
    """Scrapes until ``check`` holds; fails naming the last scrape after SETTLE_SECONDS."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        samples = scrape(host)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            interesting = {k: v for k, v in samples.items()
                           if k[0].startswith(("powerplane_endpoints", "powerplane_network_",
                                               "powerplane_tunnels", "powerplane_peers"))}
            raise AssertionError(f"{host.name}: metrics did not settle: {interesting}")
        time.sleep(0.2)


def gauges_show(*, here: int, everywhere: int) -> Callable[[Samples], bool]:
    """Endpoints of NETWORK here and on all hosts as given; tunnels to both other hosts."""
    def check(samples: Samples) -> bool:
        return (value(samples, "powerplane_endpoints", network=NETWORK) == here
                and value(samples, "powerplane_network_endpoints", network=NETWORK) == everywhere
                and value(samples, "powerplane_peers") == 2
                and value(samples, "powerplane_tunnels") >= 2)
    return check


def log_lines(host: Host) -> list[dict[str, Any]]:
    """serve's log as JSON objects (every line must be one)."""
    return [json.loads(line) for line in host.serve_log().splitlines() if line.strip()]


def test_counters_follow_the_flow(lab: E2ELab) -> None:
    """n creates on a host → n allocations and n 201s there; endpoints gauges match on every
    host; a create on a network that does not exist and one with a malformed CIDR → one hook
    failure each under its reason, nothing allocated; removals → n releases."""
    a, b, c = lab.hosts
    a.powerplane("network", "create", NETWORK, CIDR)
    before = {host.name: scrape(host) for host in lab.hosts}
    created: dict[str, list[str]] = {a.name: [], b.name: []}
    for host, count in ((a, 3), (b, 2)):
        for index in range(count):
            name = f"m-{host.name}-{index}"
            host.docker_cli("run", "-d", "--name", name, "-e", f"SOCKETPLANE_NETWORK={NETWORK}",
                            "busybox", "sleep", "1000")
            created[host.name].append(name)

    for host, count in ((a, 3), (b, 2), (c, 0)):
        after = scrape(host)
        was = before[host.name]
        assert moved(was, after, "powerplane_ipam_allocations_total", network=NETWORK) == count
        assert moved(was, after, "powerplane_proxy_requests_total", route="containers_create",
                     status="201") == count
        assert moved(was, after, "powerplane_hook_duration_seconds_count", hook="network",
                     phase="pre") >= count
        assert moved(was, after, "powerplane_hook_failures_total", hook="network", phase="pre",
                     reason="network_not_found") == 0
        assert value(after, "powerplane_ipam_conflicts_total", network=NETWORK) == 0

    # `docker exec`: its start turns into a raw stream, counted as hijacked, once.
    was = scrape(a)
    a.docker_cli("exec", created[a.name][0], "true")
    after = scrape(a)
    assert total(after, "powerplane_proxy_requests_total", route="hijacked") \
        - total(was, "powerplane_proxy_requests_total", route="hijacked") == 1
    assert moved(was, after, "powerplane_ipam_allocations_total", network=NETWORK) == 0

    # Gauges: endpoints here and everywhere, as Consul's watch delivers them to each host.
    for host, here in ((a, 3), (b, 2), (c, 0)):
        settled(host, gauges_show(here=here, everywhere=5))
        now = scrape(host)
        for part in ("listeners", "dataplane", "consul"):
            assert value(now, "powerplane_ready", part=part) == 1
        assert value(now, "powerplane_reconcile_runs_total", result="ok") >= 1

    # Refused creates: each counted once, under its reason, and nothing allocated.
    was = scrape(a)
    missing = a.docker_cli("create", "-e", "SOCKETPLANE_NETWORK=nosuch", "busybox", "true",
                           check=False)
    assert missing.returncode != 0 and "nosuch" in missing.stderr
    malformed = a.docker_cli("create", "-e", "SOCKETPLANE_CIDR=10.0.300.0/24", "busybox", "true",
                             check=False)
    assert malformed.returncode != 0
    after = scrape(a)
    assert moved(was, after, "powerplane_hook_failures_total", hook="network", phase="pre",
                 reason="network_not_found") == 1
    assert moved(was, after, "powerplane_hook_failures_total", hook="network", phase="pre",
                 reason="invalid_network") == 1
    assert moved(was, after, "powerplane_proxy_requests_total", route="containers_create",
                 status="400") == 2
    assert moved(was, after, "powerplane_ipam_allocations_total", network=NETWORK) == 0

    # Removals release exactly what was allocated; the gauges follow.
    for host in (a, b):
        was = scrape(host)
        host.docker_cli("rm", "-f", *created[host.name])
        after = scrape(host)
        assert moved(was, after, "powerplane_ipam_releases_total",
                     network=NETWORK) == len(created[host.name])
    for host in lab.hosts:
        settled(host, gauges_show(here=0, everywhere=0))


def test_logs_are_json_and_name_request_container_and_network(lab: E2ELab) -> None:
    """Every line of serve's log is one JSON object; the lines of an overlay create carry its
    request id, the container and the network; plain requests log nothing at info level."""
    a = lab.hosts[0]
    a.powerplane("network", "create", "logged", "10.0.10.0/24", check=False)
    app = a.docker_cli("run", "-d", "-e", "SOCKETPLANE_NETWORK=logged", "busybox",
                       "sleep", "1000").stdout.strip()
    for _ in range(5):
        a.docker_cli("ps", "-q")
    lines = log_lines(a)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    recorded = [line for line in lines if line.get("container") == app[:12]]
    assert recorded, "no log line names the container"
    assert all(line.get("network") == "logged" for line in recorded)
    request = recorded[0].get("request")
    assert request, recorded[0]
    # The sandbox's lines of the same create carry the same request id.
    same_request = [line for line in lines if line.get("request") == request]
    assert any("holds" in line["message"] and line.get("network") == "logged"
               for line in same_request), same_request
    assert not [line for line in lines if "/containers/json" in line["message"]]
    a.docker_cli("rm", "-f", app)
