"""Configuration, read once into a frozen ``Settings``.

Every option has a command-line flag and a ``POWERPLANE_*`` environment variable; the flag wins.
Consul's own ``CONSUL_HTTP_ADDR`` and ``CONSUL_HTTP_TOKEN`` are honoured like the consul CLI does,
below the ``POWERPLANE_*`` names. Nothing here is read at import time: ``load_settings`` is called
once by the command line and the result is passed down.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapter.errors import ConfigError

Datapath = Literal["system", "netdev"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a Powerplane process is configured with."""

    listen: tuple[str, ...] = ("unix:///run/powerplane/docker.sock",)
    docker_url: str = "unix:///var/run/docker.sock"
    consul_addr: str = "127.0.0.1:8500"
    consul_scheme: str = "http"
    consul_token: str | None = None
    consul_prefix: str = "powerplane/"
    adapters_file: Path | None = None
    underlay_ip: str | None = None
    underlay_interface: str | None = None
    bridge: str = "powerplane0"
    datapath: Datapath = "system"
    ovsdb: str = "unix:/var/run/openvswitch/db.sock"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    group: str = "docker"
    insecure_tcp_gives_root: bool = False
    cleanup: bool = False
    floating_range: str | None = None
    dns_upstream: tuple[str, ...] = ()  # IP:PORT each; () = the host's resolv.conf at start
    sandbox_image: str = "busybox:latest"
    mtu: int | None = None
    vni_min: int = 256
    vni_max: int = 16_777_215
    host_id: str = ""
    host_ttl: float = 15.0
    reconcile_interval: float = 30.0
    dataplane_wait: float = 30.0
    run_dir: Path = Path("/run/powerplane")
    log_level: str = "info"
    # Metrics and log format (docs/metrics.md).
    metrics_addr: tuple[str, int] | None = None  # (IP, port); None: no metrics listener
    log_format: str = "text"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the command line and the environment spell it."""

    field: str
    flag: str
    help: str
    env_fallbacks: tuple[str, ...] = ()
    parse: Callable[[str], Any] = str
    repeatable: bool = False
    metavar: str | None = None
    # A switch takes no value on the command line; its variable is a yes/no word.
    switch: bool = False

    @property
    def env(self) -> str:
        return "POWERPLANE_" + self.flag.lstrip("-").replace("-", "_").upper()


def _path(value: str) -> Path:
    return Path(value)


def _datapath(value: str) -> Datapath:
    if value not in ("system", "netdev"):
        raise ValueError("must be 'system' (kernel) or 'netdev' (userspace)")
    return value  # type: ignore[return-value]


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _mtu(value: str) -> int:
    number = int(value)
    if not 576 <= number <= 9000:
        raise ValueError("must be between 576 and 9000")
    return number


def _yes_no(value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of 1, true, yes, on, 0, false, no, off")


def _log_level(value: str) -> str:
    word = value.strip().lower()
    if word not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return word


def _consul_addr(value: str) -> str:
    # CONSUL_HTTP_ADDR may carry a scheme; the scheme is split off by load_settings.
    return value.strip()


def parse_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address; ValueError otherwise."""
    text = value.strip()
    port = default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected [IPv6]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("expected IP or IP:PORT") from None
    if not 0 < port < 65536:
        raise ValueError("the port must be 1 to 65535")
    return str(address), port


def _dns_upstream(value: str) -> str:
    host, port = parse_host_port(value, 53)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _floating_range(value: str) -> str:
    try:
        network = ipaddress.IPv4Network(value.strip(), strict=False)
    except ValueError:
        raise ValueError("must be an IPv4 CIDR such as 192.168.50.128/25") from None
    if network.prefixlen > 30:
        raise ValueError("must hold at least two usable addresses (/30 or larger)")
    return str(network)


