"""Prometheus metrics: one registry per ``serve``, its metrics, and the listener serving them.

The only module that imports ``prometheus_client``. ``Metrics`` owns a registry of its own
(never the library's global one, so nothing is registered at import time and tests may make as
many as they like) and offers verbs in Powerplane's words; callers never see a metric object.
Every verb is cheap and is called on the event loop; the text exposition, which walks every
series, is made in a worker thread so a scrape never holds the loop. Names, labels and meanings
are listed in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from adapter import __version__
from adapter.errors import ConfigError

log = logging.getLogger(__name__)

# Seconds. The proxy's own answers take about a millisecond, a create through the network hook
# a few hundred; both ends need buckets.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
HOOK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECONCILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric of one ``serve`` process, in its own registry."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=False)
        Gauge("powerplane_build_info", "Always 1; the running version as a label.",
              ["version"], registry=registry).labels(__version__).set(1)
        # Proxy (ProxyObserver)
        self._requests = _ProxyRequests()
        registry.register(self._requests)
        self._hook_seconds = Histogram(
            "powerplane_hook_duration_seconds", "One hook call, by hook and phase (pre, post).",
            ["hook", "phase"], buckets=HOOK_BUCKETS, registry=registry)
        self._hook_failures = Counter(
            "powerplane_hook_failures", "Hook calls that stopped their request, by hook, phase "
            "and reason (the error, e.g. network_not_found, pool_exhausted).",
            ["hook", "phase", "reason"], registry=registry)
        # IPAM
        self._allocations = Counter(
            "powerplane_ipam_allocations", "Overlay addresses claimed by this host, by network.",
            ["network"], registry=registry)
        self._releases = Counter(
            "powerplane_ipam_releases", "Overlay addresses this host released, by network.",
            ["network"], registry=registry)
        self._conflicts = Counter(
            "powerplane_ipam_conflicts", "Address claims lost because the address was taken "
            "meanwhile (another host or a stale hint), by network.", ["network"],
            registry=registry)
        self._exhausted = Counter(
            "powerplane_ipam_exhausted", "Allocations refused because the network had no free "
            "address, by network.", ["network"], registry=registry)
        # Endpoints, tunnels, readiness
        self._endpoints = Gauge(
            "powerplane_endpoints", "Overlay endpoints on this host, by network.", ["network"],
            registry=registry)
        self._network_endpoints = Gauge(
            "powerplane_network_endpoints", "Overlay endpoints on every host, by network, as "
            "this host last read them from Consul.", ["network"], registry=registry)
        self._tunnels = Gauge("powerplane_tunnels", "VXLAN tunnel ports on this host's bridge.",
                              registry=registry)
        self._peers = Gauge("powerplane_peers", "Remote hosts this host keeps tunnels to.",
                            registry=registry)
        self._ready = Gauge(
            "powerplane_ready", "1 while a part of this host is up (listeners, dataplane, "
            "consul), 0 while it is starting or down.", ["part"], registry=registry)
        # Reconciliation
        self._reconcile_runs = Counter(
            "powerplane_reconcile_runs", "Reconciliations of Consul, Docker and OVS, by result "
            "(ok, failed).", ["result"], registry=registry)
        self._reconcile_seconds = Histogram(
            "powerplane_reconcile_duration_seconds", "One reconciliation.",
            buckets=RECONCILE_BUCKETS, registry=registry)
        self._reconcile_fixes = Counter(
            "powerplane_reconcile_fixes", "What reconciliations changed, by kind of fix "
            "(released_endpoints, replugged, ...), one per thing fixed.", ["kind"],
            registry=registry)
        # Consul
        self._consul_errors = Counter(
            "powerplane_consul_errors", "Consul requests that failed, by reason "
            "(consul_unavailable, consul_access_denied, state_error).", ["reason"],
            registry=registry)
        self._consul_retries = Counter(
            "powerplane_consul_retries", "Consul requests asked again (an election, a dropped "
            "connection).", registry=registry)

    # -- proxy -----------------------------------------------------------------------------------

    def answered(self, route: str, status: int, seconds: float) -> None:
        self._requests.answered(route, status, seconds)

    def hook_finished(self, hook: str, phase: str, seconds: float, failure: str | None) -> None:
        self._hook_seconds.labels(hook, phase).observe(seconds)
        if failure is not None:
            self._hook_failures.labels(hook, phase, failure).inc()

    # -- IPAM ------------------------------------------------------------------------------------

    def address_allocated(self, network: str) -> None:
        self._allocations.labels(network).inc()

    def address_released(self, network: str) -> None:
        self._releases.labels(network).inc()

    def address_conflict(self, network: str) -> None:
        self._conflicts.labels(network).inc()

    def pool_exhausted(self, network: str) -> None:
        self._exhausted.labels(network).inc()

    # -- endpoints, tunnels, readiness -------------------------------------------------------------

    def endpoints_listed(self, here: Mapping[str, int], everywhere: Mapping[str, int]) -> None:
        """Endpoint counts per network, on this host and on all; networks absent are dropped."""
        _set_by_label(self._endpoints, here)
        _set_by_label(self._network_endpoints, everywhere)

    def tunnels_set(self, *, tunnels: int, peers: int) -> None:
        self._tunnels.set(tunnels)
        self._peers.set(peers)

    def readiness(self, parts: Mapping[str, bool]) -> None:
        for part, up in parts.items():
            self._ready.labels(part).set(1 if up else 0)

    # -- reconciliation and Consul -----------------------------------------------------------------

    def reconciled(self, seconds: float, fixes: Mapping[str, int] | None) -> None:
        """One reconciliation took ``seconds``; ``fixes`` by kind, or None when it failed."""
        self._reconcile_seconds.observe(seconds)
        self._reconcile_runs.labels("failed" if fixes is None else "ok").inc()
        for kind, count in (fixes or {}).items():
            if count:
                self._reconcile_fixes.labels(kind).inc(count)

    def consul_failed(self, reason: str) -> None:
        self._consul_errors.labels(reason).inc()

    def consul_retried(self) -> None:
        self._consul_retries.inc()

    # -- exposition ------------------------------------------------------------------------------

    async def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The text format a scraper asked for (``accept``) and its content type."""
        encoder, content_type = choose_encoder(accept)
        # In a thread: the walk over every series is the one thing here that grows.
        output = await asyncio.to_thread(encoder, self.registry)
        return output, content_type


