"""The metrics and log plumbing: what the proxy reports, the registry's text, log line shapes.

The proxy runs for real on unix sockets in front of a scripted upstream (as in
test_proxy_relay.py) with a built-in hook of the test's own; the metrics come back through the
real listener and are read with the client library's own parser. The whole flow with dockerd,
Consul and OVS is tests/e2e/test_metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapter import logs
from adapter.errors import BadRequest, ConfigError, NetworkNotFound, PoolExhausted
from adapter.metrics import Metrics, metrics_listener
from adapter.proxy.adapters_config import parse_adapters_config
from adapter.proxy.hookchain import HookChain
from adapter.proxy.observer import route_class
from adapter.proxy.powerstrip import PowerstripMessage
from adapter.proxy.relay import DockerProxy
from adapter.settings import OBSERVABILITY_OPTIONS, SERVE_OPTIONS, add_options, load_settings
from tests.support.consul import free_port

ADAPTERS = """\
endpoints:
  "POST /*/containers/create":
    pre: [recorder]
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Log lines as JSON into a buffer; the root logger is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class RecorderHook:
    """A built-in hook that logs a line and refuses creates whose body says so."""

    def __init__(self) -> None:
        self.log = logging.getLogger("tests.recorder")

    async def __call__(self, message: PowerstripMessage) -> PowerstripMessage:
        request = message["ClientRequest"]
        self.log.info("saw %s", request["Request"])
        body = json.loads(request["Body"] or "{}")
        if body.get("refuse") == "missing":
            # As the network hook answers a missing network: a 400 that keeps its reason.
            error = NetworkNotFound("network 'nope' does not exist")
            raise BadRequest(error.message, reason=error.reason)
        if body.get("refuse") == "full":
            raise PoolExhausted("network 'full' has no free address")
        return {"PowerstripProtocolVersion": 1, "ModifiedClientRequest": request}


async def dockerd_script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request 200 (creates 201) on one keep-alive connection."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                await reader.readexactly(int(line.split(b":")[1]))
        if b"/containers/create" in head.split(b"\r\n")[0]:
            body = b'{"Id":"abc"}'
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
        await writer.drain()


@asynccontextmanager
async def proxy_with_metrics(tmp_path: Path) -> AsyncIterator[tuple[Path, str]]:
    """(proxy socket, metrics URL): a proxy reporting to a Metrics served on loopback."""
    metrics = Metrics()
    upstream_path, proxy_path = tmp_path / "dockerd.sock", tmp_path / "proxy.sock"
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await dockerd_script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(upstream_path))
    config = parse_adapters_config(ADAPTERS, source="adapters.yml")
    chain = HookChain.build(config, {"recorder": RecorderHook()}, None, observer=metrics)
    proxy = DockerProxy(f"unix://{upstream_path}", chain, observer=metrics)
    listener = await asyncio.get_running_loop().create_unix_server(proxy.accept,
                                                                   path=str(proxy_path))
    try:
        async with metrics_listener(metrics, "127.0.0.1", free_port()) as url:
            yield proxy_path, url
    finally:
        listener.close()
        await proxy.close()
        # The proxy closed its dockerd connections: each handler sees the end and returns.
        if handlers:
            await asyncio.wait(handlers, timeout=10)
        server.close()


async def exchange(path: Path, requests: list[bytes]) -> list[bytes]:
    """Send each request on one connection; each answer's head and body."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    answers = []
    try:
        for request in requests:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            answers.append(head + await reader.readexactly(length))
    finally:
        writer.close()
    return answers


def create(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1.43/containers/create HTTP/1.1\r\nHost: d\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return await answer.text()


async def test_proxy_counts_requests_by_route_and_status(tmp_path: Path) -> None:
    """Each answered request is counted once under its route class and status, with its
    latency; hook calls are timed, and a refused one counted under the error's reason."""
    async with proxy_with_metrics(tmp_path) as (path, url):
        ping = b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n"
        answers = await exchange(path, [ping, ping, ping, create({"Image": "x"}),
                                        b"GET /v1.43/containers/json HTTP/1.1\r\nHost: d\r\n\r\n"])
        assert [a.split(b" ")[1] for a in answers] == [b"200", b"200", b"200", b"201", b"200"]
        refused = await exchange(path, [create({"refuse": "missing"})])
        assert refused[0].startswith(b"HTTP/1.1 400")
        refused = await exchange(path, [create({"refuse": "full"})])
        assert refused[0].startswith(b"HTTP/1.1 409")
        text = await scrape(url)
    assert value(text, "powerplane_proxy_requests_total", route="ping", status="200") == 3
    assert value(text, "powerplane_proxy_requests_total", route="containers_create",
                 status="201") == 1
    assert value(text, "powerplane_proxy_requests_total", route="containers_create",
                 status="400") == 1
    assert value(text, "powerplane_proxy_requests_total", route="containers_create",
                 status="409") == 1
    assert value(text, "powerplane_proxy_requests_total", route="containers_other",
                 status="200") == 1
    assert value(text, "powerplane_proxy_request_duration_seconds_count", route="ping") == 3
    assert value(text, "powerplane_proxy_request_duration_seconds_sum", route="ping") > 0
    assert value(text, "powerplane_hook_duration_seconds_count", hook="recorder",
                 phase="pre") == 3
    assert value(text, "powerplane_hook_failures_total", hook="recorder", phase="pre",
                 reason="network_not_found") == 1
    assert value(text, "powerplane_hook_failures_total", hook="recorder", phase="pre",
                 reason="pool_exhausted") == 1


