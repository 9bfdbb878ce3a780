"""The firewall's rendering, without a kernel: the batch a ruleset becomes and its fingerprint.

What the rules do to packets is tested on a real kernel in tests/test_firewall.py; these pin
down the parts that need none: one batch that replaces the table, the elements of each set,
the order that makes the right rule win, a fingerprint that depends on the content only, and
refusals of a ruleset the kernel would reject or misread.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapter.dataplane.firewall import (
    FINGERPRINT_CHAIN,
    FloatingAddress,
    GatewayRule,
    PublishedPort,
    Rendered,
    Ruleset,
    render,
    summarize,
)
from adapter.errors import DataPlaneError

GW_A = GatewayRule("gwa", "10.0.6.0/24", "10.0.6.1", egress=True)
GW_B = GatewayRule("gwb", "10.0.7.0/24", "10.0.7.1", egress=False)
ANY_80 = PublishedPort("tcp", "", 80, "10.0.6.2", 8080)
ON_80 = PublishedPort("tcp", "192.0.2.1", 80, "10.0.6.3", 80)
UDP_53 = PublishedPort("udp", "", 53, "10.0.6.2", 53)
FLOAT = FloatingAddress("192.0.2.10", "10.0.6.2")
FULL = Ruleset((GW_A, GW_B), (ANY_80, ON_80, UDP_53), (FLOAT,))


def rendered(ruleset: Ruleset = FULL, table: str = "powerplane") -> Rendered:
    result = render(table, ruleset)
    assert result is not None
    return result


def added(result: Rendered, kind: str) -> list[dict[str, Any]]:
    return [command["add"][kind] for command in result.commands
            if kind in command.get("add", {})]


def elements(result: Rendered, name: str) -> list[Any]:
    found = [s for s in added(result, "set") + added(result, "map") if s["name"] == name]
    assert len(found) == 1
    return list(found[0].get("elem", []))


def rules(result: Rendered, chain: str) -> list[dict[str, Any]]:
    return [rule for rule in added(result, "rule") if rule["chain"] == chain]


def test_an_empty_ruleset_renders_nothing() -> None:
    """No gateways, ports or addresses: no table at all (apply deletes it)."""
    assert render("powerplane", Ruleset()) is None


def test_the_table_is_replaced_in_one_batch() -> None:
    """add, delete, add the table, then its contents, all family inet, all in our table."""
    result = rendered()
    table = {"family": "inet", "name": "powerplane"}
    assert list(result.commands[:3]) == [{"add": {"table": table}}, {"delete": {"table": table}},
                                         {"add": {"table": table}}]
    for command in result.commands[3:]:
        (verb, body), = command.items()
        (_, obj), = body.items()
        assert verb == "add" and obj["family"] == "inet" and obj["table"] == "powerplane"


def test_base_chains_accept_by_default() -> None:
    """Every base chain has policy accept: other tables and the host's firewall keep working."""
    base = [chain for chain in added(rendered(), "chain") if "hook" in chain]
    assert {chain["name"] for chain in base} == {"guard", "input", "forward", "prerouting",
                                                 "output", "postrouting"}
    assert {chain["policy"] for chain in base} == {"accept"}


def test_sets_hold_each_network_once_and_only_egress_networks_go_out() -> None:
    """Internal networks are gateways with subnets but neither egress gateways nor subnets."""
    result = rendered()
    assert elements(result, "gateways") == ["gwa", "gwb"]
    assert elements(result, "egress_gateways") == ["gwa"]
    assert elements(result, "subnets") == [{"prefix": {"addr": "10.0.6.0", "len": 24}},
                                           {"prefix": {"addr": "10.0.7.0", "len": 24}}]
    assert elements(result, "egress_subnets") == [{"prefix": {"addr": "10.0.6.0", "len": 24}}]
    assert elements(result, "sources") == [
        {"concat": ["gwa", {"prefix": {"addr": "10.0.6.0", "len": 24}}]},
        {"concat": ["gwb", {"prefix": {"addr": "10.0.7.0", "len": 24}}]}]
    assert elements(result, "floating_in") == [["192.0.2.10", "10.0.6.2"]]
    assert elements(result, "floating_out") == [["10.0.6.2", "192.0.2.10"]]


def test_empty_sets_have_no_element_list() -> None:
    """A ruleset without internal networks or floating addresses still declares every set."""
    result = rendered(Ruleset((GW_B,)))
    assert elements(result, "egress_gateways") == []
    assert elements(result, "floating_in") == []
    assert result.summary.elements["floating_in"] == 0


def test_dnat_order_floating_then_specific_address_then_any() -> None:
    """A floating address wins over everything, a host address over "every address"."""
    comments = [rule["comment"] for rule in rules(rendered(), "dnat")]
    assert comments == ["floating addresses", "published tcp 192.0.2.1:80",
                        "published tcp *:80", "published udp *:53"]
    specific, anywhere, udp = rules(rendered(), "dnat")[1:]
    assert specific["expr"][-1] == {"dnat": {"family": "ip", "addr": "10.0.6.3", "port": 80}}
    assert anywhere["expr"][0]["match"]["left"] == {"fib": {"result": "type",
                                                            "flags": ["daddr"]}}
    assert udp["expr"][1]["match"]["left"] == {"payload": {"protocol": "udp",
                                                           "field": "dport"}}