FLOATING_RANGE = Option(
    "floating_range", "--floating-range", "the block of outside (underlay) addresses "
    "floating IPs come from, the same on every host of the cluster", parse=_floating_range,
    metavar="CIDR")

# Options shared by every command that talks to Consul.
CONSUL_OPTIONS: tuple[Option, ...] = (
    Option("consul_addr", "--consul", "Consul HTTP address HOST:PORT (default 127.0.0.1:8500; "
           "CONSUL_HTTP_ADDR honoured)", env_fallbacks=("CONSUL_HTTP_ADDR",),
           parse=_consul_addr, metavar="HOST:PORT"),
    Option("consul_token", "--consul-token", "Consul ACL token (CONSUL_HTTP_TOKEN honoured)",
           env_fallbacks=("CONSUL_HTTP_TOKEN",), metavar="TOKEN"),
    Option("consul_prefix", "--consul-prefix", "KV prefix holding Powerplane's state "
           "(default powerplane/)", metavar="PREFIX"),
)

SERVE_OPTIONS: tuple[Option, ...] = (
    Option("listen", "--listen", "where the proxy listens: unix:///PATH or tcp://HOST:PORT; "
           "repeatable (default unix:///run/powerplane/docker.sock). A TCP address needs "
           "--tls-cert, --tls-key and --tls-ca", repeatable=True, metavar="URL"),
    Option("group", "--group", "group owning the unix sockets, mode 0660, like dockerd's "
           "--group (default docker); its members may use the proxy, which is root on this "
           "host", metavar="GROUP"),
    Option("insecure_tcp_gives_root", "--insecure-tcp-gives-root", "allow a loopback TCP "
           "listener without TLS: every local user who connects is root on this host",
           parse=_yes_no, switch=True),
    Option("cleanup", "--cleanup", "on stop, take this host's gateway ports and nftables "
           "rules away (running overlay containers lose their way out until serve is back)",
           parse=_yes_no, switch=True),
    Option("docker_url", "--docker", "upstream Docker daemon (default "
           "unix:///var/run/docker.sock)", metavar="URL"),
    Option("adapters_file", "--adapters", "Powerstrip adapters.yml naming the hooks to run",
           parse=_path, metavar="FILE"),
    Option("underlay_ip", "--underlay-ip", "this host's address on the underlay; VXLAN "
           "tunnels from other hosts end here", metavar="IP"),
    Option("underlay_interface", "--underlay-interface", "interface holding the underlay IP "
           "(found from --underlay-ip when omitted)", metavar="DEV"),
    Option("bridge", "--bridge", "OVS integration bridge (default powerplane0)", metavar="NAME"),
    Option("datapath", "--datapath", "OVS datapath: system (kernel, default) or netdev "
           "(userspace; also moves the underlay IP onto an OVS bridge)", parse=_datapath,
           metavar="system|netdev"),
    Option("ovsdb", "--ovsdb", "OVSDB connection (default unix:/var/run/openvswitch/db.sock)",
           metavar="URL"),
    Option("tls_cert", "--tls-cert", "TLS certificate for TCP listeners", parse=_path,
           metavar="FILE"),
    Option("tls_key", "--tls-key", "TLS private key for TCP listeners", parse=_path,
           metavar="FILE"),
    Option("tls_ca", "--tls-ca", "CA that client certificates must chain to (like dockerd "
           "--tlsverify)", parse=_path, metavar="FILE"),
    Option("sandbox_image", "--sandbox-image", "image of the network-only sandbox containers "
           "(default busybox:latest)", metavar="IMAGE"),
    Option("mtu", "--mtu", "overlay MTU (default: underlay MTU - 50)", parse=_mtu, metavar="N"),
    Option("host_id", "--host-id", "this host's id in Consul (default: /etc/machine-id or the "
           "hostname)", metavar="ID"),
    Option("host_ttl", "--host-ttl", "seconds before a silent host is dropped (default 15)",
           parse=_positive_float, metavar="SECONDS"),
    Option("reconcile_interval", "--reconcile-interval", "seconds between reconciliations of "
           "Consul, Docker and OVS (default 30)", parse=_positive_float, metavar="SECONDS"),
    Option("dataplane_wait", "--dataplane-wait", "seconds a create waits for the data plane "
           "while serve is starting before it is refused (default 30)", parse=_positive_float,
           metavar="SECONDS"),
    Option("run_dir", "--run-dir", "where serve keeps its status file (status.json) for "
           "`powerplane status` (default /run/powerplane)", parse=_path, metavar="DIR"),
    Option("log_level", "--log-level", "debug, info, warning or error (default info)",
           parse=_log_level, metavar="LEVEL"),
    FLOATING_RANGE,
    Option("dns_upstream", "--dns-upstream", "resolver the DNS server forwards names that are "
           "not containers' to; repeatable, tried in order (default: the nameservers of "
           "/etc/resolv.conf when serve starts)", parse=_dns_upstream, repeatable=True,
           metavar="IP[:PORT]"),
)