async def test_request_id_reaches_the_hook_log_lines(tmp_path: Path,
                                                     captured: io.StringIO) -> None:
    """A hooked request's id is on its hook's lines and on its refusal; two requests, two ids;
    plain requests log nothing at the default level."""
    async with proxy_with_metrics(tmp_path) as (path, _):
        await exchange(path, [b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n"] * 3)
        assert [line for line in lines(captured) if line["logger"].startswith("adapter.proxy")
                ] == []
        await exchange(path, [create({"Image": "x"})])
        await exchange(path, [create({"refuse": "missing"})])
    found = lines(captured)
    saw = [line for line in found if line["logger"] == "tests.recorder"]
    assert len(saw) == 2
    assert all(line["hook"] == "recorder" for line in saw)
    first, second = saw[0]["request"], saw[1]["request"]
    assert first and second and first != second
    refusal = [line for line in found if line["message"].startswith("request refused")]
    assert len(refusal) == 1 and refusal[0]["request"] == second
    failure = [line for line in found if "hook recorder failed" in line["message"]]
    assert len(failure) == 1 and failure[0]["request"] == second
    assert not [line for line in found if line["logger"] == "adapter.proxy.session"
                and "/_ping" in line["message"]]


def test_json_log_line_shape(captured: io.StringIO) -> None:
    """One object per line: time, level, logger, message and the context fields; a container
    id shortened as docker ps shows it; the line's own fields win over the context's."""
    log = logging.getLogger("powerplane.test")
    container = "3f2a9b0c1d2e" + "f" * 52
    with logs.context(container=container, network="blue"):
        log.info("plugged %s", "eth0")
        log.warning("moved", extra=logs.fields(network="red"))
    log.info("no context")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third, fourth = lines(captured)
    assert set(first) == {"time", "level", "logger", "message", "container", "network"}
    assert first["level"] == "info" and first["logger"] == "powerplane.test"
    assert first["message"] == "plugged eth0"
    assert first["container"] == "3f2a9b0c1d2e" and first["network"] == "blue"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["network"] == "red" and second["container"] == "3f2a9b0c1d2e"
    assert set(third) == {"time", "level", "logger", "message"}
    assert fourth["level"] == "error" and "ValueError: boom" in fourth["exception"]
    assert logs.current() == {}


def test_text_log_line_names_its_context() -> None:
    """The text format appends the fields, readable, and leaves a line without any alone."""
    record = logging.LogRecord("powerplane.x", logging.INFO, __file__, 1, "released %s",
                               ("10.0.6.2",), None)
    record.powerplane_context = {"request": "ab12-7"}
    record.container, record.network = "0123456789abcdef", "blue"
    formatted = logs.TextFormatter().format(record)
    assert formatted.endswith("released 10.0.6.2 [request=ab12-7 container=0123456789abcdef "
                              "network=blue]")
    plain = logging.LogRecord("powerplane.x", logging.INFO, __file__, 1, "hello", (), None)
    assert logs.TextFormatter().format(plain).endswith("powerplane.x: hello")


async def test_context_stays_in_its_task() -> None:
    """Fields bound in one task do not leak into another or into the caller."""
    async def work(name: str) -> dict[str, str]:
        logs.bind(request=name)
        await asyncio.sleep(0)
        return dict(logs.current())

    results = await asyncio.gather(work("a"), work("b"))
    assert list(results) == [{"request": "a"}, {"request": "b"}]
    assert logs.current() == {}


def test_registry_is_per_instance_and_gauges_drop_gone_networks() -> None:
    """Two registries never share a value; a network no longer listed leaves the gauges."""
    first, second = Metrics(), Metrics()
    first.address_allocated("blue")
    first.endpoints_listed({"blue": 2, "red": 0}, {"blue": 2, "red": 3})
    first.endpoints_listed({"blue": 1}, {"blue": 1})
    first.reconciled(0.2, {"replugged": 2, "removed_ports": 0})
    first.reconciled(0.1, None)
    one = asyncio.run(first.exposition())[0].decode()
    other = asyncio.run(second.exposition())[0].decode()
    assert value(one, "powerplane_ipam_allocations_total", network="blue") == 1
    assert value(other, "powerplane_ipam_allocations_total", network="blue") == 0
    assert value(one, "powerplane_endpoints", network="blue") == 1
    assert ("powerplane_network_endpoints", (("network", "red"),)) not in samples(one)
    assert value(one, "powerplane_reconcile_runs_total", result="ok") == 1
    assert value(one, "powerplane_reconcile_runs_total", result="failed") == 1
    assert value(one, "powerplane_reconcile_fixes_total", kind="replugged") == 2
    assert ("powerplane_reconcile_fixes_total", (("kind", "removed_ports"),)) not in samples(one)


async def test_listener_on_a_taken_port_is_a_config_error() -> None:
    port = free_port()
    async with metrics_listener(Metrics(), "127.0.0.1", port):
        with pytest.raises(ConfigError, match=r"--metrics-addr 127\.0\.0\.1"):
            async with metrics_listener(Metrics(), "127.0.0.1", port):
                pass


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/_ping", "ping"),
    ("HEAD", "/v1.43/_ping", "ping"),
    ("POST", "/v1.43/containers/create", "containers_create"),
    ("POST", "/containers/create", "containers_create"),
    ("GET", "/containers/create", "containers_other"),
    ("DELETE", "/v1.41/containers/abc", "containers_other"),
    ("POST", "/exec/abc/resize", "exec"),
    ("POST", "/v1.43/build", "images"),
    ("GET", "/volumes", "other"),
    ("GET", "/v1.43", "other"),
])
def test_route_classes(method: str, path: str, expected: str) -> None:
    assert route_class(method, path) == expected


