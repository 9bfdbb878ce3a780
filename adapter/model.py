"""The network domain: networks, endpoints, hosts and the rules their values must follow.

Pure data and validation, shared by the control plane and the data plane; nothing here does
I/O. ``adapter.network.state`` stores these objects in Consul as the JSON that ``to_json``
returns (the layout is in docs/state.md), and reads them back with ``from_json``. Every
validation failure is an ``InvalidNetwork`` whose message says what is wrong and what is
allowed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from adapter.errors import InvalidNetwork

# Docker's own rule for object names.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
NAME_MAX_LENGTH = 64
PREFIX_MIN = 8
PREFIX_MAX = 29
VNI_MIN = 1
VNI_MAX = 16_777_215  # 24 bits
MTU_MIN = 576
MTU_MAX = 9000
# A DNS label as RFC 1123 allows it in a host name: what a container's name, hostname or alias
# must be to be answered by the DNS server (compared without regard to case).
DNS_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
# How much of a value an error message quotes: enough to recognise it, never a megabyte.
QUOTE_MAX = 80


def quoted(value: object) -> str:
    """``repr(value)`` for a message, cut to ``QUOTE_MAX`` characters with its length said."""
    text = repr(value)
    if len(text) <= QUOTE_MAX:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:QUOTE_MAX]}...{size}"


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages: object, array, string..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid network name, else raise InvalidNetwork."""
    if not NAME_PATTERN.fullmatch(name) or len(name) > NAME_MAX_LENGTH:
        raise InvalidNetwork(
            f"invalid network name {quoted(name)}: use 1 to {NAME_MAX_LENGTH} characters from "
            "[a-zA-Z0-9_.-], starting with a letter or digit"
        )
    return name


def is_dns_label(name: str) -> bool:
    return DNS_LABEL.fullmatch(name) is not None


def parse_aliases(value: str) -> tuple[str, ...]:
    """``SOCKETPLANE_ALIASES=a,b``: each a DNS label, kept lower case, each once, in order.

    InvalidNetwork (a 400) naming the first bad one: an alias the DNS server could never answer
    is refused at create, before anything is made, rather than silently ignored.
    """
    aliases: list[str] = []
    for item in value.split(","):
        alias = item.strip()
        if not is_dns_label(alias):
            raise InvalidNetwork(
                f"invalid alias {quoted(alias)} in SOCKETPLANE_ALIASES: each alias must be a "
                "DNS label, 1 to 63 characters from [a-zA-Z0-9-], not beginning or ending "
                "with '-'")
        if alias.lower() not in aliases:
            aliases.append(alias.lower())
    return tuple(aliases)


