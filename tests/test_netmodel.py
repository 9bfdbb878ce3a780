"""The network domain model: CIDR parsing, validation messages, derived names and MACs."""

from __future__ import annotations

import re

import pytest

from adapter.errors import InvalidNetwork
from adapter.model import (
    AddressRecord,
    Endpoint,
    Host,
    Network,
    mac_for_ip,
    name_for_subnet,
    parse_aliases,
    parse_cidr,
    validate_name,
)


@pytest.mark.parametrize(
    ("value", "subnet", "gateway"),
    [
        ("10.0.6.1/24", "10.0.6.0/24", "10.0.6.1"),
        ("10.0.6.0/24", "10.0.6.0/24", "10.0.6.1"),
        ("10.0.6.77/24", "10.0.6.0/24", "10.0.6.1"),
        (" 10.6.0.0/16 ", "10.6.0.0/16", "10.6.0.1"),
        ("10.9.0.8/29", "10.9.0.8/29", "10.9.0.9"),
    ],
)
def test_cidr_parses_like_socketplane(value: str, subnet: str, gateway: str) -> None:
    """Host bits are ignored: the subnet is derived and the gateway is its first host."""
    parsed_subnet, parsed_gateway = parse_cidr(value)
    assert (str(parsed_subnet), str(parsed_gateway)) == (subnet, gateway)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.6.0", "expected ADDRESS/PREFIX"),
        ("10.0.6.0/33", "expected an IPv4"),
        ("banana/24", "expected an IPv4"),
        ("fd00::/64", "only IPv4"),
        ("10.0.0.0/30", "use /8 to /29"),
        ("10.0.0.0/7", "use /8 to /29"),
    ],
)
def test_bad_cidrs_say_what_is_allowed(value: str, message: str) -> None:
    """Every malformed CIDR is an InvalidNetwork naming the value and the rule."""
    with pytest.raises(InvalidNetwork, match=message) as caught:
        parse_cidr(value)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("name", ["foo4", "a", "Web_1.prod-2", "0net"])
def test_docker_like_names_are_accepted(name: str) -> None:
    """Names follow Docker's [a-zA-Z0-9][a-zA-Z0-9_.-]* rule."""
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "a b", "a/b", "é", "x" * 65])
def test_bad_names_are_rejected(name: str) -> None:
    """Empty, leading punctuation, spaces, slashes, non-ASCII and overlong names fail."""
    with pytest.raises(InvalidNetwork, match="invalid network name"):
        validate_name(name)


def test_derived_name_and_mac() -> None:
    """SOCKETPLANE_CIDR networks are named from the subnet; MACs are 02:42 plus the IPv4."""
    subnet, _ = parse_cidr("10.0.6.1/24")
    assert name_for_subnet(subnet) == "net-10.0.6.0-24"
    assert mac_for_ip("10.0.6.2") == "02:42:0a:00:06:02"
    assert mac_for_ip("192.168.255.254") == "02:42:c0:a8:ff:fe"


def test_network_build_validates_and_round_trips() -> None:
    """build() normalises the CIDR, checks gateway/VNI/MTU; JSON round-trips exactly."""
    network = Network.build("foo", "10.6.3.4/16", vni=300, mtu=1450, created=1.5)
    assert (network.cidr, network.gateway, network.size, network.capacity) == (
        "10.6.0.0/16", "10.6.0.1", 65534, 65533)
    assert Network.from_json(network.to_json()) == network
    assert network.to_json() == {"name": "foo", "cidr": "10.6.0.0/16", "gateway": "10.6.0.1",
                                 "vni": 300, "mtu": 1450, "internal": False, "created": 1.5}
    assert Network.build("g", "10.1.0.0/24", gateway="10.1.0.254", vni=1).gateway == "10.1.0.254"
    internal = Network.build("i", "10.7.0.0/24", vni=7, internal=True)
    assert Network.from_json(internal.to_json()).internal is True
    # A record from before networks could be internal has a way out.
    legacy = {k: v for k, v in internal.to_json().items() if k != "internal"}
    assert Network.from_json(legacy).internal is False
    for kwargs, message in [
        ({"gateway": "10.2.0.0"}, "host address inside"),
        ({"gateway": "10.3.0.1"}, "host address inside"),
        ({"vni": 0}, "invalid VNI 0"),
        ({"vni": 1 << 24}, "invalid VNI"),
        ({"mtu": 100}, "invalid MTU 100"),
    ]:
        with pytest.raises(InvalidNetwork, match=message):
            Network.build("bad", "10.2.0.0/24", **{"vni": 5, **kwargs})  # type: ignore[arg-type]


