"""Hostile input through the real proxy: malformed bodies, wrong types, odd names, garbage state.

One ``powerplane serve`` for the whole module, in front of a private dockerd, with a Consul dev
agent and Open vSwitch (for the cases that must attach) inside one lab namespace. Every case
checks the same three things: a Docker-shaped 4xx naming the problem (or one clear CLI line),
serve still answering ``/_ping`` with no traceback in its log, and nothing left allocated: no
sandbox container on the dockerd, no address key under serve's Consul prefix.
"""

from __future__ import annotations

import base64
import json
import re
import string
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lab.netns import LabHost
from tests.support import rawhttp
from tests.support.consul import ConsulAgent
from tests.support.dockerd import DockerDaemon
from tests.support.one_host import one_host
from tests.support.ovs import OvsInstance
from tests.support.serve import POWERPLANE, ServeProcess

pytestmark = pytest.mark.lab

PREFIX = "hostile/"
HOST_ID = "hostile"
CREATE = "/v1.41/containers/create"
SANDBOX_FILTER = quote(json.dumps({"label": ["io.powerplane.role=sandbox"]}))
JSON_LIMIT = 10 * 1024 * 1024  # adapter.proxy.relay.JSON_LIMIT
# A 4xx message quotes what was wrong, but never a whole megabyte of it.
MESSAGE_MAX = 2000
# Networks a valid request may name: one the module creates, and one a CIDR creates on use.
GOOD_NETWORK, GOOD_CIDR = "good", "10.77.0.0/24"
FRESH_CIDR = "10.44.0.0/24"
UNUSED_CIDR, UNUSED_NETWORK = "10.45.0.0/24", "net-10.45.0.0-24"

