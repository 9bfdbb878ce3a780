"""Powerstrip's ``adapters.yml``: which hooks run for which Docker API calls.

The format is Powerstrip's, so existing files work unchanged::

    version: 1
    endpoints:
      "POST /*/containers/create":
        pre: [network, flocker]
        post: [network]
    adapters:
      flocker: http://127.0.0.1:9999/flocker-adapter

An endpoint key is ``METHOD PATH-PATTERN``; the pattern is matched with shell-style wildcards
(``*`` also crosses ``/``) against the request path without its query string. Every problem is a
``ConfigError`` naming the file: unreadable file, YAML error, duplicate key, bad pattern, wrong
shape. Whether a hook name exists is checked when the names are resolved
(``adapter.proxy.hookchain``), because built-in hooks are only known once the host runtime runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapter.errors import ConfigError

_ENDPOINT_KEY = re.compile(r"^(?P<method>[A-Z]+|\*) (?P<path>/\S*)$")


@dataclass(frozen=True, slots=True)
class EndpointHooks:
    """The hooks of one ``endpoints:`` entry, in the order they run."""

    method: str
    path_pattern: str
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.method} {self.path_pattern}"


@dataclass(frozen=True, slots=True)
class AdaptersConfig:
    """A parsed adapters.yml; ``source`` names where it came from, for error messages."""

    endpoints: tuple[EndpointHooks, ...] = ()
    adapters: Mapping[str, str] = field(default_factory=dict)
    source: str = "built-in default"


# Used when `serve` gets no --adapters: the built-in overlay `network` hook
# (adapter/hooks/network.py) on the calls it handles. Names missing from the built-in hooks
# are skipped. deploy/adapters.yml spells the same in YAML.
DEFAULT_ADAPTERS_CONFIG = AdaptersConfig(endpoints=(
    EndpointHooks("POST", "/*/containers/create", pre=("network",), post=("network",)),
    EndpointHooks("POST", "/*/containers/*/start", pre=("network",)),
    EndpointHooks("DELETE", "/*/containers/*", pre=("network",), post=("network",)),
    EndpointHooks("GET", "/*/containers/*/json", post=("network",)),
    EndpointHooks("GET", "/*/containers/json", post=("network",)),
))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_adapters_config(path: Path) -> AdaptersConfig:
    """Read and parse the adapters.yml at ``path``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read adapters file: {exc}") from None
    return parse_adapters_config(text, source=str(path))


def parse_adapters_config(text: str, *, source: str) -> AdaptersConfig:
    """Parse adapters.yml text; ``source`` prefixes every error message."""
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {' '.join(str(exc).split())}") from None
    if document is None:
        return AdaptersConfig(source=source)
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping with 'endpoints' and 'adapters'")
    unknown = set(document) - {"version", "endpoints", "adapters"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s): {', '.join(map(str, unknown))}")
    if document.get("version", 1) != 1:
        raise ConfigError(f"{source}: unsupported version {document['version']!r} (only 1)")
    return AdaptersConfig(
        endpoints=_parse_endpoints(document.get("endpoints") or {}, source),
        adapters=_parse_adapters(document.get("adapters") or {}, source),
        source=source,
    )


def _parse_endpoints(raw: Any, source: str) -> tuple[EndpointHooks, ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'endpoints' must be a mapping of 'METHOD /path' to hooks")
    endpoints = []
    for key, hooks in raw.items():
        match = _ENDPOINT_KEY.match(str(key))
        if match is None or not _balanced_brackets(match["path"]):
            raise ConfigError(
                f"{source}: bad endpoint pattern {key!r}: expected 'METHOD /path' such as "
                "'POST /*/containers/create'"
            )
        if not isinstance(hooks, dict) or set(hooks) - {"pre", "post"}:
            raise ConfigError(f"{source}: endpoint {key!r} must map to 'pre' and/or 'post' lists")
        endpoints.append(EndpointHooks(
            method=match["method"],
            path_pattern=match["path"],
            pre=_hook_names(hooks.get("pre"), f"{key} pre", source),
            post=_hook_names(hooks.get("post"), f"{key} post", source),
        ))
    return tuple(endpoints)


def _balanced_brackets(pattern: str) -> bool:
    # fnmatch treats an unclosed '[' as a literal, which is never what a config author meant.
    depth = 0
    for char in pattern:
        if char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
    return depth == 0


def _hook_names(raw: Any, where: str, source: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(name, str) and name for name in raw):
        raise ConfigError(f"{source}: {where}: expected a list of adapter names")
    return tuple(raw)


def _parse_adapters(raw: Any, source: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'adapters' must map adapter names to URLs")
    adapters = {}
    for name, url in raw.items():
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: adapter {name!r}: expected an http(s) URL, got {url!r}")
        adapters[str(name)] = url
    return adapters