def parse_cidr(value: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    """Parse a CIDR as socketplane users typed it: return (subnet, gateway).

    ``10.0.6.1/24``, ``10.0.6.0/24`` and ``10.0.6.9/24`` all mean subnet 10.0.6.0/24: the host
    bits are ignored and the gateway is the subnet's first host address (.1).
    """
    text = value.strip()
    if "/" not in text:
        raise InvalidNetwork(
            f"invalid CIDR {quoted(value)}: expected ADDRESS/PREFIX, e.g. 10.0.6.0/24")
    try:
        interface = ipaddress.ip_interface(text)
    except ValueError:
        raise InvalidNetwork(
            f"invalid CIDR {quoted(value)}: expected an IPv4 ADDRESS/PREFIX, e.g. 10.0.6.0/24"
        ) from None
    if not isinstance(interface, ipaddress.IPv4Interface):
        raise InvalidNetwork(f"invalid CIDR {quoted(value)}: only IPv4 networks are supported")
    subnet = interface.network
    if not PREFIX_MIN <= subnet.prefixlen <= PREFIX_MAX:
        raise InvalidNetwork(
            f"invalid CIDR {quoted(value)}: prefix /{subnet.prefixlen} is out of range; "
            f"use /{PREFIX_MIN} to /{PREFIX_MAX}"
        )
    return subnet, subnet.network_address + 1


def parse_gateway(value: str, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """Validate an explicit gateway: a usable host address inside ``subnet``."""
    try:
        gateway = ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise InvalidNetwork(
            f"invalid gateway {quoted(value)}: expected an IPv4 address") from None
    if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
        raise InvalidNetwork(
            f"invalid gateway {quoted(value)}: must be a host address inside {subnet}"
        )
    return gateway


def validate_vni(vni: int) -> int:
    if not VNI_MIN <= vni <= VNI_MAX:
        raise InvalidNetwork(f"invalid VNI {vni}: use {VNI_MIN} to {VNI_MAX}")
    return vni


def validate_mtu(mtu: int) -> int:
    if not MTU_MIN <= mtu <= MTU_MAX:
        raise InvalidNetwork(f"invalid MTU {mtu}: use {MTU_MIN} to {MTU_MAX}")
    return mtu


def name_for_subnet(subnet: ipaddress.IPv4Network) -> str:
    """The name a network created from SOCKETPLANE_CIDR gets: ``net-10.0.6.0-24``."""
    return f"net-{subnet.network_address}-{subnet.prefixlen}"


def mac_for_ip(ip: str) -> str:
    """The MAC an endpoint gets from its IPv4 address (Docker's scheme): 02:42 + the 4 octets."""
    packed = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{octet:02x}" for octet in packed)


def gateway_mac(vni: int) -> str:
    """The MAC of a network's gateway, the same on every host: 02:70:70 + the 24-bit VNI.

    Containers keep the gateway's ARP entry when they are moved or a host's gateway port is
    re-made, and no container MAC (02:42:...) can equal it.
    """
    return "02:70:70:" + ":".join(f"{(validate_vni(vni) >> shift) & 0xff:02x}"
                                  for shift in (16, 8, 0))


def router_mac(host_id: str) -> str:
    """The source MAC of frames a host routes into a connected network on another host:
    02:71 + 4 bytes of a digest of the host's id. Not the gateway MAC, which every host
    shares: a bridge that learned it on a tunnel would send its own containers' traffic for
    their gateway there."""
    digest = hashlib.sha256(host_id.encode()).digest()
    return "02:71:" + ":".join(f"{byte:02x}" for byte in digest[:4])


def _record(data: object) -> Mapping[str, Any]:
    """A stored record's fields; ValueError when it is not a JSON object at all."""
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {json_type(data)}")
    return data


def _require(data: Mapping[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    # JSON true is no number, whatever Python's bool says.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {key!r} missing or not {kind.__name__}")
    return value


def _timestamp(data: Mapping[str, Any]) -> float:
    value = data.get("created") or 0.0
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"field 'created' is {json_type(value)}, not a number")
    return float(value)


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """A network someone asked for, validated once where the request came in.

    ``powerplane network create`` and ``SOCKETPLANE_CIDR`` both end here; everything below takes
    this value (or the ``Network`` it becomes) and never parses a CIDR again.
    """

    name: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    vni: int | None = None
    mtu: int | None = None
    internal: bool = False  # no way out: the host never forwards its traffic off the overlay

    @classmethod
    def parse(
        cls,
        name: str,
        cidr: str,
        *,
        gateway: str | None = None,
        vni: int | None = None,
        mtu: int | None = None,
        internal: bool = False,
    ) -> NetworkSpec:
        """Validate what a user typed; InvalidNetwork names the first thing that is wrong."""
        validate_name(name)
        subnet, default_gateway = parse_cidr(cidr)
        gateway_ip = default_gateway if gateway is None else parse_gateway(gateway, subnet)
        if vni is not None:
            validate_vni(vni)
        if mtu is not None:
            validate_mtu(mtu)
        return cls(name, subnet, gateway_ip, vni, mtu, internal)

    @classmethod
    def for_subnet(cls, subnet: ipaddress.IPv4Network) -> NetworkSpec:
        """The network SOCKETPLANE_CIDR creates on first use: named after it, gateway .1."""
        return cls(name_for_subnet(subnet), subnet, subnet.network_address + 1)

    def network(self, vni: int, *, created: float | None = None) -> Network:
        """The network record this spec becomes once its VNI is chosen."""
        return Network(
            name=self.name,
            cidr=str(self.subnet),
            gateway=str(self.gateway),
            vni=validate_vni(vni),
            mtu=self.mtu,
            internal=self.internal,
            created=time.time() if created is None else created,
        )


@dataclass(frozen=True, slots=True)
class Network:
    """A virtual network that spans every host: one subnet, one VXLAN VNI.

    ``cidr`` and ``gateway`` are kept as stored in Consul; ``subnet`` is parsed from ``cidr``
    once, when the record is made, for the address arithmetic IPAM does on every allocation.
    """

    name: str
    cidr: str
    gateway: str
    vni: int
    mtu: int | None = None
    internal: bool = False
    created: float = field(default_factory=time.time)
    subnet: ipaddress.IPv4Network = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "subnet", ipaddress.IPv4Network(self.cidr))

    @classmethod
    def build(
        cls,
        name: str,
        cidr: str,
        *,
        gateway: str | None = None,
        vni: int,
        mtu: int | None = None,
        internal: bool = False,
        created: float | None = None,
    ) -> Network:
        """A validated network; the CIDR is normalised to its subnet (host bits dropped)."""
        return NetworkSpec.parse(name, cidr, gateway=gateway, mtu=mtu,
                                 internal=internal).network(vni, created=created)

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    @property
    def gateway_cidr(self) -> str:
        """The gateway with the prefix length, as an interface address: ``10.0.6.1/24``."""
        return f"{self.gateway}/{self.prefixlen}"

    @property
    def size(self) -> int:
        """How many host addresses the subnet has (network and broadcast excluded)."""
        return self.subnet.num_addresses - 2

    @property
    def capacity(self) -> int:
        """How many addresses can be handed to containers (the gateway excluded too)."""
        return self.size - 1

    def host_address(self, offset: int) -> str:
        """The ``offset``-th host address (0 → first after the network address)."""
        if not 0 <= offset < self.size:
            raise IndexError(offset)
        return str(self.subnet.network_address + 1 + offset)

    def host_offset(self, ip: str) -> int:
        return int(ipaddress.IPv4Address(ip)) - int(self.subnet.network_address) - 1

    def is_assignable(self, ip: str) -> bool:
        """True for addresses a container may get: inside, not network/broadcast/gateway."""
        address = ipaddress.IPv4Address(ip)
        subnet = self.subnet
        return (
            address in subnet
            and address not in (subnet.network_address, subnet.broadcast_address)
            and str(address) != self.gateway
        )

    def assignable(self, start: int = 0) -> Iterator[str]:
        """Assignable addresses in order, beginning at host offset ``start`` and wrapping."""
        size = self.size
        for step in range(size):
            ip = self.host_address((start + step) % size)
            if ip != self.gateway:
                yield ip

    def overlaps(self, other: Network | ipaddress.IPv4Network) -> bool:
        subnet = other.subnet if isinstance(other, Network) else other
        return self.subnet.overlaps(subnet)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cidr": self.cidr,
            "gateway": self.gateway,
            "vni": self.vni,
            "mtu": self.mtu,
            "internal": self.internal,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: object) -> Network:
        """The network a stored record describes; ValueError naming what is wrong with it.

        A record is held to the rules a creation checked (name, subnet, gateway, VNI), so a
        record damaged in Consul is refused here and never reaches IPAM or the data plane.
        """
        fields = _record(data)
        mtu = fields.get("mtu")
        if not isinstance(mtu, int) or isinstance(mtu, bool):
            mtu = None
        name, cidr = _require(fields, "name", str), _require(fields, "cidr", str)
        gateway, vni = _require(fields, "gateway", str), _require(fields, "vni", int)
        try:
            spec = NetworkSpec.parse(name, cidr, gateway=gateway, vni=vni, mtu=mtu)
        except InvalidNetwork as exc:
            raise ValueError(exc.message) from None
        if str(spec.subnet) != cidr:
            raise ValueError(f"field 'cidr' {quoted(cidr)} is not a subnet address")
        return cls(
            name=name,
            cidr=cidr,
            gateway=gateway,
            vni=vni,
            mtu=mtu,
            # Records written before networks could be internal have no such field.
            internal=fields.get("internal") is True,
            created=_timestamp(fields),
        )


@dataclass(frozen=True, slots=True)
class AddressRecord:
    """Who holds one address of a network; stored under ``addresses/<network>/<ip>``."""

    ip: str
    container: str
    host: str
    mac: str
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "host": self.host,
            "mac": self.mac,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, ip: str, data: object) -> AddressRecord:
        """ValueError when the record is not an object or its fields have the wrong types."""
        fields = _record(data)
        return cls(
            ip=ip,
            container=_optional_text(fields, "container"),
            host=_optional_text(fields, "host"),
            mac=_optional_text(fields, "mac"),
            created=_timestamp(fields),
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One container's attachment to a network on one host."""

    container_id: str
    network: str
    ip: str
    mac: str
    host: str
    port: str  # OVS port name on this host's bridge
    sandbox: str = ""  # id of the network-only sandbox container holding the namespace
    # What the DNS server answers for this endpoint; "" and () in records made before names.
    name: str = ""  # the Docker container name, without Docker's leading '/'
    hostname: str = ""  # the host name the container has (the sandbox's)
    aliases: tuple[str, ...] = ()  # SOCKETPLANE_ALIASES, lower case
    groups: tuple[str, ...] = ()  # SOCKETPLANE_GROUPS: security groups; () accepts all

    def to_json(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "ip": self.ip,
            "mac": self.mac,
            "host": self.host,
            "port": self.port,
            "sandbox": self.sandbox,
            "name": self.name,
            "hostname": self.hostname,
            "aliases": list(self.aliases),
            "groups": list(self.groups),
        }

    @property
    def dns_names(self) -> tuple[str, ...]:
        """Every name this endpoint answers to, lower case, each once; not all need be
        DNS labels (a Docker name may hold '_' or '.'), the server only looks them up."""
        found: list[str] = []
        for name in (self.name, self.hostname, *self.aliases):
            if name and name.lower() not in found:
                found.append(name.lower())
        return tuple(found)

    @classmethod
    def from_json(cls, container_id: str, data: object) -> Endpoint:
        """ValueError when the record is not an object or its fields have the wrong types."""
        fields = _record(data)
        return cls(
            container_id=container_id,
            network=_require(fields, "network", str),
            ip=_require(fields, "ip", str),
            mac=_optional_text(fields, "mac"),
            host=_optional_text(fields, "host"),
            port=_optional_text(fields, "port"),
            sandbox=_optional_text(fields, "sandbox"),
            name=_optional_text(fields, "name"),
            hostname=_optional_text(fields, "hostname"),
            aliases=_text_list(fields, "aliases"),
            groups=_text_list(fields, "groups"),
        )


@dataclass(frozen=True, slots=True)
class FloatingIP:
    """An outside address claimed in Consul (``floating/<ip>``), attached to one container or
    to none. The host that runs the container answers for it on the underlay."""

    ip: str
    container: str = ""  # the app container's id; "" while detached
    host: str = ""
    network: str = ""
    container_ip: str = ""
    created: float = field(default_factory=time.time)

    @property
    def attached(self) -> bool:
        return bool(self.container)

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "container": self.container, "host": self.host,
                "network": self.network, "container_ip": self.container_ip,
                "created": self.created}

    @classmethod
    def from_json(cls, ip: str, data: object) -> FloatingIP:
        """ValueError when the record is damaged; an attached one must name a valid address."""
        fields = _record(data)
        try:
            address = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise ValueError(f"key {quoted(ip)} is not an IPv4 address") from None
        record = cls(ip=address, container=_optional_text(fields, "container"),
                     host=_optional_text(fields, "host"),
                     network=_optional_text(fields, "network"),
                     container_ip=_optional_text(fields, "container_ip"),
                     created=_timestamp(fields))
        if record.attached:
            try:
                ipaddress.IPv4Address(record.container_ip)
            except ValueError:
                raise ValueError(f"field 'container_ip' {quoted(record.container_ip)} is not "
                                 "an IPv4 address") from None
        return record