EXAMPLES = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Plane:
    """serve, dockerd, Consul and OVS of this module, and the checks every case ends with."""

    def __init__(self, netns: LabHost, consul: ConsulAgent, dockerd: DockerDaemon,
                 serve: ServeProcess, ovs: OvsInstance) -> None:
        self.netns = netns
        self.consul = consul
        self.dockerd = dockerd
        self.serve = serve
        self.ovs = ovs
        self.log_start = 0  # where the running test's part of serve's log begins
        self.planted_addresses: set[str] = set()  # garbage address keys a test put there

    # -- the proxy ---------------------------------------------------------------------------

    def send(self, method: str, target: str, body: bytes | None = None,
             **kwargs: Any) -> rawhttp.Reply:
        return rawhttp.request(self.serve.socket, method, target, body, **kwargs)

    def create(self, body: Any, *, query: str = "", keep: bool = False) -> rawhttp.Reply:
        """POST /containers/create through the proxy with ``body`` as JSON.

        Unless ``keep``, a container it creates is removed again through the proxy, so that one
        failing example does not leave a sandbox for every later case to trip over."""
        reply = self.send("POST", CREATE + query, json.dumps(body).encode())
        if reply.status == 201 and not keep:
            self.send("DELETE", f"/v1.41/containers/{reply.json['Id']}?force=1",
                      content_type=None)
        return reply

    # -- Consul, from inside the lab namespace -------------------------------------------------

    def kv(self, method: str, key: str, data: bytes | None = None,
           query: str = "") -> tuple[int, bytes]:
        url = f"http://{self.consul.http_addr}/v1/kv/{quote(PREFIX + key)}{query}"
        result = self.netns.run(["curl", "-s", "-X", method, "--data-binary", "@-",
                                 "-w", "\n%{http_code}", url],
                                input=data or b"", text=False)
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code), body

    def kv_put(self, key: str, value: bytes) -> None:
        code, body = self.kv("PUT", key, value)
        assert code == 200 and body.strip() == b"true", (key, code, body)

    def kv_put_many(self, items: dict[str, bytes]) -> None:
        """Write small values in one transaction (Consul takes at most 64 operations)."""
        self._txn([{"KV": {"Verb": "set", "Key": PREFIX + key,
                           "Value": base64.b64encode(value).decode()}}
                   for key, value in items.items()])

    def kv_delete_many(self, keys: list[str]) -> None:
        self._txn([{"KV": {"Verb": "delete", "Key": PREFIX + key}} for key in keys])

    def _txn(self, ops: list[dict[str, Any]]) -> None:
        assert len(ops) <= 64
        result = self.netns.run(["curl", "-s", "-X", "PUT", "--data-binary", "@-", "-w",
                                 "\n%{http_code}", f"http://{self.consul.http_addr}/v1/txn"],
                                input=json.dumps(ops))
        assert result.stdout.endswith("\n200"), result.stdout[-500:]

    def kv_keys(self, folder: str) -> list[str]:
        code, body = self.kv("GET", folder, query="?keys")
        assert code in (200, 404), (code, body)
        return [key[len(PREFIX):] for key in json.loads(body)] if code == 200 else []

    # -- the command line --------------------------------------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.netns.run([POWERPLANE, *args, "--consul", self.consul.http_addr,
                               "--consul-prefix", PREFIX], check=False)

    def cli_side_by_side(self, commands: dict[str, tuple[str, ...]]
                         ) -> dict[str, subprocess.CompletedProcess[str]]:
        """Run the commands at once; their results by name, as ``cli`` gives them."""
        running = {name: subprocess.Popen(
            self.netns.command([POWERPLANE, *args, "--consul", self.consul.http_addr,
                                "--consul-prefix", PREFIX]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, args in commands.items()}
        results = {}
        for name, process in running.items():
            stdout, stderr = process.communicate(timeout=120)
            results[name] = subprocess.CompletedProcess(process.args, process.returncode,
                                                        stdout, stderr)
        return results

    # -- checks ------------------------------------------------------------------------------

    def sandboxes(self) -> list[str]:
        reply = rawhttp.request(self.dockerd.socket, "GET",
                                f"/v1.41/containers/json?all=1&filters={SANDBOX_FILTER}")
        assert reply.status == 200, reply
        return [c["Id"] for c in reply.json]

    def assert_unharmed(self) -> None:
        """serve still answers and logged no traceback; no sandbox, no address is left."""
        ping = self.send("GET", "/_ping", content_type=None)
        assert (ping.status, ping.body) == (200, b"OK"), ping
        log = self.serve.log()[self.log_start:]
        assert "Traceback" not in log, log[-4000:]
        assert self.sandboxes() == []
        assert set(self.kv_keys("addresses/")) == self.planted_addresses
        assert f"networks/{UNUSED_NETWORK}" not in self.kv_keys("networks/")


@pytest.fixture(scope="module")
def plane(dockerd: DockerDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """serve before the module's dockerd, with Consul and OVS in one lab namespace."""
    workdir = tmp_path_factory.mktemp("hostile")
    with one_host(workdir, dockerd.url, prefix=PREFIX, bridge="pphostile", host_id=HOST_ID,
                  underlay=True, extra=["--dataplane-wait", "30"]) as host:
        made = host.netns.run([POWERPLANE, "network", "create", GOOD_NETWORK, GOOD_CIDR,
                               "--consul", host.consul.http_addr, "--consul-prefix", PREFIX],
                              check=False)
        assert made.returncode == 0, made.stderr
        yield Plane(host.netns, host.consul, dockerd, host.serve, host.ovs)
        assert host.serve.process.poll() is None, "serve died during the module"
        assert "Traceback" not in host.serve.log(), host.serve.log()


@pytest.fixture(autouse=True)
def _log_window(request: pytest.FixtureRequest) -> None:
    """Each test of the plane answers for the part of serve's log written while it ran."""
    if "plane" in request.fixturenames:
        plane: Plane = request.getfixturevalue("plane")
        plane.log_start = len(plane.serve.log())


def overlay_body(*env: str, **fields: Any) -> dict[str, Any]:
    """A create body for busybox with ``env`` in Env, plus ``fields``."""
    return {"Image": "busybox", "Cmd": ["sleep", "1000"], "Env": list(env), **fields}


def assert_refused(reply: rawhttp.Reply, status: int, *needles: str) -> None:
    """A Docker-shaped error with ``status`` whose message names every needle."""
    assert reply.status == status, reply
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    message = reply.message
    assert message, reply
    assert len(message) < MESSAGE_MAX, message[:300]
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)


# -- a valid create works, so every refusal below is about its input -------------------------


def test_valid_overlay_create_with_null_host_config_attaches_and_releases(plane: Plane) -> None:
    """HostConfig null is Docker's default: the create attaches, and removing it releases all."""
    reply = plane.create(overlay_body(f"SOCKETPLANE_CIDR={FRESH_CIDR}", HostConfig=None),
                         query="?name=hostile-ok", keep=True)
    assert reply.status == 201, reply
    app_id = reply.json["Id"]
    assert len(plane.sandboxes()) == 1
    assert [key.rsplit("/", 1)[1] for key in plane.kv_keys("addresses/")] == ["10.44.0.2"]
    removed = plane.send("DELETE", f"/v1.41/containers/{app_id}?force=1", content_type=None)
    assert removed.status == 204, removed
    plane.assert_unharmed()


# -- malformed and huge bodies on hooked endpoints -----------------------------------------

HOOKED_POSTS = (CREATE, "/v1.41/containers/hostile-none/start")


@pytest.mark.parametrize("target", HOOKED_POSTS)
@pytest.mark.parametrize(("body", "needle"), [
    (b'{"Image":', "invalid JSON"),
    (b"{'Image': 'busybox'}", "invalid JSON"),
    (b'{"Image": "busybox"} trailing', "invalid JSON"),
    (b'{"Image": "\xff\xfe"}', "invalid JSON"),
    (b"\x00\x01\x02", "invalid JSON"),
    (b"NaN-ish", "invalid JSON"),
])
def test_invalid_json_is_400(plane: Plane, target: str, body: bytes, needle: str) -> None:
    """A body that is not JSON at all is refused with 400 before any hook or dockerd sees it."""
    assert_refused(plane.send("POST", target, body), 400, needle)
    assert_refused(plane.send("POST", target, body, chunked=True), 400, needle)
    plane.assert_unharmed()


@pytest.mark.parametrize(("body", "kind"), [
    (b"[1, 2]", "an array"), (b'"SOCKETPLANE_CIDR=10.0.6.0/24"', "a string"),
    (b"5", "a number"), (b"true", "a boolean"),
    (b'[{"Env": ["SOCKETPLANE_CIDR=10.0.6.0/24"]}]', "an array"),
])
def test_create_body_that_is_not_an_object_is_400(plane: Plane, body: bytes, kind: str) -> None:
    """JSON that is no object cannot be a container config: 400 saying what it is instead."""
    assert_refused(plane.send("POST", CREATE, body), 400, "must be a JSON object", kind)
    plane.assert_unharmed()


def test_null_body_is_dockers_400(plane: Plane) -> None:
    """A create whose body is JSON null gets dockerd's own answer: a config is required."""
    assert_refused(plane.send("POST", CREATE, b"null"), 400, "config")
    plane.assert_unharmed()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("target", HOOKED_POSTS)
def test_body_over_the_buffering_cap_is_413(plane: Plane, target: str, chunked: bool) -> None:
    """A hooked JSON body one byte over the cap is refused with 413, announced or chunked."""
    filler = JSON_LIMIT - len(b'{"Image": "busybox", "Labels": {"x": ""}}') + 1
    body = b'{"Image": "busybox", "Labels": {"x": "' + b"x" * filler + b'"}}'
    assert len(body) == JSON_LIMIT + 1
    assert_refused(plane.send("POST", target, body, chunked=chunked), 413, "larger than",
                   str(JSON_LIMIT))
    plane.assert_unharmed()


def test_body_just_under_the_cap_reaches_the_hook(plane: Plane) -> None:
    """A body near the cap is buffered whole: its bad SOCKETPLANE_CIDR gets the hook's 400."""
    body = json.dumps(overlay_body("SOCKETPLANE_CIDR=10.0.6.0/33",
                                   f"PAD={'p' * (JSON_LIMIT - 200)}")).encode()
    assert len(body) <= JSON_LIMIT
    assert_refused(plane.send("POST", CREATE, body), 400, "/33")
    plane.assert_unharmed()


@pytest.mark.parametrize("depth", [50, 500, 900])
def test_deeply_nested_json_gets_the_hooks_400(plane: Plane, depth: int) -> None:
    """Nesting the JSON parser still reads: the request is judged on its bad CIDR, a 400.

    Deeper than Python's recursion limit, the relay itself cuts the connection: see
    tests/test_hooks_proxy.py::test_json_nested_past_the_recursion_limit_is_400."""
    nested = "[" * depth + "]" * depth
    body = ('{"Image": "busybox", "Env": ["SOCKETPLANE_CIDR=10.0.6.0/33"], "Labels": {"x": '
            + nested + "}}").encode()
    assert_refused(plane.send("POST", CREATE, body), 400, "/33")
    plane.assert_unharmed()


@pytest.mark.parametrize(("content_type", "needle"), [
    ("text/plain", "Content-Type"),
    ("application/x-www-form-urlencoded", "Content-Type"),
    ("application/octet-stream", "Content-Type"),
])
def test_wrong_content_type_on_create_is_dockers_400(plane: Plane, content_type: str,
                                                     needle: str) -> None:
    """A non-JSON Content-Type is not buffered for hooks; dockerd refuses it, nothing attaches."""
    body = json.dumps(overlay_body(f"SOCKETPLANE_CIDR={FRESH_CIDR}")).encode()
    assert_refused(plane.send("POST", CREATE, body, content_type=content_type), 400, needle)
    plane.assert_unharmed()


def test_chunked_overlay_create_is_hooked(plane: Plane) -> None:
    """A chunked JSON create is de-chunked and hooked: its bad CIDR gets the hook's 400."""
    body = json.dumps(overlay_body("SOCKETPLANE_CIDR=10.0.6.0/7")).encode()
    assert_refused(plane.send("POST", CREATE, body, chunked=True), 400, "/7")
    plane.assert_unharmed()


@pytest.mark.parametrize("raw", [
    b"POST " + CREATE.encode() + b" HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST " + CREATE.encode() + b" HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n{\"Image\": \"busybox\"}",
    b"POST " + CREATE.encode() + b" HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"Ima",
])
def test_broken_framing_is_400(plane: Plane, raw: bytes) -> None:
    """A bad chunk size or a body cut short on a hooked endpoint is a 400, not a hang."""
    assert_refused(rawhttp.exchange_half_closed(plane.serve.socket, raw), 400)
    plane.assert_unharmed()


@pytest.mark.parametrize(("method", "target"), [
    ("POST", "/v1.41/containers/%00/start"),
    ("POST", "/v1.41/containers/..%2F..%2Finfo/start"),
    ("POST", "/v1.41/containers/" + "x" * 4000 + "/start"),
    ("POST", "/v1.41/containers/%E2%98%83/start"),
    ("DELETE", "/v1.41/containers/%00"),
    ("DELETE", "/v1.41/containers/..%2F..%2Finfo"),
    ("DELETE", "/v1.41/containers/" + "x" * 4000),
    ("GET", "/v1.41/containers/%00/json"),
    ("GET", "/v1.41/containers/..%2Finfo/json"),
    ("GET", "/v1.41/containers/" + "x" * 4000 + "/json"),
])
def test_odd_container_ids_on_hooked_paths_get_dockers_answer(plane: Plane, method: str,
                                                               target: str) -> None:
    """Odd ids on start, delete and inspect pass the hooks and get dockerd's own answer."""
    reply = plane.send(method, target, content_type=None)
    direct = rawhttp.request(plane.dockerd.socket, method, target, content_type=None)
    assert (reply.status, reply.message) == (direct.status, direct.message)
    assert reply.status in (301, 404), reply
    plane.assert_unharmed()


# -- wrong types in the fields the overlay reads ---------------------------------------------

# Valid, and never joined: a refused request must not even create its network.
VALID_ENV = f"SOCKETPLANE_CIDR={UNUSED_CIDR}"
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)


def not_of(*kinds: type) -> st.SearchStrategy[Any]:
    """JSON values that are neither null nor of ``kinds`` (JSON true is no number)."""
    return JSON_VALUES.filter(lambda v: v is not None and (
        isinstance(v, bool) or not isinstance(v, kinds)))


def list_with_a_non_string() -> st.SearchStrategy[list[Any]]:
    return st.tuples(st.lists(st.text(max_size=10), max_size=2), not_of(str),
                     st.lists(st.text(max_size=10), max_size=2)).map(
        lambda parts: [*parts[0], parts[1], *parts[2]])


def wrong_field() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(field name as the message says it, body fields) with that one field of a wrong type."""
    def host_config(name: str, value: Any) -> tuple[str, dict[str, Any]]:
        return f"HostConfig.{name}", {"HostConfig": {name: value}}

    return st.one_of(
        not_of(dict).map(lambda v: ("HostConfig", {"HostConfig": v})),
        not_of(str).map(lambda v: host_config("NetworkMode", v)),
        not_of(dict).map(lambda v: host_config("RestartPolicy", v)),
        not_of(str).map(lambda v: ("HostConfig.RestartPolicy.Name",
                                   {"HostConfig": {"RestartPolicy": {"Name": v}}})),
        *(st.one_of(not_of(list), list_with_a_non_string()).map(
            lambda v, name=name: host_config(name, v))  # type: ignore[misc]
          for name in ("Dns", "DnsSearch", "DnsOptions", "ExtraHosts")),
        not_of(str).map(lambda v: ("Hostname", {"Hostname": v})),
        not_of(str).map(lambda v: ("Domainname", {"Domainname": v})),
        not_of(dict).map(lambda v: ("Labels", {"Labels": v})),
        not_of(str).map(lambda v: ("Labels", {"Labels": {"app": "web", "n": v}})),
        list_with_a_non_string().map(lambda v: ("Env", {"Env": [VALID_ENV, *v]})),
    )


@EXAMPLES
@given(case=wrong_field())
def test_wrong_types_in_an_overlay_create_are_400_naming_the_field(
        plane: Plane, case: tuple[str, dict[str, Any]]) -> None:
    """Any wrong type in a field the overlay reads is a 400 naming the field; nothing attaches."""
    field, fields = case
    reply = plane.create(overlay_body(VALID_ENV, **{"Env": [VALID_ENV], **fields}))
    assert_refused(reply, 400, field)
    plane.assert_unharmed()


@pytest.mark.parametrize(("fields", "needles"), [
    ({"Env": VALID_ENV}, ("Env", "a string")),
    ({"Env": {"SOCKETPLANE_CIDR": UNUSED_CIDR}}, ("Env", "an object")),
    ({"Env": 5}, ("Env", "a number")),
    ({"Env": True}, ("Env", "a boolean")),
    ({"Env": [VALID_ENV, ["nested"]]}, ("Env[1]", "an array")),
    ({"HostConfig": "host"}, ("HostConfig", "a string")),
    ({"HostConfig": ["NetworkMode", "host"]}, ("HostConfig", "an array")),
    ({"HostConfig": {"NetworkMode": 5}}, ("HostConfig.NetworkMode", "a number")),
    ({"HostConfig": {"RestartPolicy": "always"}}, ("HostConfig.RestartPolicy", "a string")),
    ({"HostConfig": {"RestartPolicy": {"Name": ["always"]}}}, ("RestartPolicy.Name",)),
    ({"HostConfig": {"Dns": "8.8.8.8"}}, ("HostConfig.Dns", "a string")),
    ({"HostConfig": {"ExtraHosts": ["db:10.0.0.9", 7]}}, ("HostConfig.ExtraHosts[1]",)),
    ({"Labels": ["app=web"]}, ("Labels", "an array")),
    ({"Labels": {"replicas": 3}}, ("Labels['replicas']", "a number")),
    ({"Hostname": 42}, ("Hostname", "a number")),
    ({"HostConfig": {"NetworkMode": "host"}}, ("--network host",)),
])
def test_wrong_types_table(plane: Plane, fields: dict[str, Any],
                           needles: tuple[str, ...]) -> None:
    """The wrong types users actually send: each a 400 naming the field and what it got."""
    body = {"Image": "busybox", "Env": [VALID_ENV], **fields}
    assert_refused(plane.create(body), 400, *needles)
    plane.assert_unharmed()


@pytest.mark.parametrize("fields", [
    {"Env": ["A=1", 5]}, {"Labels": ["x"]}, {"HostConfig": {"Dns": "x"}}, {"HostConfig": "x"},
])
def test_wrong_types_without_overlay_get_dockers_own_answer(plane: Plane,
                                                            fields: dict[str, Any]) -> None:
    """A create that asks for no overlay is Docker's business: the proxy answers exactly what
    dockerd answers directly (this dockerd says 500 for a body it cannot decode)."""
    body = json.dumps({"Image": "busybox", **fields}).encode()
    reply = plane.send("POST", CREATE, body)
    direct = rawhttp.request(plane.dockerd.socket, "POST", CREATE, body)
    assert (reply.status, reply.message) == (direct.status, direct.message)
    assert "cannot unmarshal" in reply.message, reply
    plane.assert_unharmed()


# -- odd SOCKETPLANE_* values ----------------------------------------------------------------

IPV4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda o: ".".join(map(str, o)))
ODD_CHARACTERS = st.sampled_from(["\x00", " ", "\t", "\n", "\u00a0", "\u2028", "\ufeff", "é",
                                  "\u0663", "\uff11", "/", "..", "%2F", "\\", ";", "'", '"'])


@st.composite
def bad_cidrs(draw: st.DrawFn) -> str:
    """Values of SOCKETPLANE_CIDR that are wrong by construction."""
    kind = draw(st.sampled_from(["prefix", "octet", "ipv6", "no-slash", "odd-char", "huge",
                                 "garbage"]))
    if kind == "prefix":
        prefix = draw(st.one_of(st.integers(0, 7), st.integers(30, 128),
                                st.integers(-5, -1), st.text(string.ascii_letters, min_size=1)))
        return f"{draw(IPV4)}/{prefix}"
    if kind == "octet":
        octets = [str(draw(st.integers(0, 255))) for _ in range(3)]
        octets.insert(draw(st.integers(0, 3)), str(draw(st.integers(256, 10**6))))
        return ".".join(octets) + "/24"
    if kind == "ipv6":
        return draw(st.sampled_from(["fd00::/64", "::1/128", "2001:db8::/32",
                                     "::ffff:10.0.0.0/104"]))
    if kind == "no-slash":
        return draw(IPV4)
    if kind == "odd-char":
        valid = f"{draw(IPV4)}/{draw(st.integers(8, 29))}"
        where = draw(st.integers(1, len(valid) - 1))
        return valid[:where] + draw(ODD_CHARACTERS.filter(lambda c: c.strip())) + valid[where:]
    if kind == "huge":
        return draw(st.sampled_from(["1", "10.0.0.0/", "x"])) * draw(st.integers(1000, 200_000))
    return draw(st.text(min_size=1).filter(lambda s: "/" not in s and s.strip()))


@EXAMPLES
@given(cidr=bad_cidrs())
def test_bad_socketplane_cidr_is_400(plane: Plane, cidr: str) -> None:
    """Any malformed SOCKETPLANE_CIDR is a 400 quoting it (briefly); nothing is allocated."""
    assert_refused(plane.create(overlay_body(f"SOCKETPLANE_CIDR={cidr}")), 400, "CIDR")
    plane.assert_unharmed()


# The rule for network names (adapter.model.NAME_PATTERN, at most 64 characters).
NETWORK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")


@st.composite
def bad_network_names(draw: st.DrawFn) -> str:
    """Values of SOCKETPLANE_NETWORK that no network can have."""
    kind = draw(st.sampled_from(["odd-char", "leading", "long", "dots", "text"]))
    base = draw(st.text(string.ascii_lowercase + string.digits, min_size=2, max_size=20))
    if kind == "odd-char":
        where = draw(st.integers(1, len(base) - 1))
        odd = draw(ODD_CHARACTERS.filter(lambda c: c.strip() and c != ".."))
        return base[:where] + odd + base[where:]
    if kind == "leading":
        return draw(st.sampled_from(["-", ".", "_"])) + base
    if kind == "long":
        return base * draw(st.integers(65 // len(base) + 1, 50_000 // len(base)))
    if kind == "dots":
        return draw(st.sampled_from(["..", ".", "../networks/good", "good/../good", "a/b"]))
    return draw(st.text(min_size=1).filter(
        lambda s: s.strip() and not NETWORK_NAME.fullmatch(s.strip())))


@EXAMPLES
@given(name=bad_network_names())
def test_bad_socketplane_network_is_400(plane: Plane, name: str) -> None:
    """A SOCKETPLANE_NETWORK no network can be named is a 400 saying so, quoting it briefly."""
    reply = plane.create(overlay_body(f"SOCKETPLANE_NETWORK={name}"))
    assert_refused(reply, 400, "invalid network name")
    plane.assert_unharmed()


@pytest.mark.parametrize(("env", "status", "needle"), [
    (["SOCKETPLANE_CIDR="], 400, "empty"),
    (["SOCKETPLANE_CIDR= \t "], 400, "empty"),
    (["SOCKETPLANE_NETWORK=", "SOCKETPLANE_CIDR="], 400, "empty"),
    (["SOCKETPLANE_CIDR=10.0.6.0/33"], 400, "/33"),
    (["SOCKETPLANE_CIDR=fd00::/64"], 400, "only IPv4"),
    (["SOCKETPLANE_CIDR=10.0.6.0/24/24"], 400, "CIDR"),
    (["SOCKETPLANE_NETWORK=nosuchnet"], 400, "does not exist"),
    (["SOCKETPLANE_NETWORK=nosuchnet", "SOCKETPLANE_CIDR=10.0.6.0/33"], 400, "/33"),
    ([f"SOCKETPLANE_NETWORK={GOOD_NETWORK}", "SOCKETPLANE_CIDR=10.78.0.0/24"], 400,
     "make them agree"),
    (["SOCKETPLANE_NETWORK=" + "n" * 1_000_000], 400, "1000000 characters"),
])
def test_socketplane_values_table(plane: Plane, env: list[str], status: int,
                                  needle: str) -> None:
    """Empty, conflicting, unknown and huge SOCKETPLANE_* values: each a clear 4xx."""
    assert_refused(plane.create(overlay_body(*env)), status, needle)
    plane.assert_unharmed()


# -- the query's name -------------------------------------------------------------------------

@st.composite
def bad_container_names(draw: st.DrawFn) -> str:
    """?name= values Docker refuses: too short, odd characters, a bad first character."""
    base = draw(st.text(string.ascii_lowercase, min_size=2, max_size=30))
    kind = draw(st.sampled_from(["short", "odd-char", "leading", "long-odd"]))
    if kind == "short":
        return base[0]
    if kind == "odd-char":
        where = draw(st.integers(1, len(base) - 1))
        odd = draw(ODD_CHARACTERS.filter(lambda c: c not in (".", "..")))
        return base[:where] + odd + base[where:]
    if kind == "leading":
        return draw(st.sampled_from(["-", ".", "_", "//"])) + base
    return base * 100 + "/" + base


@EXAMPLES
@given(name=bad_container_names())
def test_odd_container_name_is_400_before_anything_is_made(plane: Plane, name: str) -> None:
    """An overlay create whose ?name= Docker would refuse is refused first: no sandbox, no
    network, no address is made for it."""
    reply = plane.create(overlay_body(VALID_ENV), query=f"?name={quote(name, safe='')}")
    assert_refused(reply, 400, "container name")
    plane.assert_unharmed()


# -- published ports (-p, -P, --expose) of hostile shape ---------------------------------------

PORT_TEXT = st.one_of(
    st.sampled_from(["", "0", "80", "8080", "65535", "65536", "1-65535", "8000-7999", "80/tcp",
                     "53/udp", "53/sctp", "80/TCP", "80/", "-1", " 80", "\u0663\u0660", "::1",
                     "[::]", "0.0.0.0", "127.0.0.1", "192.0.2.1", "999.1.1.1", "localhost"]),
    st.text(max_size=12))
PORT_VALUE = st.one_of(JSON_VALUES, PORT_TEXT, st.lists(st.one_of(
    JSON_VALUES, st.fixed_dictionaries({}, optional={"HostIp": st.one_of(PORT_TEXT, JSON_VALUES),
                                                     "HostPort": st.one_of(PORT_TEXT,
                                                                           JSON_VALUES)})),
    max_size=3))


@EXAMPLES
@given(fields=st.fixed_dictionaries({}, optional={
    "PortBindings": st.one_of(JSON_VALUES, st.dictionaries(PORT_TEXT, PORT_VALUE, max_size=3),
                              st.sampled_from([  # well-formed: made, or refused by the host
                                  {"80/tcp": [{"HostIp": "", "HostPort": ""}]},
                                  {"53/udp": [{"HostPort": "20000-20010"}]},
                                  {"80/tcp": [{"HostIp": "192.0.2.1", "HostPort": "8080"}]},
                                  {"80-81/tcp": [{"HostPort": "8080"}, {"HostPort": "8080"}]},
                              ])),
    "PublishAllPorts": JSON_VALUES,
    "ExposedPorts": st.one_of(JSON_VALUES, st.dictionaries(PORT_TEXT, JSON_VALUES, max_size=3)),
}))
def test_hostile_port_fields_get_a_4xx_or_a_container(plane: Plane,
                                                      fields: dict[str, Any]) -> None:
    """Whatever PortBindings, PublishAllPorts and ExposedPorts hold, an overlay create is made
    or refused with a Docker-shaped 4xx: never a 5xx, never a half-made container."""
    exposed = fields.pop("ExposedPorts", None)
    body = overlay_body(f"SOCKETPLANE_NETWORK={GOOD_NETWORK}", HostConfig=fields,
                        **({"ExposedPorts": exposed} if exposed is not None else {}))
    reply = plane.create(body)
    if reply.status != 201:
        assert 400 <= reply.status < 500, reply
        assert_refused(reply, reply.status)
    plane.assert_unharmed()


# -- inspect of containers whose io.powerplane.* labels anyone could have set ------------------

FORGED_PORTS = st.one_of(
    st.text(max_size=30), st.just("[" * 5000),
    st.sampled_from(['{"published":["1:1/tcp"],"exposed":["1/tcp"]}', '{"published":[5]}',
                     '{"published":["1-65535:1-65535/tcp","1-65535:1-65535/udp"]}',
                     '{"exposed":["1-65535/udp"]}', '{"published":["80:80/tcp"]}', "{}"]))


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.dictionaries(
    st.sampled_from(["io.powerplane.ip", "io.powerplane.cidr", "io.powerplane.gateway",
                     "io.powerplane.mac", "io.powerplane.network", "io.powerplane.sandbox",
                     "io.powerplane.host"]),
    st.one_of(st.text(max_size=30), st.just("10.0.0.1/" + "9" * 5000), st.just("/")),
    min_size=1).map(lambda labels: {"io.powerplane.ip": "10.9.9.9", **labels}),
       ports=st.none() | FORGED_PORTS)
def test_inspect_of_a_container_with_forged_labels_answers(plane: Plane, labels: dict[str, str],
                                                           ports: str | None) -> None:
    """docker inspect and docker ps through the proxy answer 200 whatever io.powerplane.*
    labels say, the ports label included."""
    if ports is not None:
        labels["io.powerplane.ports"] = ports
    made = rawhttp.request(plane.dockerd.socket, "POST", CREATE,
                           json.dumps({"Image": "busybox", "Labels": labels}).encode())
    assert made.status == 201, made
    container = made.json["Id"]
    try:
        reply = plane.send("GET", f"/v1.41/containers/{container}/json", content_type=None)
        assert reply.status == 200, reply
        assert reply.json["Id"] == container
        listed = plane.send("GET", "/v1.41/containers/json?all=1&filters="
                            + quote(json.dumps({"id": [container]})), content_type=None)
        assert listed.status == 200, listed
        assert [c["Id"] for c in listed.json] == [container]
    finally:
        rawhttp.request(plane.dockerd.socket, "DELETE", f"/v1.41/containers/{container}",
                        content_type=None)
    plane.assert_unharmed()


# -- garbage under serve's Consul prefix ------------------------------------------------------


def network_record(name: str, **changes: Any) -> bytes:
    record = {"name": name, "cidr": "10.90.0.0/24", "gateway": "10.90.0.1", "vni": 9000,
              "mtu": None, "created": 1.0, **changes}
    return json.dumps(record).encode()


# networks/<key>: records that are no network; none may reach IPAM or the data plane.
GARBAGE_NETWORKS: dict[str, bytes] = {
    "not-json": b"not json {",
    "array": b"[1, 2]",
    "number": b"42",
    "non-utf8": b"\xff\xfe\xfd",
    "wrong-types": json.dumps({"name": 5, "cidr": ["x"], "gateway": None, "vni": "5"}).encode(),
    "slash33": network_record("slash33", cidr="10.90.0.0/33"),
    "host-bits": network_record("host-bits", cidr="10.90.0.1/24"),
    "slash31": network_record("slash31", cidr="10.90.0.0/31", gateway="10.90.0.1"),
    "ipv6": network_record("ipv6", cidr="fd00::/64", gateway="fd00::1"),
    "bad-gateway": network_record("bad-gateway", gateway="banana"),
    "gateway-outside": network_record("gateway-outside", gateway="10.99.0.1"),
    "vni-zero": network_record("vni-zero", vni=0),
    "vni-huge": network_record("vni-huge", vni=2**40),
    "vni-text": network_record("vni-text", vni="9000"),
    "vni-true": network_record("vni-true", vni=True),
    "created-list": network_record("created-list", created=[1]),
    "renamed": network_record("someone-else"),
    "huge": network_record("huge", cidr="1" * 400_000),
    "ünïcödé": network_record("ünïcödé"),
    "with space": network_record("with space"),
    "nested/deeper": network_record("nested/deeper"),
}
GARBAGE: dict[str, bytes] = {
    **{f"networks/{key}": value for key, value in GARBAGE_NETWORKS.items()},
    f"addresses/{GOOD_NETWORK}/10.77.0.5": b"garbage",
    f"addresses/{GOOD_NETWORK}/10.77.0.6": json.dumps(
        {"container": 5, "created": "yesterday"}).encode(),
    f"addresses/{GOOD_NETWORK}/10.77.0.7": b"[1]",
    f"addresses/{GOOD_NETWORK}/not-an-ip": json.dumps(
        {"container": "c0", "host": "elsewhere", "mac": "02:42:00:00:00:00"}).encode(),
    "addresses/no-such-network/10.1.1.1": b"{}",
    "endpoints/c-garbage": b"zzz",
    "endpoints/c-types": json.dumps({"network": 5, "ip": "10.77.0.9"}).encode(),
    "endpoints/c-host-list": json.dumps(
        {"network": GOOD_NETWORK, "ip": "10.77.0.9", "host": [HOST_ID]}).encode(),
    "hosts/h-garbage": b"!!",
    "hosts/h-list": b"[1]",
    "hosts/h-no-ip": json.dumps({"hostname": "x"}).encode(),
    "hosts/h-bad-ip": json.dumps({"underlay_ip": "not-an-ip", "hostname": "x"}).encode(),
    "hosts/h-huge": json.dumps({"underlay_ip": "1" * 400_000}).encode(),
    "subnets/10.66.0.0/24": b"ghost",
    "subnets/10.67.0.0/24": b"\xff\xfe",
    "subnets/10.68.0.0/24": b"not-json",
    "meta/networks-version": b"banana",
    f"ipam/{GOOD_NETWORK}": b"\xff\xfe",
}
GOOD_ENDPOINT = ("endpoints/c-good", json.dumps(
    {"network": GOOD_NETWORK, "ip": "10.77.0.10", "mac": "02:42:0a:4d:00:0a",
     "host": "elsewhere", "port": "ovs-none", "sandbox": "s-none"}).encode())


@pytest.fixture(scope="module")
def garbage(plane: Plane) -> Iterator[list[str]]:
    """Every kind of garbage above planted under serve's prefix (and VNIs claimed by no network
    readable); the planted keys. Removed again after the module's last test."""
    taken = {int(key.rsplit("/", 1)[1]) for key in plane.kv_keys("vnis/")}
    ghosts = [vni for vni in range(256, 300) if vni not in taken][:3]
    planted = {**GARBAGE, **{f"vnis/{vni}": b"ghost" for vni in ghosts},
               GOOD_ENDPOINT[0]: GOOD_ENDPOINT[1]}
    small = {key: value for key, value in planted.items() if len(value) < 1000}
    plane.kv_put_many(small)
    for key, value in planted.items():
        if key not in small:
            plane.kv_put(key, value)
    plane.planted_addresses = {key for key in planted if key.startswith("addresses/")}
    try:
        yield [str(vni) for vni in ghosts]
    finally:
        plane.kv_delete_many(list(planted))
        plane.planted_addresses = set()