def test_assignable_skips_network_broadcast_and_gateway() -> None:
    """A /29 offers exactly five container addresses, in order from any start, wrapping."""
    network = Network.build("small", "10.9.0.0/29", vni=9)
    assert list(network.assignable()) == [f"10.9.0.{i}" for i in range(2, 7)]
    assert list(network.assignable(start=4)) == ["10.9.0.5", "10.9.0.6", "10.9.0.2",
                                                 "10.9.0.3", "10.9.0.4"]
    assert not network.is_assignable("10.9.0.1")
    assert not network.is_assignable("10.9.0.7")
    assert not network.is_assignable("10.9.0.8")
    assert network.is_assignable("10.9.0.6")


def test_records_round_trip_through_json() -> None:
    """Endpoint, Host and AddressRecord keep every field through their JSON form."""
    endpoint = Endpoint("c1", "foo", "10.6.0.2", "02:42:0a:06:00:02", "h1", "ovsc1", "s1")
    assert Endpoint.from_json("c1", endpoint.to_json()) == endpoint
    host = Host("h1", "192.168.50.11", "box", "0.1.0")
    assert Host.from_json("h1", host.to_json()) == host
    record = AddressRecord("10.6.0.2", "c1", "h1", "02:42:0a:06:00:02", 2.0)
    assert AddressRecord.from_json("10.6.0.2", record.to_json()) == record


GOOD_RECORD = {"name": "net", "cidr": "10.6.0.0/24", "gateway": "10.6.0.1", "vni": 7,
               "mtu": None, "created": 1.0}


@pytest.mark.parametrize(("change", "message"), [
    ({"created": [1]}, "'created' is an array"),
    ({"created": "yesterday"}, "'created' is a string"),
    ({"vni": True}, "'vni'"),
    ({"vni": 0}, "invalid VNI 0"),
    ({"cidr": "10.6.0.0/31"}, "prefix /31"),
    ({"cidr": "10.6.0.1/24"}, "not a subnet address"),
    ({"gateway": "10.7.0.1"}, "inside 10.6.0.0/24"),
    ({"name": "a/b"}, "invalid network name"),
    ({"mtu": 1}, "invalid MTU 1"),
    ({"cidr": "1" * 10_000}, "(10000 characters)"),
])
def test_damaged_network_record_is_a_value_error(change: dict[str, object], message: str) -> None:
    """A stored record is held to the creation rules; anything else is one ValueError."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Network.from_json({**GOOD_RECORD, **change})
    assert Network.from_json(GOOD_RECORD).cidr == "10.6.0.0/24"


@pytest.mark.parametrize("value", [None, "text", 5, [1], True])
def test_records_that_are_no_object_are_value_errors(value: object) -> None:
    """Every record kind refuses a JSON value that is not an object, with a ValueError."""
    for parse in (Network.from_json, lambda v: Endpoint.from_json("c", v),
                  lambda v: Host.from_json("h", v), lambda v: AddressRecord.from_json("1", v)):
        with pytest.raises(ValueError, match="expected a JSON object"):
            parse(value)


def test_host_underlay_must_be_an_address_or_empty() -> None:
    """Tunnels are built to a host's underlay address: one that is no IP address is refused."""
    assert Host.from_json("h", {"underlay_ip": ""}).underlay_ip == ""
    with pytest.raises(ValueError, match="not an IP address"):
        Host.from_json("h", {"underlay_ip": "not-an-ip"})


def test_endpoint_names_round_trip_and_old_records_parse() -> None:
    """An endpoint keeps its name, hostname and aliases; a record from before has none."""
    endpoint = Endpoint("c1", "n", "10.0.6.2", "02:42:0a:00:06:02", "h1", "ovsc1", "s1",
                        name="web", hostname="Web", aliases=("www", "front"))
    assert Endpoint.from_json("c1", endpoint.to_json()) == endpoint
    assert endpoint.dns_names == ("web", "www", "front")
    old = {"network": "n", "ip": "10.0.6.2", "mac": "m", "host": "h1", "port": "p",
           "sandbox": "s1"}
    parsed = Endpoint.from_json("c1", old)
    assert (parsed.name, parsed.hostname, parsed.aliases, parsed.dns_names) == ("", "", (), ())
    with pytest.raises(ValueError, match="aliases"):
        Endpoint.from_json("c1", {**old, "aliases": "www"})
    with pytest.raises(ValueError, match="aliases"):
        Endpoint.from_json("c1", {**old, "aliases": [1]})


@pytest.mark.parametrize("value, aliases", [
    ("www", ("www",)), ("a,B , c-1", ("a", "b", "c-1")), ("x,x,X", ("x",)),
    ("a" * 63, ("a" * 63,)),
])
def test_aliases_are_dns_labels(value: str, aliases: tuple[str, ...]) -> None:
    assert parse_aliases(value) == aliases


@pytest.mark.parametrize("value", ["", "a,", "-a", "a-", "a_b", "a.b", "a" * 64, "a b",
                                   "é"])
def test_bad_aliases_are_refused(value: str) -> None:
    with pytest.raises(InvalidNetwork, match="SOCKETPLANE_ALIASES"):
        parse_aliases(value)