def test_settings_for_metrics_and_logs() -> None:
    """--metrics-addr takes IP[:PORT] (9323 by default); bad formats and levels are refused."""
    options = (*SERVE_OPTIONS, *OBSERVABILITY_OPTIONS)
    parser = argparse.ArgumentParser()
    add_options(parser, options)
    settings = load_settings(parser.parse_args([]), {}, options)
    assert settings.metrics_addr is None and settings.log_format == "text"
    settings = load_settings(parser.parse_args(["--metrics-addr", "127.0.0.1"]),
                             {"POWERPLANE_LOG_FORMAT": "JSON"}, options)
    assert settings.metrics_addr == ("127.0.0.1", 9323) and settings.log_format == "json"
    settings = load_settings(parser.parse_args([]), {"POWERPLANE_METRICS_ADDR": "[::1]:9400"},
                             options)
    assert settings.metrics_addr == ("::1", 9400)
    for args, env in ((["--log-format", "xml"], {}), ([], {"POWERPLANE_LOG_LEVEL": "loud"}),
                      (["--metrics-addr", "localhost:1"], {})):
        with pytest.raises(ConfigError):
            load_settings(parser.parse_args(args), env, options)


async def test_debug_level_logs_each_request(tmp_path: Path, captured: io.StringIO) -> None:
    """At debug level (read when the proxy starts) every request gets a line with its id."""
    logging.getLogger().setLevel(logging.DEBUG)
    async with proxy_with_metrics(tmp_path) as (path, _):
        await exchange(path, [b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n"] * 2)
    pings = [line for line in lines(captured) if line["logger"] == "adapter.proxy.session"
             and line["message"].startswith("GET /_ping: 200 in ")]
    assert len(pings) == 2 and pings[0]["request"] != pings[1]["request"]


def exported_names() -> set[str]:
    """Every sample name the registry can export (counters' _total, histograms' parts)."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gauge": ("",)}[family.type]
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_docs_and_deploy_examples_use_real_metric_names() -> None:
    """docs/metrics.md lists every metric; the dashboard and the rules use only real names."""
    root = Path(__file__).resolve().parent.parent
    exported = exported_names()
    doc = (root / "docs" / "metrics.md").read_text()
    families = {family.name + ("_total" if family.type == "counter" else "")
                for family in Metrics().registry.collect()}
    assert len(families) >= 19
    assert not [name for name in families if f"`{name}`" not in doc]
    dashboard = json.loads((root / "deploy" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = (root / "deploy" / "powerplane-rules.yml").read_text()
    used = set(re.findall(r"\bpowerplane_[a-z_]+", " ".join(expressions) + rules))
    assert used and used <= exported, used - exported
