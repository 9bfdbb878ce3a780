"""The built-in ``network`` hook: Docker API calls that put containers on overlay networks.

    POST   /containers/create       pre:  SOCKETPLANE_* in Env → sandbox, address, plug, rewrite
                                    post: Docker refused → undo; accepted → record the endpoint
    POST   /containers/{id}/start   pre:  restart and re-wire a sandbox that is not running
    DELETE /containers/{id}         pre:  name → full id, so the post-hook knows whom to release
                                    post: released synchronously once Docker removed it
    GET    /containers/{id}/json    post: NetworkSettings shows the overlay address, and the
                                          ports (-p, -P, --expose) where Docker shows them
    GET    /containers/json         post: each overlay app's Ports, what `docker ps` prints

Between pre- and post-hook the hook keeps no memory: the rewritten request, which the post-hook
receives, carries the sandbox, network, address and ports as labels.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from adapter import logs
from adapter.errors import BadRequest, GroupNotFound, NetworkNotFound, PowerplaneError
from adapter.network.create_rewrite import (
    LABEL_CIDR,
    LABEL_GATEWAY,
    LABEL_HOSTNAME,
    LABEL_IP,
    LABEL_MAC,
    LABEL_NETWORK,
    LABEL_PORT,
    LABEL_PORTS,
    LABEL_SANDBOX,
    CreateRequest,
    aliases_label,
    groups_label,
)
from adapter.network.docker_api import Docker
from adapter.network.endpoints import EndpointManager
from adapter.network.ports import PublishedPorts
from adapter.proxy.powerstrip import PowerstripMessage

log = logging.getLogger(__name__)

HOOK_NAME = "network"

_VERSION = r"(?:/v[0-9.]+)?"
CREATE = re.compile(rf"^{_VERSION}/containers/create$")
START = re.compile(rf"^{_VERSION}/containers/(?P<id>[^/]+)/start$")
DELETE = re.compile(rf"^{_VERSION}/containers/(?P<id>[^/]+)$")
INSPECT = re.compile(rf"^{_VERSION}/containers/(?P<id>[^/]+)/json$")
LIST = re.compile(rf"^{_VERSION}/containers/json$")
# How the ports label's key appears in Docker's JSON: a listing without it is passed on unread.
_PORTS_KEY_JSON = json.dumps(LABEL_PORTS)


def _body(container: Mapping[str, Any]) -> Any:
    raw = container.get("Body")
    if raw in (None, ""):
        return None
    if isinstance(raw, str | bytes):
        try:
            return json.loads(raw)
        except ValueError:
            raise BadRequest("request body is not valid JSON") from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply to be read") from None
    return raw


def _query_name(request: Mapping[str, Any]) -> str:
    """The ``?name=`` of a create, "" when Docker picks the name."""
    names = parse_qs(urlsplit(str(request.get("Request", ""))).query).get("name")
    return names[0].lstrip("/") if names else ""


def _encode_like(original: Any, value: Any) -> Any:
    """Answer in the form the message used: Powerstrip sends bodies as JSON strings."""
    return json.dumps(value) if isinstance(original, str | bytes) else value


class NetworkHook:
    """Powerstrip adapter that attaches containers to overlay networks."""

    def __init__(self, endpoints: EndpointManager, docker: Docker) -> None:
        self._endpoints = endpoints
        self._docker = docker

    async def __call__(self, message: PowerstripMessage) -> PowerstripMessage:
        request = dict(message.get("ClientRequest") or {})
        method = str(request.get("Method", "")).upper()
        path = urlsplit(str(request.get("Request", ""))).path
        if message.get("Type") == "pre-hook":
            if method == "POST" and CREATE.match(path):
                request = await self._pre_create(request)
            elif method == "POST" and (match := START.match(path)):
                with logs.context(container=match["id"]):
                    await self._pre_start(match["id"])
            elif method == "DELETE" and (match := DELETE.match(path)):
                request = await self._pre_delete(request, match["id"])
            return {"PowerstripProtocolVersion": 1, "ModifiedClientRequest": request}
        response = dict(message.get("ServerResponse") or {})
        code = int(response.get("Code") or 0)
        if method == "POST" and CREATE.match(path):
            await self._post_create(request, response, code)
        elif method == "DELETE" and (match := DELETE.match(path)) and 200 <= code < 300:
            with logs.context(container=match["id"]):
                await self._post_delete(match["id"])
        elif method == "GET" and LIST.match(path) and code == 200:
            response = _post_list(response)
        elif method == "GET" and INSPECT.match(path) and code == 200:
            response = self._post_inspect(response)
        return {"PowerstripProtocolVersion": 1, "ModifiedServerResponse": response}

    async def _pre_create(self, request: dict[str, Any]) -> dict[str, Any]:
        query = parse_qs(urlsplit(str(request.get("Request", ""))).query)
        names = query.get("name")
        create = CreateRequest.parse(_body(request), app_name=names[0] if names else None)
        if create is None:
            return request
        try:
            attachment = await self._endpoints.attach(create)
        except (NetworkNotFound, GroupNotFound) as exc:
            # The docker CLI takes a 404 from create for "image not found" and would try to
            # pull it: a missing network or group must be a 400.
            raise BadRequest(exc.message, reason=exc.reason) from None
        rewritten = create.rewritten(sandbox_id=attachment.sandbox_id,
                                     labels=attachment.app_labels(self._endpoints.host_id))
        log.info("create%s joins %s at %s", f" {create.app_name}" if create.app_name else "",
                 attachment.network.name, attachment.ip,
                 extra=logs.fields(container=attachment.sandbox_id,
                                   network=attachment.network.name))
        return {**request, "Body": _encode_like(request.get("Body"), rewritten)}

    async def _post_create(self, request: Mapping[str, Any], response: Mapping[str, Any],
                           code: int) -> None:
        body = _body(request)
        labels = body.get("Labels") if isinstance(body, dict) else None
        # Only a request this hook rewrote carries the sandbox label (and Labels an object).
        sandbox_id = labels.get(LABEL_SANDBOX) if isinstance(labels, dict) else None
        if not sandbox_id or not isinstance(labels, dict):
            return
        network, ip = labels.get(LABEL_NETWORK, ""), labels.get(LABEL_IP, "")
        created = _body(response) if 200 <= code < 300 else None
        app_id = created.get("Id") if isinstance(created, dict) else None
        if not app_id:
            log.info("Docker refused the create (HTTP %s); releasing %s on %s", code, ip, network,
                     extra=logs.fields(container=sandbox_id, network=network))
            with logs.context(container=sandbox_id, network=network):
                await self._endpoints.abandon(sandbox_id, network, ip)
            return
        with logs.context(container=app_id, network=network):
            await self._endpoints.commit(app_id=app_id, network=network, ip=ip,
                                         mac=labels.get(LABEL_MAC, ""),
                                         port=labels.get(LABEL_PORT, ""), sandbox_id=sandbox_id,
                                         name=_query_name(request),
                                         hostname=labels.get(LABEL_HOSTNAME, ""),
                                         aliases=aliases_label(labels),
                                         groups=groups_label(labels))
            log.info("container %s is on %s at %s (sandbox %s)", app_id[:12], network, ip,
                     sandbox_id[:12])

    async def _pre_start(self, container: str) -> None:
        sandbox_id = self._endpoints.sandbox_of(container)
        if sandbox_id is None:
            info = await self._docker.inspect(container)
            labels = ((info or {}).get("Config") or {}).get("Labels") or {}
            sandbox_id = labels.get(LABEL_SANDBOX)
        if sandbox_id:
            await self._endpoints.ensure_sandbox_running(sandbox_id)

    async def _post_delete(self, container: str) -> None:
        try:
            await self._endpoints.detach_app(container)
        except PowerplaneError as exc:
            # Docker has removed the container already; failing the answer would only hide
            # that. The agent releases the endpoint once Consul and OVS answer again.
            log.warning("release after removing %s postponed: %s", container[:12], exc,
                        extra=logs.fields(container=container))

    async def _pre_delete(self, request: dict[str, Any], container: str) -> dict[str, Any]:
        try:
            info = await self._docker.inspect(container)
        except PowerplaneError:
            return request  # Docker itself will answer this delete
        labels = ((info or {}).get("Config") or {}).get("Labels") or {}
        if info is None or LABEL_SANDBOX not in labels or info["Id"] == container:
            return request
        # Rewritten to the full id: after the delete, the name no longer leads anywhere.
        parts = urlsplit(str(request.get("Request", "")))
        path = parts.path[: -len(container)] + quote(info["Id"])
        return {**request, "Request": path + (f"?{parts.query}" if parts.query else "")}

    @staticmethod
    def _post_inspect(response: dict[str, Any]) -> dict[str, Any]:
        info = _body(response)
        if not isinstance(info, dict):
            return response
        config = info.get("Config")
        labels = config.get("Labels") if isinstance(config, dict) else None
        ip = labels.get(LABEL_IP) if isinstance(labels, dict) else None
        if not ip or not isinstance(labels, dict):
            return response
        # Anyone can set these labels on any container: a prefix that is no number is 0.
        prefix_text = str(labels.get(LABEL_CIDR, "/0")).rpartition("/")[2]
        prefix = int(prefix_text) if prefix_text.isascii() and prefix_text.isdigit() \
            and len(prefix_text) <= 2 else 0
        details = {
            "IPAddress": ip,
            "IPPrefixLen": prefix,
            "Gateway": labels.get(LABEL_GATEWAY, ""),
            "MacAddress": labels.get(LABEL_MAC, ""),
        }
        settings = dict(info.get("NetworkSettings") or {})
        settings.update(details)
        networks = dict(settings.get("Networks") or {})
        networks[labels.get(LABEL_NETWORK, "powerplane")] = {
            **details, "NetworkID": f"powerplane/{labels.get(LABEL_NETWORK, '')}",
            "EndpointID": labels.get(LABEL_SANDBOX, ""),
        }
        settings["Networks"] = networks
        info["NetworkSettings"] = settings
        ports = _ports(info, labels)
        if ports:
            settings["Ports"] = {**_mapping(settings.get("Ports")), **ports.network_ports()}
            host_config = _mapping(info.get("HostConfig"))
            host_config["PortBindings"] = {**_mapping(host_config.get("PortBindings")),
                                           **ports.port_bindings()}
            info["HostConfig"] = host_config
            config = _mapping(config)
            config["ExposedPorts"] = {**_mapping(config.get("ExposedPorts")),
                                      **ports.exposed_ports()}
            info["Config"] = config
        return {**response, "Body": _encode_like(response.get("Body"), info)}


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _ports(container: Mapping[str, Any], labels: Mapping[str, Any]) -> PublishedPorts | None:
    """The ports label of an inspected or listed container, None when absent or malformed."""
    text = labels.get(LABEL_PORTS)
    if not text or not isinstance(text, str):
        return None
    try:
        return PublishedPorts.decode(text)
    except ValueError as exc:
        # Anyone can set labels: Docker's answer goes out as it came. Not a warning: every
        # `docker ps` would repeat it; the host agent warns about such a label.
        log.debug("container %s: ignoring its label %s: %s",
                  str(container.get("Id") or "?")[:12], LABEL_PORTS, exc,
                  extra=logs.fields(container=str(container.get("Id") or ""),
                                    network=str(labels.get(LABEL_NETWORK) or "")))
        return None


def _post_list(response: dict[str, Any]) -> dict[str, Any]:
    """``Ports`` of each overlay app in a container listing, as Docker fills them for its own
    published ports; the listing is only read when an app in it carries the ports label."""
    raw = response.get("Body")
    if not isinstance(raw, str) or _PORTS_KEY_JSON not in raw \
            or not str(response.get("ContentType", "")).startswith("application/json"):
        return response
    try:
        listing = json.loads(raw)
    except (ValueError, RecursionError):
        return response
    if not isinstance(listing, list):
        return response
    changed = False
    for container in listing:
        labels = container.get("Labels") if isinstance(container, dict) else None
        if not isinstance(labels, dict) or not labels.get(LABEL_IP):
            continue
        ports = _ports(container, labels)
        if not ports:
            continue
        listed = ports.listed_ports()
        ours = {(entry["PrivatePort"], entry["Type"]) for entry in listed}
        existing = container.get("Ports")
        kept = [entry for entry in existing if not isinstance(entry, dict)
                or (entry.get("PrivatePort"), entry.get("Type")) not in ours] \
            if isinstance(existing, list) else []
        container["Ports"] = kept + listed
        changed = True
    return {**response, "Body": json.dumps(listing)} if changed else response
