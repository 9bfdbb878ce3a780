"""The pure security group model: parsing the CLI's words, records, and the connection check."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter.errors import InvalidGroup
from adapter.groups import (
    ALLOWED_BY_RULE,
    ALLOWED_NO_GROUP,
    DENIED,
    UNREACHABLE,
    Group,
    GroupRule,
    Peer,
    check_connection,
    connection_key,
    parse_check_port,
    parse_group_names,
    parse_port_range,
    parse_source,
    referenced_groups,
)

NAMES = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,20}", fullmatch=True)


@pytest.mark.parametrize(("text", "names"), [
    ("", ()),
    ("web", ("web",)),
    ("web,admin", ("web", "admin")),
    (" web , admin ,", ("web", "admin")),
    ("web,web,admin,web", ("web", "admin")),
    (",,", ()),
])
def test_group_names_parse(text: str, names: tuple[str, ...]) -> None:
    assert parse_group_names(text) == names


@pytest.mark.parametrize("text", ["-web", "web,a b", "we/b", "x" * 65, "web,.hidden", "wéb"])
def test_bad_group_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidGroup, match="invalid group name"):
        parse_group_names(text)


@given(st.lists(NAMES, max_size=6))
def test_group_names_round_trip(names: list[str]) -> None:
    """Joined with commas and read back: the same names, each once, in first-seen order."""
    assert parse_group_names(",".join(names)) == tuple(dict.fromkeys(names))


@pytest.mark.parametrize(("text", "span"), [
    ("80", (80, 80)), ("1", (1, 1)), ("65535", (65535, 65535)), ("8000-8100", (8000, 8100)),
    (" 22 ", (22, 22)), ("5-5", (5, 5)),
])
def test_port_ranges_parse(text: str, span: tuple[int, int]) -> None:
    assert parse_port_range(text) == span


@pytest.mark.parametrize("text", ["0", "65536", "100-99", "http", "", "-", "80-", "-80",
                                  "1-2-3", "80.5", "0x50", "1-70000"])
def test_bad_port_ranges_are_refused(text: str) -> None:
    with pytest.raises(InvalidGroup, match="invalid port range"):
        parse_port_range(text)


@given(st.integers(1, 65535), st.integers(1, 65535))
def test_any_valid_range_parses_and_inverted_ones_do_not(low: int, high: int) -> None:
    if low <= high:
        assert parse_port_range(f"{low}-{high}") == (low, high)
    else:
        with pytest.raises(InvalidGroup):
            parse_port_range(f"{low}-{high}")


@pytest.mark.parametrize(("text", "source"), [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3/16", "10.1.0.0/16"),  # normalised to its network
    ("192.168.1.7", "192.168.1.7/32"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("group:web", "group:web"),
    ("network:prod", "network:prod"),
])
def test_sources_parse(text: str, source: str) -> None:
    assert parse_source(text) == source


@pytest.mark.parametrize(("text", "needle"), [
    ("10.0.0.0/33", "invalid source"), ("fd00::/64", "invalid source"),
    ("300.1.1.1", "invalid source"), ("web", "invalid source"), ("", "invalid source"),
    ("group:", "invalid group name"), ("group:-x", "invalid group name"),
    ("network:", "invalid network name"), ("network:a b", "invalid network name"),
    ("host:web", "invalid source"),
])
def test_bad_sources_are_refused(text: str, needle: str) -> None:
    with pytest.raises(InvalidGroup, match=needle):
        parse_source(text)


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_any_cidr_source_is_its_network(address: ipaddress.IPv4Address, prefix: int) -> None:
    expected = str(ipaddress.IPv4Network(f"{address}/{prefix}", strict=False))
    assert parse_source(f"{address}/{prefix}") == expected


@pytest.mark.parametrize(("proto", "port", "needle"), [
    ("sctp", None, "invalid protocol"),
    ("icmp", "80", "--port applies to tcp and udp"),
    ("any", "80", "--port applies to tcp and udp"),
    ("tcp", "0", "invalid port range"),
    ("tcp", "80", None),
    ("UDP", "53", None),
    ("any", None, None),
])
def test_rules_parse_or_say_what_is_wrong(proto: str, port: str | None,
                                          needle: str | None) -> None:
    if needle is None:
        rule = GroupRule.parse(proto, port, "10.0.0.0/8")
        assert rule.proto == proto.lower()
        assert GroupRule.from_json(rule.to_json()) == rule
    else:
        with pytest.raises(InvalidGroup, match=needle):
            GroupRule.parse(proto, port, "10.0.0.0/8")


@given(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535), st.integers(0, 100),
       st.one_of(NAMES.map(lambda n: f"group:{n}"), NAMES.map(lambda n: f"network:{n}"),
                 st.ip_addresses(v=4).map(str)))
def test_rules_and_groups_survive_their_records(proto: str, low: int, width: int,
                                                source: str) -> None:
    rule = GroupRule.parse(proto, f"{low}-{min(low + width, 65535)}", source)
    group = Group("web").with_rule(rule).with_rule(GroupRule.parse("icmp", None, "10.0.0.0/8"))
    assert Group.from_json("web", group.to_json()) == group


@pytest.mark.parametrize("record", [
    [], {"rules": {}}, {"rules": [5]}, {"rules": [{"proto": "tcp"}]},
    {"rules": [{"proto": "tcp", "source": "1.2.3.4", "ports": [90, 80]}]},
    {"rules": [{"proto": "tcp", "source": "1.2.3.4", "ports": [80, True]}]},
    {"rules": [{"proto": "gre", "source": "1.2.3.4"}]},
])
def test_damaged_records_are_value_errors(record: object) -> None:
    with pytest.raises(ValueError):
        Group.from_json("web", record)


def test_group_rules_are_a_set_in_order() -> None:
    ssh = GroupRule.parse("tcp", "22", "10.0.0.0/8")
    web = GroupRule.parse("tcp", "80", "group:lb")
    group = Group("g").with_rule(ssh).with_rule(web).with_rule(ssh)
    assert group.rules == (ssh, web)
    assert group.without_rule(ssh).rules == (web,)
    with pytest.raises(InvalidGroup, match="has no rule tcp/80 from group:lb"):
        Group("g").without_rule(web)
    assert referenced_groups([group, Group("x", (GroupRule.parse("any", None, "group:g"),))]) \
        == {"lb", "g"}


@pytest.mark.parametrize(("text", "parsed"), [
    ("80", ("tcp", 80)), ("80/tcp", ("tcp", 80)), ("53/udp", ("udp", 53)),
    ("icmp", ("icmp", None)), ("ICMP", ("icmp", None)), (" 443/TCP ", ("tcp", 443)),
])
def test_check_ports_parse(text: str, parsed: tuple[str, int | None]) -> None:
    assert parse_check_port(text) == parsed


@pytest.mark.parametrize("text", ["0", "70000", "80/sctp", "http", "80/", "/tcp", "icmp/1", ""])
def test_bad_check_ports_are_refused(text: str) -> None:
    with pytest.raises(InvalidGroup, match="invalid port"):
        parse_check_port(text)


# -- the connection check, as a table ---------------------------------------------------------

GROUPS = {g.name: g for g in (
    Group("web", (GroupRule.parse("tcp", "80", "0.0.0.0/0"),
                  GroupRule.parse("tcp", "8000-8100", "group:lb"),
                  GroupRule.parse("icmp", None, "network:ops"))),
    Group("db", (GroupRule.parse("tcp", "5432", "group:web"),
                 GroupRule.parse("udp", "53", "10.1.0.0/24"))),
    Group("admin", (GroupRule.parse("any", None, "10.9.0.7/32"),)),
    Group("closed"),
)}
CONNECTED = [connection_key("front", "ops")]

LB = Peer("10.1.0.5", "front", ("lb",))
WEB = Peer("10.1.0.10", "front", ("web",))
WEB_ADMIN = Peer("10.1.0.11", "front", ("web", "admin"))
DB = Peer("10.1.0.20", "front", ("db",))
PLAIN = Peer("10.1.0.30", "front")
CLOSED = Peer("10.1.0.40", "front", ("closed",))
GHOST = Peer("10.1.0.50", "front", ("gone",))
OPS = Peer("10.9.0.7", "ops")
OTHER = Peer("10.8.0.2", "back")


@pytest.mark.parametrize(("source", "destination", "port", "outcome", "group", "needle"), [
    # Different networks: only connected ones reach each other, groups or not.
    (OTHER, PLAIN, "80", UNREACHABLE, None, "not connected"),
    (OTHER, WEB, "80", UNREACHABLE, None, "network connect back front"),
    (PLAIN, OTHER, "icmp", UNREACHABLE, None, "different networks"),
    # No group: everything that reaches it.
    (WEB, PLAIN, "9999/udp", ALLOWED_NO_GROUP, None, "in no group"),
    (OPS, PLAIN, "icmp", ALLOWED_NO_GROUP, None, "in no group"),  # connected networks
    # A CIDR source.
    (PLAIN, WEB, "80", ALLOWED_BY_RULE, "web", "tcp/80 from 0.0.0.0/0"),
    (PLAIN, WEB, "80/udp", DENIED, None, "no rule of web allows udp/80"),
    (PLAIN, WEB, "81", DENIED, None, "allows tcp/81 from 10.1.0.30"),
    # A group source and a port range, edges included.
    (LB, WEB, "8000", ALLOWED_BY_RULE, "web", "8000-8100 from group:lb"),
    (LB, WEB, "8100/tcp", ALLOWED_BY_RULE, "web", "group:lb"),
    (LB, WEB, "8101", DENIED, None, "denied"),
    (PLAIN, WEB, "8050", DENIED, None, "denied"),
    (WEB, DB, "5432", ALLOWED_BY_RULE, "db", "group:web"),
    (WEB_ADMIN, DB, "5432", ALLOWED_BY_RULE, "db", "group:web"),
    (LB, DB, "5432", DENIED, None, "no rule of db"),
    (LB, DB, "53/udp", ALLOWED_BY_RULE, "db", "udp/53 from 10.1.0.0/24"),
    (LB, DB, "53", DENIED, None, "tcp/53"),
    # A network source, over a connection; icmp.
    (OPS, WEB, "icmp", ALLOWED_BY_RULE, "web", "icmp from network:ops"),
    (PLAIN, WEB, "icmp", DENIED, None, "allows icmp"),
    # "any" covers every protocol; the second group decides when the first does not.
    (OPS, WEB_ADMIN, "22", ALLOWED_BY_RULE, "admin", "any from 10.9.0.7/32"),
    (OPS, WEB_ADMIN, "icmp", ALLOWED_BY_RULE, "web", "network:ops"),
    (OPS, WEB_ADMIN, "80", ALLOWED_BY_RULE, "web", "tcp/80"),
    # A group without rules, and one that does not exist: nothing new is accepted.
    (PLAIN, CLOSED, "80", DENIED, None, "no rule of closed"),
    (PLAIN, GHOST, "80", DENIED, None, "group gone does not exist"),
])
def test_check_connection(source: Peer, destination: Peer, port: str, outcome: str,
                          group: str | None, needle: str) -> None:
    proto, number = parse_check_port(port)
    verdict = check_connection(source, destination, proto, number, groups=GROUPS,
                               connected=CONNECTED)
    assert (verdict.outcome, verdict.group) == (outcome, group), verdict
    assert verdict.allowed == (outcome in (ALLOWED_BY_RULE, ALLOWED_NO_GROUP))
    assert needle in verdict.reason, verdict.reason
    assert (verdict.rule is not None) == (outcome == ALLOWED_BY_RULE)


def test_connections_are_symmetric() -> None:
    verdict = check_connection(PLAIN, OPS, "tcp", 80, groups=GROUPS,
                               connected=[connection_key("ops", "front")])
    assert verdict.outcome == ALLOWED_NO_GROUP