class _ProxyRequests:
    """The proxy's requests, counted in plain numbers on the event loop and turned into metric
    families only when scraped: the library's own counter and histogram take a lock and check
    their state on every call, which cost a plain request about 10 us of its ~160 us CPU."""

    REQUESTS = "powerplane_proxy_requests"
    DURATION = "powerplane_proxy_request_duration_seconds"

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        # Per route: one count per bucket (the last one past every bound), then the sum.
        self._durations: dict[str, list[float]] = {}

    def answered(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        slots = self._durations.get(route)
        if slots is None:
            slots = self._durations[route] = [0.0] * (len(REQUEST_BUCKETS) + 2)
        # A bucket counts what is at most its bound: the first bound >= seconds.
        slots[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1
        slots[-1] += seconds

    def describe(self) -> Iterator[Metric]:
        yield from self._families({}, {})

    def collect(self) -> Iterator[Metric]:
        # Scrapes run in a worker thread: each copy is one C call under the GIL, so the
        # event loop's updates are never seen half done (at most between two copies).
        counts = dict(self._counts)
        durations = {route: list(slots) for route, slots in list(self._durations.items())}
        yield from self._families(counts, durations)

    def _families(self, counts: Mapping[tuple[str, int], int],
                  durations: Mapping[str, list[float]]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            self.REQUESTS, "Docker API requests answered through the proxy, by route class and "
            "HTTP status.", labels=["route", "status"])
        for (route, status), count in sorted(counts.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        duration = HistogramMetricFamily(
            self.DURATION, "From a request's head to its answer's head, by route class (a "
            "stream's own length is not counted).", labels=["route"])
        for route, slots in sorted(durations.items()):
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, observed in zip((*map(str, REQUEST_BUCKETS), "+Inf"), slots[:-1],
                                       strict=True):
                cumulative += observed
                buckets.append((bound, cumulative))
            duration.add_metric([route], buckets, slots[-1])
        yield duration


def _set_by_label(gauge: Gauge, values: Mapping[str, int]) -> None:
    for label, value in values.items():
        gauge.labels(label).set(value)
    for sample_labels in _label_values(gauge):
        if sample_labels[0] not in values:
            gauge.remove(*sample_labels)


def _label_values(gauge: Gauge) -> list[tuple[str, ...]]:
    return [tuple(sample.labels.values()) for metric in gauge.collect()
            for sample in metric.samples]


@asynccontextmanager
async def metrics_listener(metrics: Metrics, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``metrics`` at ``http://host:port/metrics`` until the block ends; yields the URL."""

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = await metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"--metrics-addr {host}:{port}: cannot listen: "
                              f"{exc.strerror or exc}") from None
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        url = f"http://{where}/metrics"
        log.info("metrics at %s", url)
        yield url
    finally:
        await runner.cleanup()
