"""The host firewall on a real kernel: real traffic through a host namespace that forwards.

The lab (tests/support/gateway_lab.py) is one host with three gateway ports (a and b may go
out, c is internal) and an outside. The first test shows that without the table the host routes
everything untranslated, so every "nothing arrives" check below could fail; the others apply
the table (a fresh process each time, in the host namespace) and send real packets. Echo servers
log the source each packet arrived from, so checks assert addresses and absences, not exit codes.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import pytest

from adapter.dataplane.firewall import FloatingAddress, GatewayRule, PublishedPort, Ruleset
from tests.support.firewall_cli import ruleset_json
from tests.support.gateway_lab import (
    FLOATING_IP,
    OUTSIDE_HOST_IP,
    OUTSIDE_IP,
    SECOND_HOST_IP,
    GatewayLab,
)

TABLE = "powerplane"
SILENCE = 0.5  # how long a check waits for what must not arrive (the veths answer in < 1 ms)

A, B, C = "10.71.0.2", "10.72.0.2", "10.73.0.2"
GW_A, GW_B, GW_C = "10.71.0.1", "10.72.0.1", "10.73.0.1"
RULESET = Ruleset(
    gateways=(GatewayRule("gwa", "10.71.0.0/24", GW_A, egress=True),
              GatewayRule("gwb", "10.72.0.0/24", GW_B, egress=True),
              GatewayRule("gwc", "10.73.0.0/24", GW_C, egress=False)),
    published=(PublishedPort("tcp", OUTSIDE_HOST_IP, 8080, A, 8000),
               PublishedPort("udp", OUTSIDE_HOST_IP, 8081, A, 8001),
               PublishedPort("tcp", "", 8082, B, 8000)),
    floating=(FloatingAddress(FLOATING_IP, A),),
)


@pytest.fixture(scope="module")
def lab() -> Iterator[GatewayLab]:
    with GatewayLab.build() as built:
        yield built


def apply(lab: GatewayLab, ruleset: Ruleset = RULESET) -> bool:
    return lab.firewall("apply", TABLE, ruleset_json(ruleset)) == "changed"


def remove(lab: GatewayLab) -> None:
    lab.firewall("remove", TABLE)


def has_table(lab: GatewayLab) -> bool:
    return f"table inet {TABLE}\n" in lab.nft("list", "tables") + "\n"


def answered(lab: GatewayLab, role: str, proto: str, host: str, port: int, server: str,
             *, bind: str | None = None) -> str | None:
    """A two-way exchange: the source ``server`` logged, which must match its answer."""
    token = lab.token()
    answer = lab.ask(role, proto, host, port, token, bind=bind)
    seen = lab.servers[server, proto].saw(token, timeout=5.0 if answer else 0.0)
    assert answer == seen, f"{server} logged {seen} but answered {answer}"
    return seen


def blocked(lab: GatewayLab, role: str, proto: str, host: str, port: int, server: str,
            *, bind: str | None = None) -> bool:
    """True if nothing sent from ``role`` reached ``server`` (and so nothing came back)."""
    token = lab.token()
    answer = lab.ask(role, proto, host, port, token, bind=bind, timeout=SILENCE)
    return answer is None and lab.servers[server, proto].saw(token) is None


def arrived_from(lab: GatewayLab, role: str, host: str, port: int, server: str,
                 *, bind: str | None = None) -> str | None:
    """A one-way UDP datagram: the source ``server`` logged, or None (waits only if needed)."""
    token = lab.token()
    lab.ask(role, "udp", host, port, token, bind=bind, timeout=0)
    return lab.servers[server, "udp"].saw(token, timeout=SILENCE)


def test_without_the_table_the_host_routes_everything(lab: GatewayLab) -> None:
    """The control: with no table every path the firewall closes is open, nothing translated."""
    remove(lab)
    assert not has_table(lab)
    assert answered(lab, "a", "tcp", B, 8000, "b") == A
    assert lab.ping("a", B) == 2
    assert answered(lab, "a", "tcp", GW_B, 7000, "host") == A
    assert arrived_from(lab, "a", B, 8001, "b", bind="10.72.0.66") == "10.72.0.66"
    assert arrived_from(lab, "a", OUTSIDE_IP, 9001, "out", bind="10.99.0.5") == "10.99.0.5"
    assert answered(lab, "c", "udp", OUTSIDE_IP, 9001, "out") == C
    assert answered(lab, "b", "tcp", OUTSIDE_IP, 9000, "out") == B
    assert answered(lab, "out", "tcp", A, 8000, "a") == OUTSIDE_IP
    assert lab.ping("out", C) == 2
    assert answered(lab, "out", "tcp", OUTSIDE_HOST_IP, 8080, "a") is None
    assert answered(lab, "a", "tcp", OUTSIDE_IP, 9000, "out") == A


def test_egress_is_masqueraded_to_the_outgoing_address(lab: GatewayLab) -> None:
    """b goes out; the outside sees the host's address; replies come back (TCP, UDP, ping)."""
    apply(lab)
    assert answered(lab, "b", "tcp", OUTSIDE_IP, 9000, "out") == OUTSIDE_HOST_IP
    assert answered(lab, "b", "udp", OUTSIDE_IP, 9001, "out") == OUTSIDE_HOST_IP
    assert lab.ping("b", OUTSIDE_IP) == 2


