"""The flow tables rendered for port security and groups (pure; the lab tests enforce them)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from adapter.dataplane.flows import (
    BASE,
    GROUP,
    PORT,
    ROUTE,
    Allow,
    FlowPort,
    RemoteEndpoint,
    cookie,
    is_ours,
    port_masks,
    render,
)
from adapter.groups import Group, GroupRule
from adapter.model import Endpoint, Network, router_mac
from adapter.network.security import compile_groups


def blocks(masks: list[tuple[int, int]]) -> list[range]:
    """The ports each value/mask pair matches, as ranges (a prefix mask matches a block)."""
    found = []
    for value, mask in masks:
        size = (~mask & 0xFFFF) + 1
        assert value & ~mask & 0xFFFF == 0, "value has bits under its mask"
        assert mask == 0xFFFF & ~(size - 1), "not a prefix mask"
        found.append(range(value, value + size))
    return found


@given(st.integers(1, 65535), st.integers(0, 3000))
def test_port_masks_match_exactly_the_range(low: int, span: int) -> None:
    high = min(65535, low + span)
    masks = port_masks(low, high)
    ports = sorted(port for block in blocks(masks) for port in block)
    assert ports == list(range(low, high + 1))  # every port once, none outside
    # Never more pairs than two per bit of a port number: the flows stay few.
    assert len(masks) <= 30


def test_port_masks_known_cases() -> None:
    assert port_masks(80, 80) == [(80, 0xFFFF)]
    assert port_masks(8000, 8007) == [(8000, 0xFFF8)]
    assert port_masks(1, 65535)[-1] == (32768, 0x8000)


def test_cookies_tell_owner_and_kind_apart() -> None:
    assert cookie(PORT, "ovsa") != cookie(PORT, "ovsb") != cookie(GROUP, "ovsa")
    assert all(is_ours(cookie(kind, "x")) for kind in (BASE, PORT, GROUP))
    assert not is_ours(0) and not is_ours(0x1234)


WEB = FlowPort("ovsweb", 7, "02:00:0a:00:06:02", "10.0.6.2", 3, ("web",))
OPEN = FlowPort("ovsopen", 8, "02:00:0a:00:06:03", "10.0.6.3", 3)


def test_every_port_gets_port_security_and_only_guarded_ones_tracking() -> None:
    flows = render([WEB, OPEN], {})
    for port in (WEB, OPEN):
        mine = [f for f in flows if f.startswith(f"cookie={cookie(PORT, port.name):#x},")]
        assert any(f"in_port={port.ofport},dl_src={port.mac},ip,nw_src={port.ip}," in f
                   for f in mine)
        assert any(f"arp_spa={port.ip},arp_sha={port.mac}" in f for f in mine)
        assert any(f"priority=90,in_port={port.ofport},actions=drop" in f for f in mine)
    assert not any("ct(" in f and OPEN.mac in f for f in flows)
    assert any(f"ip,dl_dst={WEB.mac},actions=ct(zone=3,table=2)" in f for f in flows)
    # No group rules known: nothing new gets in (closed, not open).
    assert any(f"ct_state=+trk+new,ip,dl_dst={WEB.mac},actions=drop" in f for f in flows)
    assert not any(f.startswith(f"cookie={cookie(GROUP, 'web'):#x}") for f in flows)


def test_group_rules_become_flows_owned_by_the_group() -> None:
    allows = {"web": (Allow("web", "tcp", (80, 81), ("10.0.7.0/24", "10.0.8.5/32")),
                      Allow("web", "icmp", None, ("10.0.6.0/24",)))}
    flows = render([WEB], allows)
    group_flows = [f for f in flows if f.startswith(f"cookie={cookie(GROUP, 'web'):#x},")]
    assert len(group_flows) == 3  # 80-81 is one masked match, times 2 sources; icmp 1
    assert any(f"tcp,tp_dst=0x50/0xfffe,dl_dst={WEB.mac},nw_src=10.0.8.5/32,"
               "actions=ct(commit,zone=3),NORMAL" in f for f in group_flows)
    assert any(f"icmp,dl_dst={WEB.mac},nw_src=10.0.6.0/24" in f for f in group_flows)


def test_the_same_allow_from_two_groups_is_one_flow() -> None:
    both = FlowPort("ovsweb", 7, "02:00:0a:00:06:02", "10.0.6.2", 3, ("a", "b"))
    same = Allow("a", "udp", (53, 53), ("10.0.0.0/8",))
    flows = render([both], {"a": (same,), "b": (Allow("b", "udp", (53, 53), ("10.0.0.0/8",)),)})
    assert sum("udp,tp_dst=53" in f for f in flows) == 1


def test_render_is_stable() -> None:
    allows = {"web": (Allow("web", "any", None, ("10.0.0.0/8",)),)}
    assert render([WEB, OPEN], allows) == render([OPEN, WEB], allows)


def endpoint(cid: str, ip: str, groups: tuple[str, ...]) -> Endpoint:
    return Endpoint(cid, "net", ip, "", "h1", "ovs" + cid, groups=groups)


def test_compile_resolves_group_network_and_cidr_sources() -> None:
    groups = [Group("web", (GroupRule.parse("tcp", "80", "group:client"),
                            GroupRule.parse("icmp", None, "network:front"),
                            GroupRule.parse("any", None, "192.168.0.0/16"),
                            GroupRule.parse("udp", "53", "group:nobody"),
                            GroupRule.parse("udp", "54", "network:gone"))),
              Group("client")]
    endpoints = [endpoint("a", "10.0.6.9", ("client",)), endpoint("b", "10.0.6.4", ("client",
                                                                                   "web")),
                 endpoint("c", "10.0.6.5", ())]
    networks = [Network("front", "10.0.6.0/24", "10.0.6.1", 100)]
    compiled = compile_groups(groups, endpoints, networks)
    assert compiled["client"] == ()
    assert compiled["web"] == (
        Allow("web", "tcp", (80, 80), ("10.0.6.4/32", "10.0.6.9/32")),
        Allow("web", "icmp", None, ("10.0.6.0/24",)),
        Allow("web", "any", None, ("192.168.0.0/16",)),
    )


def test_route_flows_answer_arp_and_send_down_the_tunnel_with_the_router_mac() -> None:
    route = RemoteEndpoint("blue", gateway_ofport=5, tunnel_ofport=9, mac="02:42:0a:00:07:02",
                           ip="10.0.7.2", router_mac="02:71:01:02:03:04")
    owner = f"cookie={cookie(ROUTE, 'blue'):#x}"
    flows = [f for f in render([], {}, [route]) if f.startswith(owner)]
    arp, unicast = flows
    assert "in_port=5,arp,arp_op=1,arp_tpa=10.0.7.2" in arp
    assert "load:0x0a000702->NXM_OF_ARP_SPA[]" in arp and arp.endswith("output:5")
    # Never the shared gateway MAC as source on a tunnel, and the input port forgotten so that
    # OVS lets a protected gateway reach a protected tunnel.
    assert unicast.endswith("actions=mod_dl_src:02:71:01:02:03:04,load:0->NXM_OF_IN_PORT[],"
                            "output:9")
    assert router_mac("h1") != router_mac("h2") and router_mac("h1").startswith("02:71:")
