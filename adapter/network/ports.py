"""Published and exposed ports of an overlay container: what a create asks for, what it got.

Docker refuses ``-p``, ``-P`` and ``--expose`` with a container network mode, so a create's
``HostConfig.PortBindings``, ``HostConfig.PublishAllPorts`` and ``ExposedPorts`` are read here
once (``PortRequest.parse``) and taken off what Docker gets. Once host ports are chosen
(``adapter.network.port_claims``) they are recorded on the app as one label, ``PublishedPorts``
encoded; the inspect and list hooks and the firewall read it back with ``PublishedPorts.decode``,
which refuses anything malformed: anyone can set labels.

The label is compact JSON in ``docker run``'s own notation, consecutive ports run together:

    {"published":["8080:80/tcp","127.0.0.1:18100-18102:80-82/tcp"],"exposed":["80-82/tcp"]}

Pure values and parsing; no I/O.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from adapter.errors import BadRequest
from adapter.model import json_type, quoted

PROTOCOLS = ("tcp", "udp")
PORT_MIN, PORT_MAX = 1, 65535
# Every port of both protocols: more cannot be distinct, and it bounds what a request or a
# forged label can make us expand.
PORTS_MAX = 2 * PORT_MAX
ALL_ADDRESSES = "0.0.0.0"

# "80/tcp", "80" (tcp), "80-82/udp": a port or range of ports, then the protocol.
_PORT_KEY = re.compile(r"(?P<first>[0-9]{1,5})(?:-(?P<last>[0-9]{1,5}))?(?:/(?P<proto>.*))?",
                       re.ASCII | re.DOTALL)
_HOST_PORTS = re.compile(r"(?P<first>[0-9]{1,5})(?:-(?P<last>[0-9]{1,5}))?", re.ASCII)
_LABEL_PUBLISHED = re.compile(
    r"(?:(?P<ip>[0-9.]{7,15}):)?(?P<host>[0-9]{1,5}(?:-[0-9]{1,5})?)"
    r":(?P<container>[0-9]{1,5}(?:-[0-9]{1,5})?)/(?P<proto>tcp|udp)", re.ASCII)
_LABEL_EXPOSED = re.compile(r"(?P<ports>[0-9]{1,5}(?:-[0-9]{1,5})?)/(?P<proto>tcp|udp)",
                            re.ASCII)


@dataclass(frozen=True, slots=True, order=True)
class PortBinding:
    """One host port forwarded to one port of the container."""

    proto: str  # "tcp" | "udp"
    host_ip: str  # "" = every address of this host
    host_port: int
    container_port: int

    @property
    def address(self) -> str:
        """The host address as Docker prints it: 0.0.0.0 for every address."""
        return self.host_ip or ALL_ADDRESSES

    def collides(self, other: PortBinding) -> bool:
        """True when both cannot be published at once: one host port of one protocol, on the
        same address or on every address (Docker's rule)."""
        return (self.host_port == other.host_port and self.proto == other.proto
                and (not self.host_ip or not other.host_ip or self.host_ip == other.host_ip))


@dataclass(frozen=True, slots=True)
class RequestedBinding:
    """One binding as a create asks for it: a fixed host port, the first free one of a range,
    or (``host_ports`` None) any free one, as Docker picks from its ephemeral range."""

    proto: str
    host_ip: str
    host_ports: tuple[int, int] | None
    container_port: int


@dataclass(frozen=True, slots=True)
class PortRequest:
    """What a create asks for: bindings (``-p``), publish-all (``-P``), exposed ports.

    ``exposed`` holds (port, protocol) pairs: ``ExposedPorts`` and every port that has a
    binding, as Docker counts them.
    """

    bindings: tuple[RequestedBinding, ...] = ()
    exposed: frozenset[tuple[int, str]] = frozenset()
    publish_all: bool = False

    @property
    def publishes(self) -> bool:
        """True when the create asks for any host port (``-p`` or ``-P``)."""
        return bool(self.bindings) or self.publish_all

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> PortRequest:
        """The ports a create body asks for; BadRequest naming the first thing wrong."""
        host_config = body.get("HostConfig") or {}
        publish_all = host_config.get("PublishAllPorts")
        if publish_all is not None and not isinstance(publish_all, bool):
            raise BadRequest(f"HostConfig.PublishAllPorts must be a boolean, got "
                             f"{json_type(publish_all)}")
        exposed: set[tuple[int, str]] = set()
        # Counted as expanded, duplicates included: distinct keys can name the same ports
        # ("80", "080/tcp", "1-65535"), and the work is what must stay bounded.
        named = 0
        for key in _object(body.get("ExposedPorts"), "ExposedPorts"):
            ports = _port_key(key, "ExposedPorts")
            named += len(ports)
            _at_most(named, "exposed ports")
            exposed.update(ports)
        bindings: list[RequestedBinding] = []
        port_bindings = _object(host_config.get("PortBindings"), "HostConfig.PortBindings")
        for key, entries in port_bindings.items():
            where = f"HostConfig.PortBindings[{quoted(key)}]"
            ports = _port_key(key, where)
            named += len(ports)
            _at_most(named, "exposed ports")
            exposed.update(ports)
            if entries is None:
                continue
            if not isinstance(entries, list):
                raise BadRequest(f"{where} must be an array of bindings, got "
                                 f"{json_type(entries)}")
            for index, entry in enumerate(entries):
                bindings.extend(_bindings(ports, entry, f"{where}[{index}]"))
                _at_most(len(bindings), "published ports")
        return cls(tuple(bindings), frozenset(exposed), bool(publish_all))

    def wanted(self, image_exposed: Iterable[tuple[int, str]] = ()) -> tuple[
            tuple[RequestedBinding, ...], frozenset[tuple[int, str]]]:
        """(bindings, exposed) once ``-P`` is applied: every exposed port, the image's
        included, that has no binding of its own gets any free host port."""
        if not self.publish_all:
            return self.bindings, self.exposed
        exposed = self.exposed | frozenset(image_exposed)
        bound = {(b.container_port, b.proto) for b in self.bindings}
        extra = tuple(RequestedBinding(proto, "", None, port)
                      for port, proto in sorted(exposed - bound, key=_by_proto))
        return self.bindings + extra, exposed


def image_exposed_ports(config: Mapping[str, Any] | None) -> frozenset[tuple[int, str]]:
    """The ports an image's config exposes, those that can be published on an overlay;
    anything unreadable is left out (an image is not the request's fault)."""
    exposed = (config or {}).get("ExposedPorts")
    found: set[tuple[int, str]] = set()
    if isinstance(exposed, Mapping):
        for key in exposed:
            try:
                found.update(_port_key(key, "image ExposedPorts"))
            except BadRequest:
                continue
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class PublishedPorts:
    """What an overlay app got: its bindings, host ports chosen, and its exposed ports.

    The value of the ports label (``encode``, ``decode``) and the fields Docker's inspect and
    list answers show for them.
    """

    bindings: tuple[PortBinding, ...] = ()
    exposed: frozenset[tuple[int, str]] = frozenset()

    def __post_init__(self) -> None:
        # In one order, whatever order they were chosen in: equal ports are equal values.
        object.__setattr__(self, "bindings", tuple(sorted(self.bindings)))

    def __bool__(self) -> bool:
        return bool(self.bindings or self.exposed)

    def encode(self) -> str:
        document = {
            "published": [_published_text(run) for run in _binding_runs(self.bindings)],
            "exposed": [_exposed_text(run) for run in _exposed_runs(self.exposed)],
        }
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> PublishedPorts:
        """The label's value read back; ValueError naming what is wrong with it."""
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(document, dict):
            raise ValueError(f"expected a JSON object, got {json_type(document)}")
        bindings: list[PortBinding] = []
        for item in _text_list(document, "published"):
            bindings.extend(_decode_published(item, room=PORTS_MAX - len(bindings)))
        exposed: set[tuple[int, str]] = set()
        named = 0
        for item in _text_list(document, "exposed"):
            match = _LABEL_EXPOSED.fullmatch(item)
            if match is None:
                raise ValueError(f"exposed port {quoted(item)} is not PORT[-PORT]/tcp|udp")
            first, last = _range(match["ports"])
            named += last - first + 1
            if named > PORTS_MAX:
                raise ValueError(f"more than {PORTS_MAX} exposed ports")
            exposed.update((port, match["proto"]) for port in range(first, last + 1))
        return cls(tuple(bindings), frozenset(exposed))

    def port_bindings(self) -> dict[str, list[dict[str, str]]]:
        """``HostConfig.PortBindings``: {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}."""
        shown: dict[str, list[dict[str, str]]] = {}
        for binding in self.bindings:
            shown.setdefault(f"{binding.container_port}/{binding.proto}", []).append(
                {"HostIp": binding.host_ip, "HostPort": str(binding.host_port)})
        return shown

    def exposed_ports(self) -> dict[str, dict[str, Any]]:
        """``Config.ExposedPorts``: {"80/tcp": {}}."""
        return {f"{port}/{proto}": {} for port, proto in sorted(self.exposed, key=_by_proto)}

    def network_ports(self) -> dict[str, list[dict[str, str]] | None]:
        """``NetworkSettings.Ports``, what ``docker port`` reads: the bindings of each exposed
        port, null for a port exposed and not published."""
        shown: dict[str, list[dict[str, str]] | None] = dict.fromkeys(self.exposed_ports())
        for binding in self.bindings:
            entries = shown.get(f"{binding.container_port}/{binding.proto}") or []
            entries.append({"HostIp": binding.address, "HostPort": str(binding.host_port)})
            shown[f"{binding.container_port}/{binding.proto}"] = entries
        return shown

    def listed_ports(self) -> list[dict[str, Any]]:
        """The ``Ports`` of a container listing, what ``docker ps`` prints."""
        bound = {(b.container_port, b.proto) for b in self.bindings}
        listed: list[dict[str, Any]] = [
            {"IP": b.address, "PrivatePort": b.container_port, "PublicPort": b.host_port,
             "Type": b.proto} for b in self.bindings]
        listed.extend({"PrivatePort": port, "Type": proto}
                      for port, proto in sorted(self.exposed - bound, key=_by_proto))
        return listed


# -- parsing a request ----------------------------------------------------------------------


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest(f"{field} must be an object, got {json_type(value)}")
    return value


def _at_most(count: int, what: str) -> None:
    if count > PORTS_MAX:
        raise BadRequest(f"too many {what}: at most {PORTS_MAX} (every port of tcp and udp)")


def _port_key(key: str, where: str) -> list[tuple[int, str]]:
    """The (port, protocol) pairs a key such as ``80/tcp`` or ``80-82/udp`` names."""
    match = _PORT_KEY.fullmatch(key)
    if match is None:
        raise BadRequest(f"{where}: invalid port {quoted(key)}: expected PORT[/PROTOCOL] such "
                         "as 80/tcp")
    proto = _protocol(match["proto"], key, where)
    first, last = _checked_range(match["first"], match["last"], key, where)
    return [(port, proto) for port in range(first, last + 1)]


def _protocol(text: str | None, key: str, where: str) -> str:
    proto = "tcp" if text is None else text.lower()
    if proto == "sctp":
        raise BadRequest(f"{where}: {quoted(key)}: sctp is not supported on overlay networks; "
                         "publish tcp or udp")
    if proto not in PROTOCOLS:
        raise BadRequest(f"{where}: invalid protocol in {quoted(key)}: use tcp or udp")
    return proto


def _checked_range(first_text: str, last_text: str | None, value: str,
                   where: str) -> tuple[int, int]:
    first = int(first_text)
    last = first if last_text is None else int(last_text)
    if not PORT_MIN <= first <= last <= PORT_MAX:
        raise BadRequest(f"{where}: invalid port {quoted(value)}: ports are {PORT_MIN} to "
                         f"{PORT_MAX}, a range low-high")
    return first, last


def _bindings(ports: list[tuple[int, str]], entry: Any, where: str) -> Iterator[RequestedBinding]:
    """The bindings one ``{"HostIp": ..., "HostPort": ...}`` entry makes for ``ports``."""
    if not isinstance(entry, Mapping):
        raise BadRequest(f"{where} must be an object with HostIp and HostPort, got "
                         f"{json_type(entry)}")
    host_ip = _host_ip(entry.get("HostIp"), f"{where}.HostIp")
    host_ports = _host_ports(entry.get("HostPort"), f"{where}.HostPort")
    if host_ports is None:
        yield from (RequestedBinding(proto, host_ip, None, port) for port, proto in ports)
        return
    first, last = host_ports
    if len(ports) == 1:
        port, proto = ports[0]
        yield RequestedBinding(proto, host_ip, host_ports, port)
        return
    if last - first + 1 != len(ports):
        raise BadRequest(f"{where}.HostPort: {first}-{last} has {last - first + 1} ports for "
                         f"{len(ports)} container ports: a range maps port by port")
    for offset, (port, proto) in enumerate(ports):
        yield RequestedBinding(proto, host_ip, (first + offset, first + offset), port)


def _host_ip(value: Any, where: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string, got {json_type(value)}")
    if ":" in value:
        raise BadRequest(f"{where}: {quoted(value)}: IPv6 host addresses are not supported; "
                         "overlay networks are IPv4 only (give an IPv4 address or none)")
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise BadRequest(f"{where}: invalid host IP {quoted(value)}: expected an IPv4 "
                         "address") from None
    return "" if address.is_unspecified else str(address)


def _host_ports(value: Any, where: str) -> tuple[int, int] | None:
    """(first, last) host ports, or None for any free port (empty, or Docker's "0")."""
    if value is None or value in ("", "0"):
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string, got {json_type(value)}")
    match = _HOST_PORTS.fullmatch(value)
    if match is None:
        raise BadRequest(f"{where}: invalid host port {quoted(value)}: expected PORT or "
                         "PORT-PORT")
    return _checked_range(match["first"], match["last"], value, where)


# -- the label ------------------------------------------------------------------------------


def _by_proto(item: tuple[int, str]) -> tuple[str, int]:
    return item[1], item[0]


def _binding_runs(bindings: Iterable[PortBinding]) -> list[tuple[PortBinding, int]]:
    """(first binding, count) of each run of (sorted) bindings whose host and container ports
    both count up by one."""
    runs: list[tuple[PortBinding, int]] = []
    for binding in bindings:
        if runs:
            first, count = runs[-1]
            if (binding.proto, binding.host_ip) == (first.proto, first.host_ip) \
                    and binding.host_port == first.host_port + count \
                    and binding.container_port == first.container_port + count:
                runs[-1] = (first, count + 1)
                continue
        runs.append((binding, 1))
    return runs


def _exposed_runs(exposed: Iterable[tuple[int, str]]) -> list[tuple[int, int, str]]:
    runs: list[tuple[int, int, str]] = []
    for port, proto in sorted(exposed, key=_by_proto):
        if runs and runs[-1][2] == proto and runs[-1][1] == port - 1:
            runs[-1] = (runs[-1][0], port, proto)
        else:
            runs.append((port, port, proto))
    return runs


def _span(first: int, count: int) -> str:
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


def _published_text(run: tuple[PortBinding, int]) -> str:
    first, count = run
    address = f"{first.host_ip}:" if first.host_ip else ""
    return (f"{address}{_span(first.host_port, count)}:{_span(first.container_port, count)}"
            f"/{first.proto}")


def _exposed_text(run: tuple[int, int, str]) -> str:
    first, last, proto = run
    return f"{_span(first, last - first + 1)}/{proto}"


def _text_list(document: Mapping[str, Any], key: str) -> list[str]:
    items = document.get(key, [])
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{key!r} must be an array of strings")
    return items


def _range(text: str) -> tuple[int, int]:
    first_text, _, last_text = text.partition("-")
    first, last = int(first_text), int(last_text or first_text)
    if not PORT_MIN <= first <= last <= PORT_MAX:
        raise ValueError(f"port range {quoted(text)} is out of {PORT_MIN}-{PORT_MAX}")
    return first, last


def _decode_published(item: str, *, room: int) -> list[PortBinding]:
    """The bindings one ``[IP:]HOST:CONTAINER/proto`` names; ValueError past ``room`` of them."""
    match = _LABEL_PUBLISHED.fullmatch(item)
    if match is None:
        raise ValueError(f"published port {quoted(item)} is not [IP:]HOST:CONTAINER/tcp|udp")
    host_ip = match["ip"] or ""
    if host_ip:
        try:
            if ipaddress.IPv4Address(host_ip).is_unspecified:
                host_ip = ""
        except ValueError:
            raise ValueError(f"published port {quoted(item)}: bad host IP") from None
    host_first, host_last = _range(match["host"])
    container_first, container_last = _range(match["container"])
    if host_last - host_first != container_last - container_first:
        raise ValueError(f"published port {quoted(item)}: ranges of different lengths")
    if host_last - host_first + 1 > room:
        raise ValueError(f"more than {PORTS_MAX} published ports")
    return [PortBinding(match["proto"], host_ip, host_first + offset, container_first + offset)
            for offset in range(host_last - host_first + 1)]
