"""Unit tests of published ports: a create's -p/-P/--expose parsed, the label, Docker's views."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.errors import BadRequest
from adapter.network.ports import (
    PORTS_MAX,
    PortBinding,
    PortRequest,
    PublishedPorts,
    RequestedBinding,
    image_exposed_ports,
)


def body(port_bindings: Any = None, exposed: Any = None, publish_all: Any = False
         ) -> dict[str, Any]:
    return {"Image": "busybox", "ExposedPorts": exposed,
            "HostConfig": {"PortBindings": port_bindings, "PublishAllPorts": publish_all}}


# What docker 28's CLI sends for each flag (recorded from `docker create` against a fake daemon).
@pytest.mark.parametrize(("flags", "sent", "bindings"), [
    ("-p 8080:80", body({"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}, {"80/tcp": {}}),
     [RequestedBinding("tcp", "", (8080, 8080), 80)]),
    ("-p 80", body({"80/tcp": [{"HostIp": "", "HostPort": ""}]}, {"80/tcp": {}}),
     [RequestedBinding("tcp", "", None, 80)]),
    ("-p 127.0.0.1::80/udp", body({"80/udp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
                                  {"80/udp": {}}),
     [RequestedBinding("udp", "127.0.0.1", None, 80)]),
    ("-p 8000-8010:80", body({"80/tcp": [{"HostIp": "", "HostPort": "8000-8010"}]},
                             {"80/tcp": {}}),
     [RequestedBinding("tcp", "", (8000, 8010), 80)]),
    ("-p 18100-18102:80-82",
     body({f"{80 + i}/tcp": [{"HostIp": "", "HostPort": str(18100 + i)}] for i in range(3)},
          {"80/tcp": {}, "81/tcp": {}, "82/tcp": {}}),
     [RequestedBinding("tcp", "", (18100 + i, 18100 + i), 80 + i) for i in range(3)]),
    ("-p 0.0.0.0:8080:80", body({"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}),
     [RequestedBinding("tcp", "", (8080, 8080), 80)]),
])
def test_what_the_cli_sends_is_read(flags: str, sent: dict[str, Any],
                                    bindings: list[RequestedBinding]) -> None:
    """Each `docker run` port flag becomes the bindings Docker would make of it."""
    request = PortRequest.parse(sent)
    assert list(request.bindings) == bindings, flags
    assert request.publishes and not request.publish_all


def test_publish_all_gives_every_exposed_port_without_a_binding_a_free_port() -> None:
    """-P --expose 80: port 80 (and what the image exposes) gets any free host port; a port
    with a binding of its own keeps it."""
    request = PortRequest.parse(body({"81/tcp": [{"HostPort": "8081"}]},
                                     {"80/tcp": {}, "81/tcp": {}}, True))
    assert request.publishes and request.publish_all
    bindings, exposed = request.wanted({(443, "tcp"), (53, "udp")})
    assert bindings == (RequestedBinding("tcp", "", (8081, 8081), 81),
                        RequestedBinding("tcp", "", None, 80),
                        RequestedBinding("tcp", "", None, 443),
                        RequestedBinding("udp", "", None, 53))
    assert exposed == {(80, "tcp"), (81, "tcp"), (443, "tcp"), (53, "udp")}
    # Without -P the image's ports stay unpublished.
    plain = PortRequest.parse(body(None, {"80/tcp": {}}))
    assert plain.wanted({(443, "tcp")}) == ((), frozenset({(80, "tcp")}))
    assert not plain.publishes


def test_api_forms_the_cli_never_sends() -> None:
    """A key without protocol is tcp; a key range maps onto a host range port by port or
    takes free ports; HostPort "0" is any free port (Docker's reading); null and [] bind
    nothing but expose."""
    request = PortRequest.parse(body({
        "80": [{"HostPort": "0"}],
        "90-91/UDP": [{"HostPort": "9090-9091"}, {"HostIp": "10.1.2.3"}],
        "100/tcp": None, "101/tcp": [],
    }))
    assert request.bindings == (
        RequestedBinding("tcp", "", None, 80),
        RequestedBinding("udp", "", (9090, 9090), 90),
        RequestedBinding("udp", "", (9091, 9091), 91),
        RequestedBinding("udp", "10.1.2.3", None, 90),
        RequestedBinding("udp", "10.1.2.3", None, 91),
    )
    assert request.exposed == {(80, "tcp"), (90, "udp"), (91, "udp"), (100, "tcp"),
                               (101, "tcp")}


@pytest.mark.parametrize(("sent", "needles"), [
    (body({"53/sctp": [{"HostPort": "53"}]}), ("sctp is not supported on overlay networks",)),
    (body(None, {"53/sctp": {}}), ("sctp",)),
    (body({"80/tcp": [{"HostIp": "::1", "HostPort": "8080"}]}), ("IPv6", "::1")),
    (body({"80/tcp": [{"HostIp": "[::]", "HostPort": "8080"}]}), ("IPv6",)),
    (body({"80/tcp": [{"HostIp": "localhost", "HostPort": "8080"}]}), ("invalid host IP",)),
    (body({"80/tcp": [{"HostIp": "010.0.0.1", "HostPort": "8080"}]}), ("invalid host IP",)),
    (body({"0/tcp": [{"HostPort": "8080"}]}), ("invalid port '0/tcp'", "1 to 65535")),
    (body({"65536/tcp": []}), ("invalid port",)),
    (body({"80/icmp": []}), ("invalid protocol",)),
    (body({"80/": []}), ("invalid protocol",)),
    (body({"http": []}), ("invalid port 'http'",)),
    (body({"82-80/tcp": []}), ("invalid port",)),
    (body({"\u0663\u0660/tcp": []}), ("invalid port",)),
    (body({"80/tcp": [{"HostPort": "65536"}]}), ("HostPort", "invalid port")),
    (body({"80/tcp": [{"HostPort": "80-"}]}), ("HostPort", "invalid host port")),
    (body({"80/tcp": [{"HostPort": " 8080"}]}), ("HostPort", "invalid host port")),
    (body({"80/tcp": [{"HostPort": 8080}]}), ("HostPort must be a string, got a number",)),
    (body({"80/tcp": [{"HostIp": 0}]}), ("HostIp must be a string",)),
    (body({"80/tcp": ["8080"]}), ("[0] must be an object", "a string")),
    (body({"80/tcp": {"HostPort": "8080"}}), ("must be an array of bindings", "an object")),
    (body({"80-82/tcp": [{"HostPort": "8080"}]}), ("1 ports for 3 container ports",)),
    (body({"80-82/tcp": [{"HostPort": "8080-8081"}]}), ("2 ports for 3",)),
    (body([["80/tcp", "8080"]]), ("HostConfig.PortBindings must be an object", "an array")),
    (body(None, ["80/tcp"]), ("ExposedPorts must be an object",)),
    (body(None, None, "yes"), ("PublishAllPorts must be a boolean", "a string")),
    (body(None, None, 1), ("PublishAllPorts must be a boolean", "a number")),
    (body(None, {f"{'0' * i}1-65535/tcp": {} for i in range(1, 4)}), ("too many",)),
])
def test_bad_ports_are_a_400_naming_the_problem(sent: dict[str, Any],
                                                needles: tuple[str, ...]) -> None:
    """Each wrong value the API can carry: a 400 whose message names the field and the fault."""
    with pytest.raises(BadRequest) as refused:
        PortRequest.parse(sent)
    assert refused.value.status == 400
    for needle in needles:
        assert needle in refused.value.message, refused.value.message


def test_the_whole_port_space_is_accepted_once() -> None:
    """Every port of both protocols is the most a create can name; one more key is too many."""
    every = {"1-65535/tcp": {}, "1-65535/udp": {}}
    assert len(PortRequest.parse(body(None, every)).exposed) == PORTS_MAX
    with pytest.raises(BadRequest, match="too many"):
        PortRequest.parse(body(None, {**every, "80": {}}))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=12)
    | st.sampled_from(["80/tcp", "8080", "1-65535", "80-82/udp", "::1", "0.0.0.0", "0"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["HostIp", "HostPort"]), inner,
                      max_size=3), max_leaves=10)
PORT_KEYS = st.text(alphabet="0123456789-/tcpudsTCP\u0663 ", max_size=12)


@settings(max_examples=400, deadline=None)
@given(port_bindings=JSON | st.dictionaries(PORT_KEYS, JSON, max_size=4),
       exposed=JSON | st.dictionaries(PORT_KEYS, JSON, max_size=4), publish_all=JSON)
def test_hostile_port_fields_are_parsed_or_a_400(port_bindings: Any, exposed: Any,
                                                 publish_all: Any) -> None:
    """Whatever the three fields hold, parsing gives a request or a BadRequest, nothing else."""
    try:
        request = PortRequest.parse(body(port_bindings, exposed, publish_all))
    except BadRequest as exc:
        assert exc.status == 400 and exc.message
        return
    for binding in request.bindings:
        assert binding.proto in ("tcp", "udp") and 1 <= binding.container_port <= 65535


# -- the label ------------------------------------------------------------------------------

BINDINGS = st.builds(PortBinding, st.sampled_from(["tcp", "udp"]),
                     st.sampled_from(["", "127.0.0.1", "192.168.50.11"]),
                     st.integers(1, 65535), st.integers(1, 65535))
EXPOSED = st.tuples(st.integers(1, 65535), st.sampled_from(["tcp", "udp"]))


@given(bindings=st.lists(BINDINGS, max_size=30, unique=True),
       exposed=st.frozensets(EXPOSED, max_size=30))
def test_the_label_reads_back_what_was_written(bindings: list[PortBinding],
                                               exposed: frozenset[tuple[int, str]]) -> None:
    """Any bindings and exposed ports survive encode and decode unchanged."""
    ports = PublishedPorts(tuple(bindings), exposed)
    assert PublishedPorts.decode(ports.encode()) == ports


def test_the_label_is_docker_run_notation_with_runs() -> None:
    """Consecutive ports run together; an address is written only when it is not every one."""
    ports = PublishedPorts(
        (*(PortBinding("tcp", "", 18100 + i, 80 + i) for i in range(3)),
         PortBinding("udp", "127.0.0.1", 5353, 53), PortBinding("tcp", "", 9000, 9000)),
        frozenset({(80, "tcp"), (81, "tcp"), (82, "tcp"), (53, "udp"), (9000, "tcp")}))
    assert json.loads(ports.encode()) == {
        "published": ["9000:9000/tcp", "18100-18102:80-82/tcp", "127.0.0.1:5353:53/udp"],
        "exposed": ["80-82/tcp", "9000/tcp", "53/udp"],
    }
    assert " " not in ports.encode()
    assert PublishedPorts.decode('{"published":["0.0.0.0:80:80/tcp"]}').bindings == (
        PortBinding("tcp", "", 80, 80),)


@pytest.mark.parametrize("text", [
    "", "x", "[]", '"80/tcp"', "{", '{"published": "80:80/tcp"}', '{"published": [80]}',
    '{"published": ["80/tcp"]}', '{"published": ["0:80/tcp"]}', '{"published": ["80:80/sctp"]}',
    '{"published": ["::1:80:80/tcp"]}', '{"published": ["1.2.3.999:80:80/tcp"]}',
    '{"published": ["80-81:80/tcp"]}', '{"published": ["81-80:81-80/tcp"]}',
    '{"exposed": ["80"]}', '{"exposed": ["65536/tcp"]}', '{"exposed": {"80/tcp": {}}}',
    '{"published": ["1-65535:1-65535/tcp", "1-65535:1-65535/udp", "1:1/tcp"]}',
    '{"exposed": ' + json.dumps(["1-65535/tcp"] * 1000) + "}",
    "[" * 100_000,
])
def test_a_malformed_label_is_a_value_error(text: str) -> None:
    """Anyone can set labels: what is not ours is refused, quickly, never half-read."""
    with pytest.raises(ValueError):
        PublishedPorts.decode(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60) | JSON.map(json.dumps))
def test_any_label_text_decodes_or_is_a_value_error(text: str) -> None:
    """Random text and random JSON: a value or a ValueError, no other exception."""
    with contextlib.suppress(ValueError):
        PublishedPorts.decode(text)


# -- what Docker shows ----------------------------------------------------------------------

SHOWN = PublishedPorts(
    (PortBinding("tcp", "", 18080, 80), PortBinding("udp", "127.0.0.1", 5353, 53)),
    frozenset({(80, "tcp"), (53, "udp"), (9000, "tcp")}))


def test_inspect_views() -> None:
    """HostConfig.PortBindings as given, Config.ExposedPorts, and NetworkSettings.Ports with
    0.0.0.0 for every address and null for a port exposed only: what `docker port` reads."""
    assert SHOWN.port_bindings() == {
        "80/tcp": [{"HostIp": "", "HostPort": "18080"}],
        "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}]}
    assert SHOWN.exposed_ports() == {"80/tcp": {}, "9000/tcp": {}, "53/udp": {}}
    assert SHOWN.network_ports() == {
        "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "18080"}], "9000/tcp": None,
        "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}]}


def test_list_view() -> None:
    """A listing's Ports: published ones with IP and PublicPort, exposed ones without."""
    assert SHOWN.listed_ports() == [
        {"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 18080, "Type": "tcp"},
        {"IP": "127.0.0.1", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
        {"PrivatePort": 9000, "Type": "tcp"}]


def test_an_image_config_gives_its_exposed_ports_and_skips_what_cannot_be_published() -> None:
    """-P publishes what an image exposes; sctp or garbage in its config is left out."""
    assert image_exposed_ports({"ExposedPorts": {"80/tcp": {}, "53/sctp": {}, "x": {},
                                                 "53/udp": {}}}) == {(80, "tcp"), (53, "udp")}
    assert image_exposed_ports(None) == frozenset()
    assert image_exposed_ports({"ExposedPorts": ["80/tcp"]}) == frozenset()


def test_collisions_follow_dockers_rule() -> None:
    """Every address collides with any address of the same port; two addresses do not."""
    every, local = PortBinding("tcp", "", 80, 1), PortBinding("tcp", "127.0.0.1", 80, 2)
    other = PortBinding("tcp", "10.0.0.1", 80, 3)
    assert every.collides(local) and local.collides(every) and local.collides(local)
    assert not local.collides(other)
    assert not every.collides(PortBinding("udp", "", 80, 1))
    assert not every.collides(PortBinding("tcp", "", 81, 1))
