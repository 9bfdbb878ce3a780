"""Security groups: allow-only rules that say who may open connections to a container.

Pure data and validation, like ``adapter.model``; nothing here does I/O. A container in no group
accepts everything its network sends it (as before groups existed); a container in groups accepts
a new inbound connection only when one rule of one of its groups allows it. Replies to allowed
connections, and to the container's own outbound connections, always pass (the switch tracks
connections). ``adapter.network.group_state`` stores groups in Consul as ``to_json`` returns;
the data plane receives them compiled to addresses (``adapter.network.security``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapter.errors import InvalidGroup
from adapter.model import NAME_MAX_LENGTH, NAME_PATTERN, json_type, quoted

PROTOCOLS = ("tcp", "udp", "icmp", "any")
PORT_MIN = 1
PORT_MAX = 65535
SOURCE_KINDS = ("group", "network")


def validate_group_name(name: str) -> str:
    """Return ``name`` if it is a valid group name, else raise InvalidGroup."""
    if not NAME_PATTERN.fullmatch(name) or len(name) > NAME_MAX_LENGTH:
        raise InvalidGroup(
            f"invalid group name {quoted(name)}: use 1 to {NAME_MAX_LENGTH} characters from "
            "[a-zA-Z0-9_.-], starting with a letter or digit"
        )
    return name


def parse_group_names(value: str) -> tuple[str, ...]:
    """``SOCKETPLANE_GROUPS=web,admin``: the names, each once, in order; InvalidGroup if one is
    not a valid name. Blanks around commas are ignored; an empty value means no group."""
    names: list[str] = []
    for part in value.split(","):
        name = part.strip()
        if not name:
            continue
        validate_group_name(name)
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_port_range(value: str) -> tuple[int, int]:
    """``80`` or ``8000-8100`` (inclusive); InvalidGroup otherwise."""
    low_text, dash, high_text = value.strip().partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        raise InvalidGroup(f"invalid port range {quoted(value)}: use N or N-M, "
                           f"{PORT_MIN} to {PORT_MAX}") from None
    if not PORT_MIN <= low <= high <= PORT_MAX:
        raise InvalidGroup(f"invalid port range {quoted(value)}: use N or N-M with "
                           f"{PORT_MIN} <= N <= M <= {PORT_MAX}")
    return low, high


def parse_source(value: str) -> str:
    """``CIDR``, ``group:NAME`` or ``network:NAME``, normalised (a CIDR to its network)."""
    kind, colon, name = value.partition(":")
    if colon and kind in SOURCE_KINDS:
        if kind == "group":
            validate_group_name(name)
        else:
            if not NAME_PATTERN.fullmatch(name) or len(name) > NAME_MAX_LENGTH:
                raise InvalidGroup(f"invalid network name {quoted(name)} in --from")
        return f"{kind}:{name}"
    try:
        return str(ipaddress.IPv4Network(value.strip(), strict=False))
    except ValueError:
        raise InvalidGroup(
            f"invalid source {quoted(value)}: use an IPv4 CIDR (10.0.0.0/8), group:NAME or "
            "network:NAME") from None


@dataclass(frozen=True, slots=True)
class GroupRule:
    """Allow new connections of ``proto`` to ``ports`` (tcp and udp only) from ``source``."""

    proto: str
    ports: tuple[int, int] | None
    source: str  # a CIDR, "group:NAME" or "network:NAME"

    def __post_init__(self) -> None:
        if self.proto not in PROTOCOLS:
            raise InvalidGroup(f"invalid protocol {quoted(self.proto)}: use one of "
                               f"{', '.join(PROTOCOLS)}")
        if self.ports is not None and self.proto not in ("tcp", "udp"):
            raise InvalidGroup(f"--port applies to tcp and udp, not {self.proto}")

    @classmethod
    def parse(cls, proto: str, port: str | None, source: str) -> GroupRule:
        """A rule from the CLI's words; InvalidGroup naming what is wrong."""
        return cls(proto=proto.lower(),
                   ports=parse_port_range(port) if port else None,
                   source=parse_source(source))

    @property
    def source_kind(self) -> str:
        """"cidr", "group" or "network"."""
        kind, colon, _ = self.source.partition(":")
        return kind if colon else "cidr"

    @property
    def source_name(self) -> str:
        return self.source.partition(":")[2] if ":" in self.source else self.source

    def describe(self) -> str:
        ports = ""
        if self.ports is not None:
            low, high = self.ports
            ports = f"/{low}" if low == high else f"/{low}-{high}"
        return f"{self.proto}{ports} from {self.source}"

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"proto": self.proto, "source": self.source}
        if self.ports is not None:
            document["ports"] = list(self.ports)
        return document

    @classmethod
    def from_json(cls, data: object) -> GroupRule:
        """ValueError when the record has the wrong shape or values."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a rule is {json_type(data)}, not an object")
        proto, source, ports = data.get("proto"), data.get("source"), data.get("ports")
        if not isinstance(proto, str) or not isinstance(source, str):
            raise ValueError("a rule needs string fields 'proto' and 'source'")
        span: tuple[int, int] | None = None
        if ports is not None:
            if (not isinstance(ports, list) or len(ports) != 2
                    or not all(type(p) is int for p in ports)):
                raise ValueError("field 'ports' is not [low, high]")
            span = (ports[0], ports[1])
            if not PORT_MIN <= span[0] <= span[1] <= PORT_MAX:
                raise ValueError(f"field 'ports' {list(span)} is out of range")
        try:
            return cls(proto=proto, ports=span, source=parse_source(source))
        except InvalidGroup as exc:
            raise ValueError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Group:
    """A named set of allow rules (``groups/<name>`` in Consul)."""

    name: str
    rules: tuple[GroupRule, ...] = ()

    def with_rule(self, rule: GroupRule) -> Group:
        """This group with ``rule`` added (unchanged when it has it already)."""
        return self if rule in self.rules else Group(self.name, (*self.rules, rule))

    def without_rule(self, rule: GroupRule) -> Group:
        """This group without ``rule``; InvalidGroup when it has no such rule."""
        if rule not in self.rules:
            raise InvalidGroup(f"group {quoted(self.name)} has no rule {rule.describe()}")
        return Group(self.name, tuple(r for r in self.rules if r != rule))

    def to_json(self) -> dict[str, Any]:
        return {"rules": [rule.to_json() for rule in self.rules]}

    @classmethod
    def from_json(cls, name: str, data: object) -> Group:
        if not isinstance(data, Mapping):
            raise ValueError(f"the record is {json_type(data)}, not an object")
        rules = data.get("rules")
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise ValueError(f"field 'rules' is {json_type(rules)}, not an array")
        return cls(name=name, rules=tuple(GroupRule.from_json(rule) for rule in rules))


def referenced_groups(groups: Iterable[Group]) -> set[str]:
    """Names that some rule uses as ``--from group:NAME``."""
    return {rule.source_name for group in groups for rule in group.rules
            if rule.source_kind == "group"}


# -- would a new connection be allowed? (``powerplane group check``) --------------------------

CHECK_PROTOCOLS = ("tcp", "udp", "icmp")


def parse_check_port(value: str) -> tuple[str, int | None]:
    """``80`` (tcp), ``80/tcp``, ``53/udp`` or ``icmp``: the protocol and port to check."""
    text = value.strip().lower()
    if text == "icmp":
        return "icmp", None
    number, slash, proto = text.partition("/")
    proto = proto if slash else "tcp"
    if proto not in ("tcp", "udp"):
        raise InvalidGroup(f"invalid port {quoted(value)}: use N, N/tcp, N/udp or icmp")
    try:
        port = int(number)
    except ValueError:
        raise InvalidGroup(f"invalid port {quoted(value)}: use N, N/tcp, N/udp or icmp") from None
    if not PORT_MIN <= port <= PORT_MAX:
        raise InvalidGroup(f"invalid port {quoted(value)}: use {PORT_MIN} to {PORT_MAX}")
    return proto, port


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a connection as the rules see it: its address, network and groups."""

    ip: str
    network: str
    groups: tuple[str, ...] = ()


