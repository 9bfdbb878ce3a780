"""Published ports as Docker lists them: the ports labels of this host's overlay apps.

Labels are immutable and travel with the container, so a listing of containers is all it takes
to know what this host publishes; no Consul read. Anyone can set labels, though, so a malformed
one is skipped with a warning, never raised: the port claims of a create and the firewall's
forwards (the host agent) both read listings through here.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from adapter import logs
from adapter.model import quoted
from adapter.network.create_rewrite import LABEL_HOST, LABEL_IP, LABEL_NETWORK, LABEL_PORTS
from adapter.network.ports import PortBinding, PublishedPorts

log = logging.getLogger(__name__)


class PortForward(NamedTuple):
    """One host port forwarded to one port of an overlay container, in the firewall's order."""

    proto: str  # "tcp" | "udp"
    host_ip: str  # "" = every address of this host
    host_port: int
    container_ip: str
    container_port: int


def _short(app: Mapping[str, Any]) -> str:
    return str(app.get("Id") or "?")[:12]


def _about(app: Mapping[str, Any]) -> dict[str, str]:
    labels = app.get("Labels")
    network = labels.get(LABEL_NETWORK) if isinstance(labels, Mapping) else None
    return logs.fields(container=str(app.get("Id") or ""),
                       network=network if isinstance(network, str) else None)


def labelled_ports(apps: Iterable[Mapping[str, Any]],
                   host_id: str) -> Iterator[tuple[Mapping[str, Any], PublishedPorts]]:
    """Each app of ``host_id`` whose ports label holds any port, with those ports decoded."""
    for app in apps:
        labels = app.get("Labels")
        if not isinstance(labels, Mapping) or labels.get(LABEL_HOST) != host_id:
            continue
        text = labels.get(LABEL_PORTS)
        if not text or not isinstance(text, str):
            continue
        try:
            ports = PublishedPorts.decode(text)
        except ValueError as exc:
            log.warning("container %s: ignoring its label %s=%s: %s", _short(app), LABEL_PORTS,
                        quoted(text), exc, extra=_about(app))
            continue
        if ports:
            yield app, ports


def published_ports(apps: Iterable[Mapping[str, Any]], host_id: str) -> list[PortForward]:
    """What this host forwards: the published ports of the overlay apps of ``host_id`` in
    ``apps`` (Docker's container listing, with ``Labels``), running or not, one entry per port.

    An app without a valid overlay address (label ``io.powerplane.ip``) forwards nothing. A
    port that an earlier-created app already forwards is left out with a warning: only forged
    labels or a create that bypassed the proxy can make two apps claim one.
    """
    forwards: list[PortForward] = []
    taken: dict[tuple[str, int], list[PortBinding]] = {}
    ordered = sorted(labelled_ports(apps, host_id),
                     key=lambda item: (_created(item[0]), str(item[0].get("Id") or "")))
    for app, ports in ordered:
        container_ip = _overlay_ip(app)
        if container_ip is None:
            continue
        for binding in ports.bindings:
            others = taken.setdefault((binding.proto, binding.host_port), [])
            if any(binding.collides(other) for other in others):
                log.warning("container %s: %s:%d/%s is published by an older container; "
                            "not forwarded", _short(app), binding.address, binding.host_port,
                            binding.proto, extra=_about(app))
                continue
            others.append(binding)
            forwards.append(PortForward(binding.proto, binding.host_ip, binding.host_port,
                                        container_ip, binding.container_port))
    return forwards


def _created(app: Mapping[str, Any]) -> float:
    created = app.get("Created")
    return float(created) if isinstance(created, int | float) and \
        not isinstance(created, bool) else 0.0


def _overlay_ip(app: Mapping[str, Any]) -> str | None:
    labels: Mapping[str, Any] = app.get("Labels") or {}
    text = labels.get(LABEL_IP)
    try:
        return str(ipaddress.IPv4Address(text)) if isinstance(text, str) else None
    except ValueError:
        log.warning("container %s: label %s=%s is no IPv4 address; its ports are not "
                    "forwarded", _short(app), LABEL_IP, quoted(text), extra=_about(app))
        return None