def test_floating_snat_comes_before_the_masquerade() -> None:
    """The first NAT statement that matches decides, so the floating address must be first."""
    kinds = [next(iter(rule["expr"][-1])) for rule in rules(rendered(), "postrouting")]
    assert kinds == ["return", "snat", "masquerade"]


def test_the_fingerprint_ignores_order_and_repetition() -> None:
    """The same content in another order, or with repeats, is the same ruleset."""
    shuffled = Ruleset((GW_B, GW_A, GW_B), (UDP_53, ON_80, ANY_80, UDP_53), (FLOAT, FLOAT))
    assert rendered(shuffled) == rendered()


@pytest.mark.parametrize("other", [
    Ruleset((GW_A, GatewayRule("gwb", "10.0.7.0/24", "10.0.7.1", egress=True)),
            FULL.published, FULL.floating),
    Ruleset(FULL.gateways, (ANY_80, ON_80), FULL.floating),
    Ruleset(FULL.gateways, (ANY_80, ON_80, PublishedPort("udp", "", 53, "10.0.6.2", 54)),
            FULL.floating),
    Ruleset(FULL.gateways, FULL.published, (FloatingAddress("192.0.2.11", "10.0.6.2"),)),
    Ruleset(FULL.gateways, FULL.published),
])
def test_any_change_changes_the_fingerprint(other: Ruleset) -> None:
    assert rendered(other).summary.fingerprint != rendered().summary.fingerprint


def test_the_fingerprint_names_the_table() -> None:
    """Two tables with the same content are still two different batches."""
    assert rendered(table="a").summary.fingerprint != rendered(table="b").summary.fingerprint


def test_the_fingerprint_is_the_comment_of_the_fingerprint_rule() -> None:
    result = rendered()
    (rule,) = rules(result, FINGERPRINT_CHAIN)
    assert rule["comment"] == result.summary.fingerprint
    assert result.summary.fingerprint.startswith("ruleset sha256:")


def test_summary_of_the_rendered_objects_is_the_expected_summary() -> None:
    """What the kernel lists (the same objects, without the add verbs) summarizes to exactly
    what apply compares with; a missing rule or element does not."""
    result = rendered()
    listed = [dict(command["add"]) for command in result.commands[2:]]
    assert summarize(listed) == result.summary
    without_rule = [item for item in listed if item.get("rule", {}).get("chain") != "input"]
    assert summarize(without_rule) != result.summary
    emptied = [{"set": {**item["set"], "elem": []}} if item.get("set", {}).get("name") ==
               "gateways" else item for item in listed]
    assert summarize(emptied) != result.summary


@pytest.mark.parametrize(("ruleset", "message"), [
    (Ruleset((GW_A, GatewayRule("gwc", "10.0.6.128/25", "10.0.6.129", True))), "overlaps"),
    (Ruleset((GW_A, GatewayRule("gwa", "10.0.8.0/24", "10.0.8.1", True))), "two gateway rules"),
    (Ruleset((GatewayRule("a" * 16, "10.0.8.0/24", "10.0.8.1", True),)), "interface name"),
    (Ruleset((GatewayRule("gw c", "10.0.8.0/24", "10.0.8.1", True),)), "interface name"),
    (Ruleset((GatewayRule("gwc", "10.0.8.1/24", "10.0.8.1", True),)), "IPv4 network"),
    (Ruleset((GatewayRule("gwc", "fd00::/64", "fd00::1", True),)), "IPv4 network"),
    (Ruleset((GatewayRule("gwc", "10.0.8.0/24", "10.0.9.1", True),)), "outside"),
    (Ruleset(published=(PublishedPort("sctp", "", 80, "10.0.6.2", 80),)), "protocol"),
    (Ruleset(published=(PublishedPort("tcp", "", 0, "10.0.6.2", 80),)), "out of range"),
    (Ruleset(published=(PublishedPort("tcp", "", 80, "10.0.6.2", 65536),)), "out of range"),
    (Ruleset(published=(PublishedPort("tcp", "host", 80, "10.0.6.2", 80),)), "IPv4 address"),
    (Ruleset(published=(ANY_80, PublishedPort("tcp", "", 80, "10.0.6.9", 80))),
     "published twice"),
    (Ruleset(floating=(FLOAT, FloatingAddress("192.0.2.10", "10.0.6.3"))), "conflicts"),
    (Ruleset(floating=(FLOAT, FloatingAddress("192.0.2.11", "10.0.6.2"))), "conflicts"),
])
def test_a_ruleset_the_kernel_would_refuse_or_misread_is_refused(
    ruleset: Ruleset, message: str
) -> None:
    """Refused before anything reaches the kernel, naming the offending entry."""
    with pytest.raises(DataPlaneError, match=message):
        render("powerplane", ruleset)


def test_every_overlay_and_the_container_ports_are_never_a_way_out() -> None:
    """Subnets of networks with no gateway here are dropped like the gateways' own, and the
    container ports' wildcard guards the host stack; both only with a gateway to protect."""

    gateway = GatewayRule("gw-red", "10.71.0.0/24", "10.71.0.1", True)
    rendered = render("t", Ruleset((gateway,), overlays=("10.72.0.0/24", "10.71.0.0/24"),
                                   container_ports="ovs*"))
    assert rendered is not None
    text = json.dumps(rendered.commands)
    assert rendered.summary.elements["subnets"] == 2
    assert '"right": "ovs*"' in text and "container ports belong to the switch" in text
    assert "not even to a network with no gateway on this host" in text
    assert render("t", Ruleset(overlays=("10.72.0.0/24",), container_ports="ovs*")) is None
