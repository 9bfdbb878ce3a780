"""Powerstrip protocol v1: which hooks a request matches, and running them in order.

A hook is either built in (an ``adapter.hooks.BuiltinHook`` from the host runtime) or an external
Powerstrip adapter reached over HTTP; both get and return the same JSON. Names from adapters.yml
resolve to a built-in hook first, then to the ``adapters:`` URL. Pre-hooks run in order, each on
the previous one's ``ModifiedClientRequest``; post-hooks likewise on ``ModifiedServerResponse``.

Any failure stops the request with a ``PowerplaneError``: a built-in hook's own error passes
through unchanged (its status and message reach the client); an external adapter that cannot be
reached, answers non-2xx, times out or answers something that is not a valid Powerstrip reply
becomes a ``HookError`` (502) naming the adapter and quoting what it said.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fnmatch import translate
from typing import Any

import aiohttp

from adapter import logs
from adapter.errors import ConfigError, HookError, PowerplaneError
from adapter.proxy.adapters_config import AdaptersConfig
from adapter.proxy.observer import POST, PRE, ProxyObserver
from adapter.proxy.powerstrip import BuiltinHook, PowerstripMessage

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
ADAPTER_TIMEOUT = aiohttp.ClientTimeout(total=60)
# How much of an adapter's error answer is quoted to the client.
QUOTE_LIMIT = 500
# An API version prefix: the first path segment is "v" and a version number ("/v1.41/...").
_VERSION_PREFIX = re.compile(r"/v[0-9.]*[0-9][0-9.]*/")


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """The request as hooks see it: method, path with query, and the body text (None: empty)."""

    method: str
    request: str
    body: str | None

    def to_message(self) -> dict[str, Any]:
        return {"Method": self.method, "Request": self.request, "Body": self.body}


@dataclass(frozen=True, slots=True)
class ServerResponse:
    """Docker's answer as hooks see it."""

    content_type: str
    body: str | None
    code: int

    def to_message(self) -> dict[str, Any]:
        return {"ContentType": self.content_type, "Body": self.body, "Code": self.code}


@dataclass(frozen=True, slots=True)
class Hook:
    """One resolved adapter name: built in (``builtin``) or external (``url``)."""

    name: str
    builtin: BuiltinHook | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class MatchedHooks:
    """The pre- and post-hooks one request must pass through."""

    pre: tuple[Hook, ...]
    post: tuple[Hook, ...]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    path_pattern: str
    hooks: MatchedHooks


@dataclass(frozen=True, slots=True)
class _MethodTable:
    """The routes of one method, compiled: ``any_route`` tells at once whether a path has hooks
    (most calls have none), ``routes`` collect them in file order when it does."""

    any_route: re.Pattern[str]
    routes: tuple[tuple[re.Pattern[str], MatchedHooks], ...]

    @classmethod
    def compile(cls, routes: list[_Route]) -> _MethodTable:
        # fnmatch's translation: "*" also crosses "/", as in Powerstrip.
        patterns = [translate(route.path_pattern) for route in routes]
        return cls(re.compile("|".join(f"(?:{pattern})" for pattern in patterns)),
                   tuple((re.compile(pattern), route.hooks)
                         for pattern, route in zip(patterns, routes, strict=True)))


