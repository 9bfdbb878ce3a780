"""`powerplane group` and `network connect|disconnect` as a user runs them, on a real dev agent."""

from __future__ import annotations

import asyncio
import json

import pytest

from adapter.model import Endpoint
from adapter.network.state import State
from adapter.settings import Settings
from tests.test_cli_network import Cli


@pytest.fixture
def cli(consul_settings: Settings, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(consul_settings, capsys)


def put_endpoints(settings: Settings, *endpoints: Endpoint) -> None:
    async def put() -> None:
        state = State(settings)
        try:
            for endpoint in endpoints:
                await state.endpoints.put(endpoint)
        finally:
            await state.close()
    asyncio.run(put())


def endpoint(container: str, name: str, ip: str, network: str, *groups: str) -> Endpoint:
    return Endpoint(container_id=container, network=network, ip=ip, mac="02:00:00:00:00:01",
                    host="h1", port="pp-1", sandbox="s" + container, name=name, groups=groups)


def test_group_session(cli: Cli) -> None:
    """create, rule add (table of kinds), ls, info, rule rm, rm: the documented session."""
    assert cli.ok("group", "create", "lb").strip() == "lb"
    cli.ok("group", "create", "web")
    assert cli.ok("group", "rule", "add", "web", "--proto", "tcp", "--port", "80",
                  "--from", "0.0.0.0/0").strip() == "web: allow tcp/80 from 0.0.0.0/0"
    cli.ok("group", "rule", "add", "web", "--proto", "TCP", "--port", "8000-8100",
           "--from", "group:lb")
    cli.ok("group", "rule", "add", "web", "--proto", "icmp", "--from", "10.1.2.3/16")
    again = cli.ok("group", "rule", "add", "web", "--proto", "tcp", "--port", "80",
                   "--from", "0.0.0.0/0")
    assert "(had it already)" in again
    table = cli.ok("group", "ls").splitlines()
    assert table[0].split() == ["NAME", "RULES", "MEMBERS"]
    assert table[1].split() == ["lb", "(allows", "nothing)", "0"]
    assert table[2].startswith("web") and "tcp/8000-8100 from group:lb;" in table[2]
    assert "icmp from 10.1.0.0/16" in table[2]
    listed = json.loads(cli.ok("group", "ls", "--json"))
    assert [(g["name"], len(g["rules"]), g["members"]) for g in listed] == [("lb", 0, 0),
                                                                              ("web", 3, 0)]
    info = cli.ok("group", "info", "lb")
    assert "Named by:  web" in info and "rules: none" in info
    detail = json.loads(cli.ok("group", "info", "web", "--json"))
    assert detail["rules"][1] == {"proto": "tcp", "ports": [8000, 8100], "source": "group:lb"}
    assert cli.ok("group", "rule", "rm", "web", "--proto", "tcp", "--port", "8000-8100",
                  "--from", "group:lb").strip() == "web: removed tcp/8000-8100 from group:lb"
    assert cli.ok("group", "rm", "lb").strip() == "lb"
    assert [g["name"] for g in json.loads(cli.ok("group", "ls", "--json"))] == ["web"]


@pytest.mark.parametrize(("args", "needle"), [
    (("group", "create", "web"), "'web' already exists"),
    (("group", "create", "a/b"), "invalid group name 'a/b'"),
    (("group", "info", "nope"), "group 'nope' not found"),
    (("group", "rm", "nope"), "group 'nope' not found"),
    (("group", "rm", "web"), "'web' is in use by 1 container(s): app"),
    (("group", "rm", "lb"), "named by rules of group(s) web"),
    (("group", "rule", "add", "web", "--proto", "tcp", "--port", "0", "--from", "10.0.0.0/8"),
     "invalid port range '0'"),
    (("group", "rule", "add", "web", "--proto", "tcp", "--port", "90-80",
      "--from", "10.0.0.0/8"), "invalid port range '90-80'"),
    (("group", "rule", "add", "web", "--proto", "udp", "--port", "x", "--from", "10.0.0.0/8"),
     "invalid port range 'x'"),
    (("group", "rule", "add", "web", "--proto", "tcp", "--from", "10.0.0.0/33"),
     "invalid source '10.0.0.0/33'"),
    (("group", "rule", "add", "web", "--proto", "tcp", "--from", "fd00::/8"),
     "invalid source 'fd00::/8'"),
    (("group", "rule", "add", "web", "--proto", "tcp", "--from", "group:nope"),
     "no group 'nope'"),
    (("group", "rule", "add", "web", "--proto", "tcp", "--from", "network:nope"),
     "no network 'nope'"),
    (("group", "rule", "add", "nope", "--proto", "tcp", "--from", "10.0.0.0/8"),
     "group 'nope' not found"),
    (("group", "rule", "add", "web", "--proto", "icmp", "--port", "8", "--from", "10.0.0.0/8"),
     "--port applies to tcp and udp, not icmp"),
    (("group", "rule", "rm", "web", "--proto", "udp", "--from", "10.0.0.0/8"),
     "has no rule udp from 10.0.0.0/8"),
    (("network", "connect", "front", "front"), "to itself"),
    (("network", "connect", "front", "nope"), "network 'nope' not found"),
    (("network", "disconnect", "front", "back"), "are not connected"),
    (("group", "check", "app", "nobody", "80"), "no overlay container is named 'nobody'"),
    (("group", "check", "app", "app", "80/sctp"), "invalid port '80/sctp'"),
])
def test_bad_input_is_one_line_exit_1_and_changes_nothing(
        cli: Cli, args: tuple[str, ...], needle: str) -> None:
    cli.ok("group", "create", "lb")
    cli.ok("group", "create", "web")
    cli.ok("group", "rule", "add", "web", "--proto", "tcp", "--from", "group:lb")
    cli.ok("network", "create", "front", "10.1.0.0/24")
    cli.ok("network", "create", "back", "10.2.0.0/24")
    put_endpoints(cli.settings, endpoint("c1", "app", "10.1.0.2", "front", "web"))
    before = (cli.ok("group", "ls", "--json"), cli.ok("network", "ls", "--json"),
              cli.ok("network", "info", "front", "--json"))
    message = cli.fails(*args)
    assert needle in message, message
    assert (cli.ok("group", "ls", "--json"), cli.ok("network", "ls", "--json"),
            cli.ok("network", "info", "front", "--json")) == before


def test_unknown_protocol_is_a_usage_error(cli: Cli) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.run("group", "rule", "add", "web", "--proto", "gre", "--from", "10.0.0.0/8")
    assert exit_info.value.code == 2


def test_connect_shows_in_network_info_with_groups(cli: Cli) -> None:
    cli.ok("network", "create", "front", "10.1.0.0/24")
    cli.ok("network", "create", "back", "10.2.0.0/24")
    cli.ok("group", "create", "web")
    put_endpoints(cli.settings, endpoint("c1", "app", "10.1.0.2", "front", "web"))
    assert cli.ok("network", "connect", "front", "back").strip() == "front <-> back"
    assert "(connected already)" in cli.ok("network", "connect", "back", "front")
    assert "Connected: back" in cli.ok("network", "info", "front")
    assert json.loads(cli.ok("network", "info", "back", "--json"))["connected"] == ["front"]
    message = cli.fails("network", "rm", "back")
    assert "'back' is connected to front" in message
    cli.ok("network", "disconnect", "back", "front")
    assert "Connected: -" in cli.ok("network", "info", "front")
    assert cli.ok("network", "rm", "back").strip() == "back"


def test_group_check(cli: Cli) -> None:
    """Allowed by a rule, allowed for want of groups, denied, unreachable; exit 0 or 1."""
    for name, cidr in (("front", "10.1.0.0/24"), ("back", "10.2.0.0/24"),
                       ("ops", "10.3.0.0/24")):
        cli.ok("network", "create", name, cidr)
    for group in ("lb", "web", "db"):
        cli.ok("group", "create", group)
    cli.ok("group", "rule", "add", "web", "--proto", "tcp", "--port", "80", "--from", "group:lb")
    cli.ok("group", "rule", "add", "db", "--proto", "tcp", "--port", "5432",
           "--from", "network:ops")
    cli.ok("network", "connect", "front", "ops")
    put_endpoints(cli.settings,
                  endpoint("aaaa1111", "lb1", "10.1.0.2", "front", "lb"),
                  endpoint("bbbb2222", "web1", "10.1.0.3", "front", "web"),
                  endpoint("cccc3333", "db1", "10.1.0.4", "front", "db"),
                  endpoint("dddd4444", "plain", "10.1.0.5", "front"),
                  endpoint("eeee5555", "tool", "10.3.0.2", "ops"),
                  endpoint("ffff6666", "far", "10.2.0.2", "back"))
    cases = [
        (("lb1", "web1", "80"), 0, "allowed by group web, rule tcp/80 from group:lb"),
        (("10.1.0.2", "bbbb", "80/tcp"), 0, "allowed by group web"),
        (("plain", "web1", "80"), 1, "denied: no rule of web allows tcp/80 from 10.1.0.5"),
        (("lb1", "web1", "443"), 1, "denied"),
        (("lb1", "web1", "icmp"), 1, "denied"),
        (("web1", "plain", "22"), 0, "10.1.0.5 is in no group"),
        (("tool", "db1", "5432"), 0, "allowed by group db, rule tcp/5432 from network:ops"),
        (("lb1", "db1", "5432"), 1, "denied"),
        (("far", "plain", "80"), 1, "unreachable: back and front are different networks"),
        (("tool", "far", "icmp"), 1, "unreachable"),
    ]
    for args, code, needle in cases:
        status, out, err = cli.run("group", "check", *args)
        assert (status, err) == (code, ""), (args, out, err)
        assert needle in out, (args, out)
    detail = json.loads(cli.ok("group", "check", "lb1", "web1", "80", "--json"))
    assert (detail["allowed"], detail["outcome"], detail["group"], detail["rule"]) == (
        True, "allowed", "web", {"proto": "tcp", "ports": [80, 80], "source": "group:lb"})
    assert detail["destination"]["groups"] == ["web"]
