"""How a ``POST /containers/create`` body changes when the container joins an overlay network.

Pure functions over the JSON body Docker's API takes; no I/O. ``CreateRequest.parse`` reads the
body once, where it comes in: which network (``SOCKETPLANE_*``, the CIDR parsed here and nowhere
else), whether the options are compatible, which ports it publishes and exposes
(``adapter.network.ports``), what the sandbox takes over. It runs before anything is allocated,
so a request it rejects leaves nothing behind.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapter.errors import BadRequest, InvalidGroup, InvalidNetwork
from adapter.groups import parse_group_names
from adapter.model import (
    QUOTE_MAX,
    is_dns_label,
    json_type,
    parse_aliases,
    parse_cidr,
    quoted,
    validate_name,
)
from adapter.network.docker_api import SandboxSpec
from adapter.network.ports import PortRequest

CIDR_VAR = "SOCKETPLANE_CIDR"
NETWORK_VAR = "SOCKETPLANE_NETWORK"
ALIASES_VAR = "SOCKETPLANE_ALIASES"
GROUPS_VAR = "SOCKETPLANE_GROUPS"

LABEL_PREFIX = "io.powerplane."
LABEL_ROLE = LABEL_PREFIX + "role"  # "sandbox" on sandboxes
LABEL_SANDBOX = LABEL_PREFIX + "sandbox"  # on apps: the sandbox whose namespace they share
LABEL_NETWORK = LABEL_PREFIX + "network"
LABEL_CIDR = LABEL_PREFIX + "cidr"
LABEL_IP = LABEL_PREFIX + "ip"
LABEL_GATEWAY = LABEL_PREFIX + "gateway"
LABEL_MAC = LABEL_PREFIX + "mac"
LABEL_PORT = LABEL_PREFIX + "port"
LABEL_HOST = LABEL_PREFIX + "host"
LABEL_APP_NAME = LABEL_PREFIX + "app-name"
LABEL_CREATION = LABEL_PREFIX + "creation"  # on sandboxes: a token naming the create in flight
LABEL_PORTS = LABEL_PREFIX + "ports"  # on apps: -p/-P/--expose, as adapter.network.ports says
# On apps: what the DNS server answers for them besides their name (the create moves the
# hostname onto the sandbox, so the app's own Config no longer tells it).
LABEL_HOSTNAME = LABEL_PREFIX + "hostname"
LABEL_ALIASES = LABEL_PREFIX + "aliases"  # comma-separated, as SOCKETPLANE_ALIASES
LABEL_GROUPS = LABEL_PREFIX + "groups"  # on apps: comma-separated, as SOCKETPLANE_GROUPS
SANDBOX_ROLE = "sandbox"

# Network modes that mean "Docker's default"; anything else is the user's explicit choice.
DEFAULT_NETWORK_MODES = {"", "default", "bridge"}
# Docker's rule for container names (the sandbox is named after its app).
CONTAINER_NAME = re.compile(r"/?[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# HostConfig fields the sandbox takes over, each a list of strings.
SANDBOX_LISTS = ("Dns", "DnsSearch", "DnsOptions", "ExtraHosts")


@dataclass(frozen=True, slots=True)
class OverlayRequest:
    """What the client asked for through the SOCKETPLANE_* environment variables.

    ``cidr`` is the text as given (for messages); ``subnet`` is it parsed, once, on creation:
    a malformed value is refused here, before anything is allocated.
    """

    cidr: str | None
    network: str | None
    subnet: ipaddress.IPv4Network | None = field(
        init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "subnet", parse_cidr(self.cidr)[0] if self.cidr else None)
        if self.network is not None:
            validate_name(self.network)


def overlay_request(body: Mapping[str, Any]) -> OverlayRequest | None:
    """The overlay the container asks to join, or None when it asks for none."""
    env = body.get("Env")
    if env is None:
        return None
    if not isinstance(env, list):
        # Whether it names an overlay cannot be told; Docker itself would answer a 500.
        raise BadRequest(f"Env must be an array of KEY=value strings, got {json_type(env)}")
    values: dict[str, str] = {}
    for entry in env:
        if isinstance(entry, str) and "=" in entry:
            key, _, value = entry.partition("=")
            if key in (CIDR_VAR, NETWORK_VAR):
                values[key] = value.strip()
    if not values:
        return None
    for index, entry in enumerate(env):
        if not isinstance(entry, str):
            raise BadRequest(f"Env[{index}] must be a KEY=value string, got {json_type(entry)}")
    cidr = values.get(CIDR_VAR) or None
    network = values.get(NETWORK_VAR) or None
    if cidr is None and network is None:
        raise BadRequest(f"{CIDR_VAR} or {NETWORK_VAR} is set but empty: give a subnet such as "
                         f"10.0.6.0/24 or the name of a network")
    return OverlayRequest(cidr=cidr, network=network)


def aliases_label(labels: Mapping[str, str]) -> tuple[str, ...]:
    """The aliases an app's label holds; a label anyone could have set is checked again, and
    one that does not hold DNS labels gives none."""
    text = labels.get(LABEL_ALIASES) or ""
    try:
        return parse_aliases(text) if text.strip() else ()
    except InvalidNetwork:
        return ()


def aliases_of(body: Mapping[str, Any]) -> tuple[str, ...]:
    """``SOCKETPLANE_ALIASES=a,b`` of an overlay create (its Env already checked), validated."""
    for entry in body.get("Env") or ():
        key, _, value = entry.partition("=")
        if key == ALIASES_VAR and value.strip():
            return parse_aliases(value)
    return ()


def groups_label(labels: Mapping[str, str]) -> tuple[str, ...]:
    """The security groups an app's label holds (checked again: anyone can set a label; one
    that does not hold group names gives none)."""
    text = labels.get(LABEL_GROUPS) or ""
    try:
        return parse_group_names(text)
    except InvalidGroup:
        return ()


def groups_of(body: Mapping[str, Any]) -> tuple[str, ...]:
    """``SOCKETPLANE_GROUPS=web,admin`` of an overlay create (its Env already checked): the
    names, validated (whether the groups exist is the caller's consistent read)."""
    for entry in body.get("Env") or ():
        key, _, value = entry.partition("=")
        if key == GROUPS_VAR:
            try:
                return parse_group_names(value)
            except InvalidGroup as exc:
                raise InvalidGroup(f"{GROUPS_VAR}: {exc.message}") from None
    return ()


def _of_type(value: Any, kind: type | tuple[type, ...], field: str, expected: str) -> Any:
    """``value`` if it is null or of ``kind``; BadRequest naming ``field`` otherwise."""
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise BadRequest(f"{field} must be {expected}, got {json_type(value)}")
    return value


def _host_config(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return _of_type(body.get("HostConfig"), Mapping, "HostConfig", "an object") or {}


def check_types(body: Mapping[str, Any], *, app_name: str | None) -> None:
    """Refuse, before anything is allocated, wrong types in the fields the overlay reads or
    rewrites; Docker would refuse them only after the sandbox exists, some with a 500."""
    host_config = _host_config(body)
    _of_type(host_config.get("NetworkMode"), str, "HostConfig.NetworkMode", "a string")
    restart = _of_type(host_config.get("RestartPolicy"), Mapping, "HostConfig.RestartPolicy",
                       "an object") or {}
    _of_type(restart.get("Name"), str, "HostConfig.RestartPolicy.Name", "a string")
    for name in SANDBOX_LISTS:
        items = _of_type(host_config.get(name), list, f"HostConfig.{name}",
                         "an array of strings") or []
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise BadRequest(f"HostConfig.{name}[{index}] must be a string, got "
                                 f"{json_type(item)}")
    for name in ("Hostname", "Domainname"):
        _of_type(body.get(name), str, name, "a string")
    labels = _of_type(body.get("Labels"), Mapping, "Labels", "an object of strings") or {}
    for key, value in labels.items():
        if not isinstance(value, str):
            raise BadRequest(f"Labels[{quoted(key)}] must be a string, got {json_type(value)}")
    if app_name is not None and not CONTAINER_NAME.fullmatch(app_name):
        raise BadRequest(f"invalid container name {quoted(app_name)}: only "
                         "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at least 2 characters")


def check_compatible(body: Mapping[str, Any]) -> None:
    """Refuse options that cannot work when the container shares a sandbox's network."""
    host_config = _host_config(body)
    mode = _of_type(host_config.get("NetworkMode"), str, "HostConfig.NetworkMode",
                    "a string") or ""
    if mode not in DEFAULT_NETWORK_MODES:
        raise BadRequest(f"{CIDR_VAR}/{NETWORK_VAR} puts the container on an overlay network; "
                         f"it cannot also use --network {mode[:QUOTE_MAX]}")
    if host_config.get("Links"):
        raise BadRequest("--link is not supported on an overlay network: containers reach each "
                         "other by overlay address")
    if body.get("MacAddress"):
        raise BadRequest("--mac-address cannot be set on an overlay network: the MAC address "
                         "is derived from the container's overlay IP")


def default_hostname(body: Mapping[str, Any], name: str | None) -> str | None:
    """The sandbox's host name, which Docker gives the app too (it copies the hostname of the
    container whose network it joins): the user's ``--hostname``, else the app's name when
    that is a DNS label, else None (Docker's default, the sandbox's short id).

    Why the name: Docker would give the app its own short id, but that id does not exist
    until after the sandbox is made, and a host name cannot be changed from outside a running
    container without reaching into its namespaces. The name is what the user chose and what
    the container resolves by anyway.
    """
    hostname = body.get("Hostname")
    if isinstance(hostname, str) and hostname:
        return hostname
    plain = (name or "").lstrip("/")
    return plain if is_dns_label(plain) else None


def sandbox_spec(body: Mapping[str, Any], *, image: str, name: str | None,
                 labels: Mapping[str, str], gateway: str | None = None) -> SandboxSpec:
    """The sandbox for this request: it takes the options Docker forbids on the app itself.

    Its resolver is the network's gateway (the DNS server of this host) unless the user gave
    ``--dns``: theirs are kept, as Docker keeps them on its own networks."""
    host_config = body.get("HostConfig") or {}
    restart = host_config.get("RestartPolicy") or {}
    # A sandbox must outlive restarts of its app; "no" and on-failure would let it stay dead.
    restart_policy = {"Name": "unless-stopped"} if restart.get("Name") in (
        "always", "unless-stopped", "on-failure") else {}
    return SandboxSpec(
        image=image,
        name=f"{name}-powerplane" if name else None,
        labels=dict(labels),
        hostname=default_hostname(body, name),
        domainname=body.get("Domainname") or None,
        dns=tuple(host_config.get("Dns") or ((gateway,) if gateway else ())),
        dns_search=tuple(host_config.get("DnsSearch") or ()),
        dns_options=tuple(host_config.get("DnsOptions") or ()),
        extra_hosts=tuple(host_config.get("ExtraHosts") or ()),
        restart_policy=restart_policy,
    )


def rewrite_create(body: Mapping[str, Any], *, sandbox_id: str,
                   labels: Mapping[str, str]) -> dict[str, Any]:
    """The create body Docker receives: sharing the sandbox's namespace, labelled."""
    rewritten = copy.deepcopy(dict(body))
    for moved in ("Hostname", "Domainname", "ExposedPorts", "MacAddress"):
        rewritten.pop(moved, None)
    host_config = dict(rewritten.get("HostConfig") or {})
    # Docker refuses published ports with a container network mode; the label carries them.
    for moved in ("Dns", "DnsSearch", "DnsOptions", "ExtraHosts", "PortBindings",
                  "PublishAllPorts"):
        host_config.pop(moved, None)
    host_config["NetworkMode"] = f"container:{sandbox_id}"
    rewritten["HostConfig"] = host_config
    rewritten.pop("NetworkingConfig", None)
    rewritten["Labels"] = {**(rewritten.get("Labels") or {}), **labels}
    return rewritten


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """One overlay create, read once at the edge; the layers below take this value."""

    overlay: OverlayRequest
    body: Mapping[str, Any]
    app_name: str | None
    ports: PortRequest = field(default_factory=PortRequest)
    aliases: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # SOCKETPLANE_GROUPS, names checked, existence not yet

    @property
    def name(self) -> str:
        """The container's name as Docker lists it without the '/', "" when Docker picks it."""
        return (self.app_name or "").lstrip("/")

    def hostname(self, sandbox_id: str) -> str:
        """The host name the app will have: Docker copies its sandbox's (``default_hostname``,
        or Docker's default, the sandbox's short id)."""
        return default_hostname(self.body, self.app_name) or sandbox_id[:12]

    @property
    def image(self) -> str | None:
        image = self.body.get("Image")
        return image if isinstance(image, str) and image else None

    @classmethod
    def parse(cls, body: Any, *, app_name: str | None) -> CreateRequest | None:
        """The overlay create ``body`` asks for; None when it asks for none (not our business).

        BadRequest or InvalidNetwork for a request that cannot work, before anything happens.
        """
        if body is None:
            return None  # Docker answers that a config is required
        if not isinstance(body, Mapping):
            raise BadRequest(f"the body of a container create must be a JSON object, got "
                             f"{json_type(body)}")
        overlay = overlay_request(body)
        if overlay is None:
            return None
        check_types(body, app_name=app_name)
        check_compatible(body)
        return cls(overlay, body, app_name, PortRequest.parse(body), aliases_of(body),
                   groups_of(body))

    def sandbox(self, *, image: str, labels: Mapping[str, str],
                gateway: str | None = None) -> SandboxSpec:
        return sandbox_spec(self.body, image=image, name=self.app_name, labels=labels,
                            gateway=gateway)

    def rewritten(self, *, sandbox_id: str, labels: Mapping[str, str]) -> dict[str, Any]:
        return rewrite_create(self.body, sandbox_id=sandbox_id, labels=labels)