class HookChain:
    """The resolved hook table; ``match`` picks hooks, ``run_pre``/``run_post`` run them."""

    def __init__(self, routes: tuple[_Route, ...], session: aiohttp.ClientSession | None,
                 observer: ProxyObserver | None = None) -> None:
        self._routes = routes
        self._session = session
        self._observer = observer
        # Compiled once: matching runs before every request is relayed.
        methods = {route.method for route in routes} - {"*"}
        self._tables = {method: self._compile(method) for method in methods}
        self._other_methods = self._compile("*")

    def _compile(self, method: str) -> _MethodTable | None:
        routes = [route for route in self._routes if route.method in ("*", method)]
        return _MethodTable.compile(routes) if routes else None

    @classmethod
    def build(
        cls,
        config: AdaptersConfig,
        builtin_hooks: Mapping[str, BuiltinHook],
        session: aiohttp.ClientSession | None,
        *,
        skip_unknown: bool = False,
        observer: ProxyObserver | None = None,
    ) -> HookChain:
        """Resolve every name in ``config``; an unknown name is a ConfigError naming the file.

        ``skip_unknown`` drops unknown names instead: the built-in default config names hooks
        that may not be registered yet.
        """

        def resolve(name: str) -> Hook | None:
            if name in builtin_hooks:
                return Hook(name, builtin=builtin_hooks[name])
            if name in config.adapters:
                return Hook(name, url=config.adapters[name])
            if skip_unknown:
                return None
            raise _unknown_adapter(config, name, builtin_hooks)

        routes = []
        for endpoint in config.endpoints:
            pre = tuple(hook for name in endpoint.pre if (hook := resolve(name)))
            post = tuple(hook for name in endpoint.post if (hook := resolve(name)))
            if pre or post:
                routes.append(_Route(endpoint.method, endpoint.path_pattern,
                                     MatchedHooks(pre, post)))
        return cls(tuple(routes), session, observer)

    @staticmethod
    def check_names(config: AdaptersConfig, builtin_names: Collection[str]) -> None:
        """ConfigError for a name in ``config`` that is neither built in nor an adapter: lets
        ``serve`` refuse a bad file before the hooks themselves exist."""
        for endpoint in config.endpoints:
            for name in (*endpoint.pre, *endpoint.post):
                if name not in builtin_names and name not in config.adapters:
                    raise _unknown_adapter(config, name, builtin_names)

    @property
    def empty(self) -> bool:
        return not self._routes

    def match(self, method: str, path: str) -> MatchedHooks | None:
        """Hooks for ``method path`` (path without query), or None when nothing matches.

        Every matching endpoint contributes, in file order. A path without an API version
        prefix also matches patterns written for one (``/*/containers/create``).
        """
        table = self._tables.get(method, self._other_methods)
        if table is None:
            return None
        if _VERSION_PREFIX.match(path):
            if table.any_route.match(path) is None:
                return None
            candidates: tuple[str, ...] = (path,)
        else:
            unversioned = f"/-{path}"
            if table.any_route.match(path) is None and table.any_route.match(unversioned) is None:
                return None
            candidates = (path, unversioned)
        pre: list[Hook] = []
        post: list[Hook] = []
        for pattern, hooks in table.routes:
            if any(pattern.match(candidate) for candidate in candidates):
                pre.extend(hooks.pre)
                post.extend(hooks.post)
        return MatchedHooks(tuple(pre), tuple(post))

    async def run_pre(self, hooks: tuple[Hook, ...], request: ClientRequest) -> ClientRequest:
        """Run pre-hooks in order; return the request as the last one modified it."""
        for hook in hooks:
            message = {
                "PowerstripProtocolVersion": PROTOCOL_VERSION,
                "Type": "pre-hook",
                "ClientRequest": request.to_message(),
            }
            reply = await self._call(hook, message)
            request = _modified_request(hook, reply)
        return request

    async def run_post(
        self, hooks: tuple[Hook, ...], request: ClientRequest, response: ServerResponse
    ) -> ServerResponse:
        """Run post-hooks in order on Docker's response to ``request`` (as sent to Docker)."""
        for hook in hooks:
            message = {
                "PowerstripProtocolVersion": PROTOCOL_VERSION,
                "Type": "post-hook",
                "ClientRequest": request.to_message(),
                "ServerResponse": response.to_message(),
            }
            reply = await self._call(hook, message)
            response = _modified_response(hook, reply)
        return response

    async def _call(self, hook: Hook, message: PowerstripMessage) -> PowerstripMessage:
        phase = PRE if message["Type"] == "pre-hook" else POST
        started = time.perf_counter()
        try:
            with logs.context(hook=hook.name):
                if hook.builtin is not None:
                    reply = await self._call_builtin(hook, hook.builtin, message)
                else:
                    reply = await self._call_external(hook, message)
        except PowerplaneError as exc:
            self._finished(hook, phase, started, exc.reason)
            log.warning("%s hook %s failed: %s", message["Type"], hook.name, exc.message,
                        extra=logs.fields(hook=hook.name))
            raise
        self._finished(hook, phase, started, None)
        return reply

    def _finished(self, hook: Hook, phase: str, started: float, failure: str | None) -> None:
        if self._observer is not None:
            self._observer.hook_finished(hook.name, phase, time.perf_counter() - started,
                                         failure)

    @staticmethod
    async def _call_builtin(hook: Hook, builtin: BuiltinHook,
                            message: PowerstripMessage) -> PowerstripMessage:
        try:
            return await builtin(message)
        except PowerplaneError:
            raise
        except Exception as exc:
            # A bug, not a user error: keep the traceback, give the client a readable answer
            # instead of a dropped connection.
            log.exception("built-in hook %s crashed", hook.name)
            raise HookError(f"built-in hook {hook.name!r} failed: {exc!r}") from exc

    async def _call_external(self, hook: Hook, message: PowerstripMessage) -> PowerstripMessage:
        assert hook.url is not None and self._session is not None
        try:
            async with self._session.post(hook.url, json=message, timeout=ADAPTER_TIMEOUT) as reply:
                text = await reply.text(errors="replace")
                if not 200 <= reply.status < 300:
                    raise HookError(
                        f"adapter {hook.name!r} ({hook.url}) answered {reply.status}: "
                        f"{_quote(text)}"
                    )
        except aiohttp.ClientError as exc:
            raise HookError(f"adapter {hook.name!r} ({hook.url}) unreachable: {exc}") from None
        except TimeoutError:
            raise HookError(f"adapter {hook.name!r} ({hook.url}) timed out") from None
        try:
            decoded = json.loads(text)
        except (ValueError, RecursionError):
            raise HookError(
                f"adapter {hook.name!r} ({hook.url}) answered invalid JSON: {_quote(text)}"
            ) from None
        if not isinstance(decoded, dict):
            raise HookError(f"adapter {hook.name!r} ({hook.url}) answered a non-object")
        return decoded