# -- metrics and log format -------------------------------------------------------------------

METRICS_PORT = 9323  # dockerd's own --metrics-addr convention


def _metrics_addr(value: str) -> tuple[str, int]:
    return parse_host_port(value, METRICS_PORT)


def _log_format(value: str) -> str:
    word = value.strip().lower()
    if word not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return word


OBSERVABILITY_OPTIONS: tuple[Option, ...] = (
    Option("metrics_addr", "--metrics-addr", "serve Prometheus metrics at http://IP:PORT/metrics "
           "(port 9323 when omitted, like dockerd's); off unless given. Anyone who reaches it "
           "sees network names and counts: keep it on loopback or a management network",
           parse=_metrics_addr, metavar="IP[:PORT]"),
    Option("log_format", "--log-format", "text (default) or json: one object per line with "
           "time, level, logger, message and the request, container and network it is about",
           parse=_log_format, metavar="text|json"),
)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add flags for ``options``; the help names each one's environment variable."""
    for option in options:
        env_names = ", ".join((option.env, *option.env_fallbacks))
        help_text = f"{option.help} [env: {env_names}]"
        if option.switch:
            # The flag stores the word its variable would hold, so both parse alike.
            parser.add_argument(option.flag, dest=option.field, action="store_const",
                                const="yes", default=None, help=help_text)
            continue
        parser.add_argument(
            option.flag,
            dest=option.field,
            action="append" if option.repeatable else "store",
            default=None,
            metavar=option.metavar,
            help=help_text,
        )


def load_settings(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    options: Sequence[Option],
    base: Settings | None = None,
) -> Settings:
    """Merge flags over environment over defaults; raise ConfigError naming a bad value."""
    values: dict[str, Any] = {}
    for option in options:
        raw: Any = getattr(args, option.field, None)
        source = option.flag
        if raw is None:
            for name in (option.env, *option.env_fallbacks):
                if environ.get(name):
                    raw, source = environ[name], name
                    if option.repeatable:
                        raw = raw.split(",")
                    break
        if raw is None:
            continue
        try:
            if option.repeatable:
                values[option.field] = tuple(option.parse(item) for item in raw)
            else:
                values[option.field] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: invalid value {raw!r}: {exc}") from None
    settings = (base or Settings()).replace(**values)
    addr = settings.consul_addr
    if "://" in addr:
        scheme, _, rest = addr.partition("://")
        settings = settings.replace(consul_scheme=scheme, consul_addr=rest.rstrip("/"))
    if not settings.consul_prefix.endswith("/"):
        settings = settings.replace(consul_prefix=settings.consul_prefix + "/")
    if not settings.host_id:
        settings = settings.replace(host_id=default_host_id())
    return settings


def default_host_id() -> str:
    """A stable id for this host: its machine-id, or its hostname when there is none."""
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = ""
    return machine_id or socket.gethostname()