def assert_clean_cli(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr


INFO_OF_GARBAGE = ("not-json", "created-list", "huge")
BLOCKED_BY_GARBAGE: dict[str, tuple[tuple[str, ...], str]] = {
    "stale-subnet": (("network", "create", "stale", "10.66.0.0/24"),
                     f"{PREFIX}subnets/10.66.0.0/24 in Consul"),
    "stale-name": (("network", "create", "not-json", "10.57.0.0/24"),
                   f"{PREFIX}networks/not-json in Consul"),
    "rm-malformed": (("network", "rm", "created-list"),
                     f"malformed network record {PREFIX}networks/created-list"),
}


@pytest.fixture(scope="module")
def garbage_cli(plane: Plane, garbage: list[str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """The read commands, and creations the garbage blocks, run once (side by side: each
    command costs a Python start) with the garbage planted; results by case name."""
    status = ("status", "--json", "--docker", plane.dockerd.url, "--ovsdb", plane.ovs.db_url,
              "--bridge", "pphostile", "--host-id", HOST_ID, "--run-dir",
              str(plane.serve.run_dir))
    commands: dict[str, tuple[str, ...]] = {
        "list": ("network", "list"),
        "info-good": ("network", "info", GOOD_NETWORK, "--json"),
        "hosts": ("hosts", "--json"),
        "status": status,
        **{f"info {name}": ("network", "info", name) for name in INFO_OF_GARBAGE},
        **{name: args for name, (args, _) in BLOCKED_BY_GARBAGE.items()},
    }
    return plane.cli_side_by_side(commands)


def test_network_list_skips_garbage_with_a_log_line_each(
        garbage_cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """`network list` shows the readable networks and one warning per malformed record."""
    result = garbage_cli["list"]
    assert_clean_cli(result, 0)
    names = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert GOOD_NETWORK in names and not names & set(GARBAGE_NETWORKS), result.stdout
    warnings = [line for line in result.stderr.splitlines()
                if line.startswith("ignoring malformed network record")]
    assert len(warnings) == len(GARBAGE_NETWORKS), result.stderr
    assert all(len(line) < MESSAGE_MAX for line in warnings)


@pytest.mark.parametrize("name", INFO_OF_GARBAGE)
def test_network_info_of_garbage_is_one_clear_line(
        garbage_cli: dict[str, subprocess.CompletedProcess[str]], name: str) -> None:
    """`network info` of a malformed record: exit 1, one line naming the key and what is wrong."""
    result = garbage_cli[f"info {name}"]
    assert_clean_cli(result, 1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"powerplane: malformed network record {PREFIX}networks/{name}")
    assert len(lines[0]) < MESSAGE_MAX


def test_network_info_skips_garbage_addresses_and_endpoints(
        garbage_cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """`network info good` lists its readable addresses; each malformed one is a warning."""
    result = garbage_cli["info-good"]
    assert_clean_cli(result, 0)
    info = json.loads(result.stdout)
    assert [member["ip"] for member in info["endpoints"]] == ["not-an-ip"]
    assert result.stderr.count("ignoring malformed address record") == 3, result.stderr
    assert result.stderr.count("ignoring malformed endpoint record") == 3, result.stderr


def test_hosts_skips_garbage_with_a_log_line_each(
        garbage_cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """`powerplane hosts` lists this host; every malformed host record is one warning."""
    result = garbage_cli["hosts"]
    assert_clean_cli(result, 0)
    assert [host["host_id"] for host in json.loads(result.stdout)] == [HOST_ID]
    assert result.stderr.count("ignoring malformed host record") == 5, result.stderr


def test_status_reports_this_host_despite_garbage(
        garbage_cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """`powerplane status` passes every check; this host's malformed endpoint is a warning."""
    result = garbage_cli["status"]
    assert_clean_cli(result, 0)
    status = json.loads(result.stdout)
    assert status["ok"], status
    assert status["endpoints"] == []
    assert "ignoring malformed endpoint record 'c-host-list'" in result.stderr, result.stderr


@pytest.mark.parametrize("case", sorted(BLOCKED_BY_GARBAGE))
def test_cli_creation_blocked_by_garbage_says_which_key(
        garbage_cli: dict[str, subprocess.CompletedProcess[str]], case: str) -> None:
    """A name or subnet held by an unreadable record: one line naming the key, at once."""
    result = garbage_cli[case]
    assert_clean_cli(result, 1)
    # Warnings about the garbage come first; the error is one line of its own.
    errors = [line for line in result.stderr.splitlines() if line.startswith("powerplane: ")]
    assert len(errors) == 1 and BLOCKED_BY_GARBAGE[case][1] in errors[0], result.stderr


def test_network_create_goes_around_garbage_claims(plane: Plane, garbage: list[str]) -> None:
    """A damaged version counter and VNIs claimed by no network do not block a creation."""
    result = plane.cli("network", "create", "fresh2", "10.56.0.0/24")
    assert_clean_cli(result, 0)
    vni = result.stdout.split("VNI ")[1].split(",")[0].strip()
    assert vni not in garbage, (vni, garbage)
    assert_clean_cli(plane.cli("network", "rm", "fresh2"), 0)


@pytest.mark.parametrize(("env", "status", "needle"), [
    ("SOCKETPLANE_NETWORK=not-json", 400, f"malformed network record {PREFIX}networks/not-json"),
    ("SOCKETPLANE_NETWORK=non-utf8", 400, "malformed network record"),
    ("SOCKETPLANE_NETWORK=slash31", 400, "prefix /31 is out of range"),
    ("SOCKETPLANE_NETWORK=bad-gateway", 400, "invalid gateway 'banana'"),
    ("SOCKETPLANE_NETWORK=vni-huge", 400, "invalid VNI"),
    ("SOCKETPLANE_NETWORK=created-list", 400, "'created'"),
    ("SOCKETPLANE_NETWORK=renamed", 400, "names network 'someone-else'"),
    ("SOCKETPLANE_NETWORK=huge", 400, "malformed network record"),
    ("SOCKETPLANE_CIDR=10.66.0.0/24", 409, f"{PREFIX}subnets/10.66.0.0/24"),
    ("SOCKETPLANE_CIDR=10.67.0.0/24", 409, f"{PREFIX}subnets/10.67.0.0/24"),
    ("SOCKETPLANE_CIDR=10.68.0.0/24", 400, f"{PREFIX}networks/not-json"),
])
def test_overlay_create_on_garbage_is_a_clear_4xx(plane: Plane, garbage: list[str], env: str,
                                                  status: int, needle: str) -> None:
    """A create naming a network whose record (or subnet claim) is garbage: a 4xx naming it."""
    assert_refused(plane.create(overlay_body(env)), status, needle)
    plane.assert_unharmed()


def test_overlay_create_on_a_good_network_ignores_its_garbage(plane: Plane,
                                                              garbage: list[str]) -> None:
    """A damaged IPAM hint and garbage address records beside a good network: the create
    attaches (around the taken addresses) and removing it releases everything."""
    reply = plane.create(overlay_body(f"SOCKETPLANE_NETWORK={GOOD_NETWORK}"), keep=True)
    assert reply.status == 201, reply
    app_id = reply.json["Id"]
    inspect = plane.send("GET", f"/v1.41/containers/{app_id}/json", content_type=None)
    assert inspect.json["NetworkSettings"]["IPAddress"] not in (
        "10.77.0.5", "10.77.0.6", "10.77.0.7")
    removed = plane.send("DELETE", f"/v1.41/containers/{app_id}?force=1", content_type=None)
    assert removed.status == 204, removed
    plane.assert_unharmed()


def test_serve_rides_out_garbage_in_its_watches(plane: Plane, garbage: list[str]) -> None:
    """serve's host and network watches skip the garbage with warnings, never a traceback."""
    deadline = time.monotonic() + 20
    while "ignoring malformed host record" not in plane.serve.log():
        assert time.monotonic() < deadline, plane.serve.log()[-3000:]
        time.sleep(0.1)
    assert "ignoring malformed network record" in plane.serve.log()
    plane.log_start = 0
    plane.assert_unharmed()


# -- a bad adapters.yml stops serve with one line ---------------------------------------------

BAD_ADAPTERS_FILES: list[tuple[bytes, str]] = [
    (b"!!python/object/apply:os.system ['touch PWNED']\n", "could not determine a constructor"),
    (b"endpoints: {\xff\xfe}\n", "cannot read adapters file"),
    (b'endpoints:\n  "POST /*/containers/create": {pre: [ghost]}\n', "unknown adapter 'ghost'"),
]


def test_serve_with_a_bad_adapters_file_exits_with_one_line(tmp_path: Path) -> None:
    """Each bad adapters.yml: serve exits 1 with one line naming the file and the problem,
    before it starts anything (not even its status file)."""
    started = []
    for index, (content, needle) in enumerate(BAD_ADAPTERS_FILES):
        config = tmp_path / f"adapters{index}.yml"
        config.write_bytes(content.replace(b"PWNED", str(tmp_path / "pwned").encode()))
        started.append((subprocess.Popen(
            [POWERPLANE, "serve", "--adapters", str(config), "--consul", "127.0.0.1:1",
             "--listen", f"unix://{tmp_path}/s{index}.sock", "--ovsdb", f"unix:{tmp_path}/no-db",
             "--run-dir", str(tmp_path / f"run{index}"), "--docker", f"unix://{tmp_path}/no-d"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), config, needle,
            tmp_path / f"run{index}"))
    for process, config, needle, run_dir in started:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1, stderr
        assert not run_dir.exists(), f"{config}: serve started before refusing it"
        assert "Traceback" not in stderr, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"powerplane: {config}: ") and needle in last, stderr
    assert not (tmp_path / "pwned").exists()