# The outcomes of ``check_connection``.
ALLOWED_BY_RULE = "allowed"
ALLOWED_NO_GROUP = "no-group"
DENIED = "denied"
UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a new connection would be let through, and why."""

    outcome: str  # one of ALLOWED_BY_RULE, ALLOWED_NO_GROUP, DENIED, UNREACHABLE
    reason: str
    group: str | None = None
    rule: GroupRule | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome in (ALLOWED_BY_RULE, ALLOWED_NO_GROUP)


def connection_key(first: str, second: str) -> frozenset[str]:
    return frozenset((first, second))


def rule_matches(rule: GroupRule, source: Peer, proto: str, port: int | None) -> bool:
    """True when ``rule`` allows a new ``proto``/``port`` connection from ``source``."""
    if rule.proto not in ("any", proto):
        return False
    if rule.ports is not None and (port is None or not rule.ports[0] <= port <= rule.ports[1]):
        return False
    kind = rule.source_kind
    if kind == "group":
        return rule.source_name in source.groups
    if kind == "network":
        return rule.source_name == source.network
    return ipaddress.IPv4Address(source.ip) in ipaddress.IPv4Network(rule.source)


def check_connection(source: Peer, destination: Peer, proto: str, port: int | None, *,
                     groups: Mapping[str, Group],
                     connected: Iterable[frozenset[str]] = ()) -> Verdict:
    """Would a new connection from ``source`` to ``destination`` be let through?

    Networks first: two networks reach each other only when connected. Then the destination's
    groups: none means everything its network sends is accepted; otherwise the first rule (of
    its groups, in the order it joined them) that allows the connection decides. A group the
    destination names that does not exist has no rules.
    """
    if proto not in CHECK_PROTOCOLS:
        raise InvalidGroup(f"invalid protocol {quoted(proto)}: use one of "
                           f"{', '.join(CHECK_PROTOCOLS)}")
    what = f"{proto}/{port}" if port is not None else proto
    if source.network != destination.network \
            and connection_key(source.network, destination.network) not in set(connected):
        return Verdict(UNREACHABLE,
                       f"unreachable: {source.network} and {destination.network} are different "
                       f"networks and not connected (powerplane network connect "
                       f"{source.network} {destination.network})")
    if not destination.groups:
        return Verdict(ALLOWED_NO_GROUP,
                       f"allowed: {destination.ip} is in no group, so it accepts everything "
                       f"that reaches it")
    missing = []
    for name in destination.groups:
        group = groups.get(name)
        if group is None:
            missing.append(name)
            continue
        for rule in group.rules:
            if rule_matches(rule, source, proto, port):
                return Verdict(ALLOWED_BY_RULE,
                               f"allowed by group {name}, rule {rule.describe()}",
                               group=name, rule=rule)
    gone = f" (group {', '.join(missing)} does not exist: no rules)" if missing else ""
    return Verdict(DENIED, f"denied: no rule of {', '.join(destination.groups)} allows {what} "
                           f"from {source.ip}{gone}")