@dataclass(frozen=True, slots=True)
class Host:
    """A host running ``powerplane serve``; tunnels from other hosts end at ``underlay_ip``.

    ``underlay_mac`` is the MAC behind that address, so that a userspace datapath can send the
    first frame to this host without resolving it first (adapter/dataplane/vswitchd.py).
    """

    host_id: str
    underlay_ip: str
    hostname: str
    version: str
    underlay_mac: str = ""

    def to_json(self) -> dict[str, Any]:
        document = {"underlay_ip": self.underlay_ip, "hostname": self.hostname,
                    "version": self.version}
        if self.underlay_mac:
            document["underlay_mac"] = self.underlay_mac
        return document

    @classmethod
    def from_json(cls, host_id: str, data: object) -> Host:
        """ValueError when the record is not an object or its underlay address is no IP
        address: tunnels are built to it. A host without an underlay address has ""."""
        fields = _record(data)
        underlay_ip = _require(fields, "underlay_ip", str)
        if underlay_ip:
            try:
                ipaddress.ip_address(underlay_ip)
            except ValueError:
                raise ValueError(
                    f"field 'underlay_ip' {quoted(underlay_ip)} is not an IP address") from None
        return cls(
            host_id=host_id,
            underlay_ip=underlay_ip,
            hostname=_optional_text(fields, "hostname"),
            version=_optional_text(fields, "version"),
            underlay_mac=_mac_or_nothing(fields.get("underlay_mac")),
        )


MAC_PATTERN = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


def _mac_or_nothing(value: object) -> str:
    # Only an optimisation rides on it (the first packet to that host): a bad one is dropped
    # rather than the whole host record, which tunnels depend on.
    return value if isinstance(value, str) and MAC_PATTERN.fullmatch(value) else ""


def _text_list(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"field {key!r} is {json_type(value)}, not an array of strings")
    return tuple(value)


def _optional_text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is {json_type(value)}, not a string")
    return value