def test_overlay_networks_never_reach_each_other(lab: GatewayLab) -> None:
    """a and b exchange nothing, directly or through each other's gateway address; the
    internal network c neither. A container still reaches its own gateway."""
    apply(lab)
    assert blocked(lab, "a", "tcp", B, 8000, "b")
    assert blocked(lab, "a", "udp", B, 8001, "b")
    assert blocked(lab, "b", "tcp", A, 8000, "a")
    assert blocked(lab, "c", "tcp", A, 8000, "a")
    assert lab.ping("a", B, wait=SILENCE) == 0
    assert blocked(lab, "a", "tcp", GW_B, 7000, "host")
    assert blocked(lab, "a", "udp", GW_C, 7001, "host")
    assert lab.ping("a", GW_B, wait=SILENCE) == 0
    assert answered(lab, "a", "tcp", GW_A, 7000, "host") == A



def test_connected_networks_reach_each_other_and_no_one_else(lab: GatewayLab) -> None:
    """`network connect a b`: a and b route to each other both ways, sources kept; c, not
    connected, still reaches neither, and neither reaches c."""
    apply(lab, dataclasses.replace(RULESET, connected=(("gwa", "gwb"), ("gwb", "gwa"))))
    try:
        assert answered(lab, "a", "tcp", B, 8000, "b") == A
        assert answered(lab, "b", "udp", A, 8001, "a") == B
        assert lab.ping("b", A) == 2
        assert blocked(lab, "c", "tcp", A, 8000, "a")
        assert lab.ping("a", C, wait=SILENCE) == 0
    finally:
        apply(lab)
    assert blocked(lab, "a", "tcp", B, 8000, "b")


def test_forged_sources_are_dropped(lab: GatewayLab) -> None:
    """A source outside the gateway's subnet reaches nothing: not the network it pretends to
    be in, not the outside, not the host. The same container's own address still goes out."""
    apply(lab)
    assert arrived_from(lab, "a", B, 8001, "b", bind="10.72.0.66") is None
    assert arrived_from(lab, "a", OUTSIDE_IP, 9001, "out", bind="10.72.0.66") is None
    assert arrived_from(lab, "a", OUTSIDE_IP, 9001, "out", bind="10.99.0.5") is None
    assert arrived_from(lab, "a", GW_A, 7001, "host", bind="10.99.0.5") is None
    assert arrived_from(lab, "a", OUTSIDE_IP, 9001, "out", bind=A) == FLOATING_IP


def test_an_internal_network_has_no_way_out(lab: GatewayLab) -> None:
    """c sends nothing out, translated or not, but reaches the host's own addresses."""
    apply(lab)
    assert arrived_from(lab, "c", OUTSIDE_IP, 9001, "out") is None
    assert blocked(lab, "c", "tcp", OUTSIDE_IP, 9000, "out")
    assert lab.ping("c", OUTSIDE_IP, wait=SILENCE) == 0
    assert lab.ping("out", C, wait=SILENCE) == 0
    assert answered(lab, "c", "tcp", GW_C, 7000, "host") == C
    assert answered(lab, "c", "udp", OUTSIDE_HOST_IP, 7001, "host") == C


def test_host_and_containers_reach_each_other(lab: GatewayLab) -> None:
    """The host reaches a container through its gateway; a container reaches the host's own
    addresses, its gateway's and the outside one."""
    apply(lab)
    assert answered(lab, "host", "tcp", A, 8000, "a") == GW_A
    assert answered(lab, "host", "udp", B, 8001, "b") == GW_B
    assert answered(lab, "a", "tcp", GW_A, 7000, "host") == A
    assert answered(lab, "b", "tcp", OUTSIDE_HOST_IP, 7000, "host") == B
    assert lab.ping("host", C) == 2


def test_nothing_new_comes_in_unless_published(lab: GatewayLab) -> None:
    """The outside cannot open a connection to a container address, only answers pass."""
    apply(lab)
    assert blocked(lab, "out", "tcp", A, 8000, "a")
    assert blocked(lab, "out", "udp", B, 8001, "b")
    assert lab.ping("out", A, wait=SILENCE) == 0


