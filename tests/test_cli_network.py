"""`powerplane network` and `powerplane hosts` as a user runs them, against a real dev agent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.cli import main
from adapter.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def _environ(settings: Settings, addr: str | None = None) -> dict[str, str]:
    # The variables a user would export; the CLI must honour CONSUL_HTTP_ADDR like consul does.
    return {
        "CONSUL_HTTP_ADDR": addr or settings.consul_addr,
        "POWERPLANE_CONSUL_PREFIX": settings.consul_prefix,
    }


class Cli:
    """Runs ``powerplane`` in this process (its real main(), real Consul), capturing output."""

    def __init__(self, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
        self.settings = settings
        self.capsys = capsys

    def run(self, *args: str, addr: str | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(list(args), _environ(self.settings, addr))
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *args: str) -> str:
        code, out, err = self.run(*args)
        assert code == 0, err
        return out

    def fails(self, *args: str, addr: str | None = None) -> str:
        code, out, err = self.run(*args, addr=addr)
        assert (code, out) == (1, "")
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("powerplane: "), err
        return lines[0]


@pytest.fixture
def cli(consul_settings: Settings, capsys: pytest.CaptureFixture[str]) -> Cli:
    """The powerplane command line pointed at a fresh prefix of the module's dev agent."""
    return Cli(consul_settings, capsys)


def test_create_list_info_rm(cli: Cli) -> None:
    """The documented session: create, list (table and JSON), info, rm."""
    created = cli.ok("network", "create", "foo4", "10.6.0.0/16")
    assert "foo4: subnet 10.6.0.0/16, gateway 10.6.0.1, VNI 256" in created
    cli.ok("network", "create", "small", "10.9.0.0/29", "--vni", "77", "--mtu",
        "1400")
    table = cli.ok("network", "list").splitlines()
    assert table[0].split() == ["NAME", "SUBNET", "GATEWAY", "VNI", "MTU", "ADDRESSES"]
    assert table[1].split() == ["foo4", "10.6.0.0/16", "10.6.0.1", "256", "-", "0/65533"]
    assert table[2].split() == ["small", "10.9.0.0/29", "10.9.0.1", "77", "1400", "0/5"]
    listed = json.loads(cli.ok("network", "list", "--json"))
    assert [(n["name"], n["cidr"], n["vni"], n["addresses"]) for n in listed] == [
        ("foo4", "10.6.0.0/16", 256, 0), ("small", "10.9.0.0/29", 77, 0)]
    info = cli.ok("network", "info", "small")
    assert "Subnet:    10.9.0.0/29" in info and "0 of 5 in use" in info
    detail = json.loads(cli.ok("network", "info", "small", "--json"))
    assert (detail["gateway"], detail["mtu"], detail["endpoints"]) == ("10.9.0.1", 1400, [])
    assert cli.ok("network", "rm", "small").strip() == "small"
    assert [n["name"] for n in json.loads(cli.ok("network", "list", "--json"))] \
        == ["foo4"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("network", "create", "bad name", "10.1.0.0/24"), "invalid network name 'bad name'"),
        (("network", "create", "x", "10.1.0.0/31"), "prefix /31 is out of range; use /8 to /29"),
        (("network", "create", "x", "10.1.0.0"), "expected ADDRESS/PREFIX"),
        (("network", "info", "nope"), "network 'nope' not found"),
        (("network", "rm", "nope"), "network 'nope' not found"),
    ],
)
def test_errors_are_one_line(cli: Cli, args: tuple[str, ...], message: str) -> None:
    """Bad input exits 1 with a single `powerplane: ...` line naming the problem."""
    assert message in cli.fails(*args)


def test_conflicts_and_in_use(cli: Cli, consul_settings: Settings) -> None:
    """Overlap names the other network; rm of a network in use is refused until --force."""
    cli.ok("network", "create", "foo", "10.6.0.0/16")
    clash = cli.fails("network", "create", "bar", "10.6.1.0/24")
    assert "overlaps network 'foo' (10.6.0.0/16)" in clash
    worker = subprocess.run(
        [sys.executable, "-m", "tests.support.state_worker", "--consul",
         consul_settings.consul_addr, "--prefix", consul_settings.consul_prefix,
         "allocate", "foo", "--count", "2", "--tag", "web"],
        capture_output=True, text=True, check=True, timeout=30, cwd=REPO,
    )
    assert len(json.loads(worker.stdout)["allocated"]) == 2
    assert "2/65533" in cli.ok("network", "list")
    info = cli.ok("network", "info", "foo")
    assert "10.6.0.2" in info and "web-" in info
    assert "still has 2 address(es) in use" in cli.fails("network", "rm", "foo")
    cli.ok("network", "rm", "--force", "foo")


def test_hosts_lists_nothing_on_an_empty_cluster(cli: Cli) -> None:
    """`powerplane hosts` prints its header and `--json` an empty list when nobody registered."""
    assert cli.ok("hosts").split() == ["HOST", "UNDERLAY", "IP", "HOSTNAME",
                                                     "VERSION"]
    assert json.loads(cli.ok("hosts", "--json")) == []


def test_consul_down_is_one_line_naming_the_address(consul_settings: Settings) -> None:
    """The installed command, Consul not listening: exit 1, one line naming the address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "adapter.cli", "network", "list"],
        env={"PATH": "/usr/bin:/bin", **_environ(consul_settings, f"127.0.0.1:{port}")},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"powerplane: Consul at http://127.0.0.1:{port} is unreachable")
    assert len(result.stderr.splitlines()) == 1