def _unknown_adapter(config: AdaptersConfig, name: str,
                     builtin_names: Collection[str]) -> ConfigError:
    return ConfigError(
        f"{config.source}: unknown adapter {name!r}: not a built-in hook "
        f"({', '.join(sorted(builtin_names)) or 'none registered'}) and not listed "
        "under 'adapters:'"
    )


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


def _modified_request(hook: Hook, reply: PowerstripMessage) -> ClientRequest:
    modified = reply.get("ModifiedClientRequest")
    if not isinstance(modified, dict):
        raise HookError(f"adapter {hook.name!r} answered without ModifiedClientRequest")
    method, request, body = modified.get("Method"), modified.get("Request"), modified.get("Body")
    if not isinstance(method, str) or not isinstance(request, str) or not request.startswith("/"):
        raise HookError(f"adapter {hook.name!r}: ModifiedClientRequest needs Method and Request")
    if body is not None and not isinstance(body, str):
        # Some adapters return the decoded JSON body; re-encode rather than refuse.
        body = json.dumps(body)
    return ClientRequest(method.upper(), request, body)


def _modified_response(hook: Hook, reply: PowerstripMessage) -> ServerResponse:
    modified = reply.get("ModifiedServerResponse")
    if not isinstance(modified, dict):
        raise HookError(f"adapter {hook.name!r} answered without ModifiedServerResponse")
    code, content_type, body = (
        modified.get("Code"), modified.get("ContentType"), modified.get("Body"),
    )
    if not isinstance(code, int) or not 100 <= code <= 599 or not isinstance(content_type, str):
        raise HookError(f"adapter {hook.name!r}: ModifiedServerResponse needs Code and ContentType")
    if body is not None and not isinstance(body, str):
        body = json.dumps(body)
    return ServerResponse(content_type, body, code)