def test_published_ports_reach_their_container(lab: GatewayLab) -> None:
    """TCP and UDP on the published host address, a port published on every address, and the
    host's own connections to its address all arrive with their real source."""
    apply(lab)
    assert answered(lab, "out", "tcp", OUTSIDE_HOST_IP, 8080, "a") == OUTSIDE_IP
    assert answered(lab, "out", "udp", OUTSIDE_HOST_IP, 8081, "a") == OUTSIDE_IP
    assert answered(lab, "out", "tcp", OUTSIDE_HOST_IP, 8082, "b") == OUTSIDE_IP
    assert answered(lab, "host", "tcp", OUTSIDE_HOST_IP, 8080, "a") == OUTSIDE_HOST_IP
    assert answered(lab, "out", "tcp", SECOND_HOST_IP, 8082, "b") == OUTSIDE_IP
    assert answered(lab, "host", "tcp", SECOND_HOST_IP, 8082, "b",
                    bind=SECOND_HOST_IP) == SECOND_HOST_IP
    # Published on 192.0.2.1 only: the same port on another address of the host is not.
    assert blocked(lab, "out", "tcp", SECOND_HOST_IP, 8080, "a")


def test_loopback_stays_the_hosts_own(lab: GatewayLab) -> None:
    """A port published on every address is not taken from 127.0.0.1: the host's own service
    there still answers (DNAT from a loopback source could never work)."""
    apply(lab, Ruleset(RULESET.gateways, (PublishedPort("tcp", "", 7000, B, 8000),)))
    assert answered(lab, "out", "tcp", OUTSIDE_HOST_IP, 7000, "b") == OUTSIDE_IP
    assert answered(lab, "host", "tcp", OUTSIDE_HOST_IP, 7000, "b") == OUTSIDE_HOST_IP
    assert answered(lab, "host", "tcp", "127.0.0.1", 7000, "host") == "127.0.0.1"


def test_a_floating_address_is_its_container_both_ways(lab: GatewayLab) -> None:
    """The outside reaches a at 192.0.2.10, on any port; a's connections out come from it."""
    apply(lab)
    assert answered(lab, "out", "tcp", FLOATING_IP, 8000, "a") == OUTSIDE_IP
    assert answered(lab, "out", "udp", FLOATING_IP, 8001, "a") == OUTSIDE_IP
    assert answered(lab, "a", "tcp", OUTSIDE_IP, 9000, "out") == FLOATING_IP
    assert answered(lab, "a", "udp", OUTSIDE_IP, 9001, "out") == FLOATING_IP
    assert answered(lab, "b", "tcp", OUTSIDE_IP, 9000, "out") == OUTSIDE_HOST_IP


def test_apply_changes_only_what_differs_and_repairs_hand_edits(lab: GatewayLab) -> None:
    """A second apply changes nothing; a table deleted or flushed by hand is rebuilt (and
    works); another ruleset replaces it; an empty ruleset or remove() leaves no table."""
    apply(lab)
    assert apply(lab) is False
    lab.nft("delete", "table", "inet", TABLE)
    assert apply(lab) is True
    assert answered(lab, "b", "tcp", OUTSIDE_IP, 9000, "out") == OUTSIDE_HOST_IP
    lab.nft("flush", "table", "inet", TABLE)
    assert apply(lab) is True
    assert blocked(lab, "a", "tcp", B, 8000, "b")
    lab.nft("delete", "element", "inet", TABLE, "gateways", "{ gwc }")
    assert apply(lab) is True
    assert apply(lab) is False

    internal_b = Ruleset(gateways=(RULESET.gateways[0],
                                   GatewayRule("gwb", "10.72.0.0/24", GW_B, egress=False)))
    assert apply(lab, internal_b) is True
    assert arrived_from(lab, "b", OUTSIDE_IP, 9001, "out") is None
    assert answered(lab, "out", "tcp", OUTSIDE_HOST_IP, 8080, "a") is None

    assert apply(lab, Ruleset()) is True
    assert not has_table(lab)
    assert apply(lab, Ruleset()) is False
    apply(lab)
    remove(lab)
    assert not has_table(lab)
    remove(lab)
    assert not has_table(lab)


DOOMED_BATCH = """
import asyncio
from adapter.dataplane.nft import Nft
from adapter.errors import DataPlaneError

scratch, ours = ({"family": "inet", "name": name} for name in ("pptscratch", "powerplane"))
doomed = [{"add": {"table": scratch}}, {"delete": {"table": ours}},
          {"add": {"chain": {"family": "inet", "table": "nosuch", "name": "c"}}}]
try:
    asyncio.run(Nft().transaction(doomed, "a doomed batch"))
except DataPlaneError as exc:
    print(exc)
"""


def test_a_refused_batch_changes_nothing(lab: GatewayLab) -> None:
    """A batch is one transaction: when its last command is refused, the table it created and
    the one it deleted are as before. The refusal is a DataPlaneError naming what failed."""
    apply(lab)
    refused = lab.run("host", [sys.executable, "-c", DOOMED_BATCH]).stdout
    assert refused.startswith("nftables refused a doomed batch: "), refused
    assert "pptscratch" not in lab.nft("list", "tables")
    assert has_table(lab) and apply(lab) is False
    with pytest.raises(AssertionError, match=r"refused replacing table inet x+: .*256"):
        lab.firewall("apply", "x" * 300, ruleset_json(RULESET))
