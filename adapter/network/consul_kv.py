"""Consul's KV store and sessions, behind domain-free verbs: the only module that imports consul.

Every key is relative to ``settings.consul_prefix``; every value is JSON unless a verb says text.
Every library or transport error is translated here, once, into ``adapter.errors``:
``ConsulUnavailable`` (no answer, no leader, 5xx), ``ConsulAccessDenied`` (ACL) or
``StateError``. A refused create-only write or a failed check is a result, never an exception.

Consistency, per read: a single-key ``get`` is consistent by default (the leader confirms it is
still the leader and has applied its whole log), because those reads decide what a write does
next: does the network exist, who holds this address. A leader elected a moment ago answers them
"not ready" rather than from a state store still being replayed, which would turn "could not
read" into "does not exist". Listings for display may be stale-ish (default mode); a watch's
first listing, and its first after an outage, are consistent (the reconcilers act on them:
an empty listing from a half-replayed store would remove every tunnel), the blocking queries
that follow are default mode.

Elections: while a cluster has no leader, or its new leader is not ready, Consul answers 500.
Those answers, and a connection reset mid-request, are retried with backoff for up to
``ELECTION_RETRY_SECONDS``; an agent that refuses connections (Consul down here) fails at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import consul.aio
from consul import ConsulException
from consul.base import Response
from consul.exceptions import ACLDisabled, ACLPermissionDenied, NotFound
from consul.exceptions import Timeout as ConsulTimeout

from adapter.errors import ConsulAccessDenied, ConsulUnavailable, StateError
from adapter.settings import Settings

if TYPE_CHECKING:
    from adapter.metrics import Metrics

T = TypeVar("T")

# Fail fast: a create that needs Consul must not hang the Docker client.
REQUEST_TIMEOUT = 5.0
# An election takes about a second with raft_multiplier 1 and up to ~10 s with Consul's default.
ELECTION_RETRY_SECONDS = 12.0
RETRY_BACKOFF_MIN = 0.05
RETRY_BACKOFF_MAX = 1.0
# Blocking queries wait this long on the server before answering "no change".
WATCH_WAIT_SECONDS = 30

TxnOp = dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of one transaction: committed, or the failed operations' indexes and reasons."""

    ok: bool
    failed: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Listing:
    """Every key under a folder (relative to it) with its JSON value, and Consul's index."""

    items: dict[str, Any]
    index: int


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """One answer of the Consul agent about its cluster, with the agent's clock.

    ``agent_time`` is the answer's HTTP ``Date`` header (whole seconds, by the agent's clock);
    ``sent`` and ``received`` are this host's clock around the request.
    """

    leader: str  # the leader's RPC address; "" while the cluster has none
    agent_time: float | None
    sent: float
    received: float


def dump(data: Mapping[str, Any]) -> str:
    """The JSON text Powerplane stores: compact, keys sorted (stable for CAS comparisons)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


class _Transient(ConsulUnavailable):
    """Consul answered "not now" (an election, a reset connection): worth asking again."""


def safe_key(part: str) -> bool:
    """True if ``part`` can only name one key (no traversal into other keys)."""
    return bool(part) and "/" not in part and part not in (".", "..")


class ConsulKV:
    """One Consul agent's KV and session API; lazy: constructing it touches nothing."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self.prefix = settings.consul_prefix
        self._client: consul.aio.Consul | None = None
        self._metrics = metrics
        self.retries = 0  # requests asked again because of an election, since start

    @property
    def address(self) -> str:
        return f"{self._settings.consul_scheme}://{self._settings.consul_addr}"

    def _consul(self) -> consul.aio.Consul:
        if self._client is None:
            host, port = _split_addr(self._settings.consul_addr)
            client = consul.aio.Consul(
                host=host, port=port, scheme=self._settings.consul_scheme, verify=True
            )
            # py-consul prefers CONSUL_HTTP_TOKEN from the environment; Settings already merged it.
            client.token = self._settings.consul_token
            self._client = client
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _call(
        self, request: Callable[[consul.aio.Consul], Awaitable[T]], *,
        seconds: float = REQUEST_TIMEOUT, retry: bool = True,
    ) -> T:
        """Run one request, asking again through an election; errors as adapter.errors."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ELECTION_RETRY_SECONDS
        backoff = RETRY_BACKOFF_MIN
        while True:
            try:
                return await self._call_once(request, seconds)
            except _Transient as exc:
                if not retry or loop.time() + backoff > deadline:
                    failure = ConsulUnavailable(
                        f"{exc.message} (still after {ELECTION_RETRY_SECONDS:g} s)"
                        if retry else exc.message)
                    self._failed(failure)
                    raise failure from None
                self.retries += 1
                if self._metrics is not None:
                    self._metrics.consul_retried()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_BACKOFF_MAX)
            except StateError as exc:
                self._failed(exc)
                raise

    def _failed(self, error: StateError) -> None:
        if self._metrics is not None:
            self._metrics.consul_failed(error.reason)

    async def _call_once(
        self, request: Callable[[consul.aio.Consul], Awaitable[T]], seconds: float
    ) -> T:
        where = self.address
        try:
            async with asyncio.timeout(seconds):
                return await request(self._consul())
        except (ACLPermissionDenied, ACLDisabled) as exc:
            raise ConsulAccessDenied(
                f"Consul at {where} denied access: the ACL token is missing or lacks rights "
                f"({_first_line(exc)})"
            ) from None
        except (TimeoutError, ConsulTimeout):
            raise ConsulUnavailable(
                f"Consul at {where} did not answer within {seconds:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error)
            raise ConsulUnavailable(f"Consul at {where} is unreachable: {reason}") from None
        except (aiohttp.ServerDisconnectedError, ConnectionResetError) as exc:
            raise _Transient(
                f"Consul at {where} dropped the connection: {_first_line(exc) or 'reset'}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConsulUnavailable(
                f"Consul at {where} is unreachable: {_first_line(exc) or type(exc).__name__}"
            ) from None
        except ConsulException as exc:
            text = _first_line(exc)
            if text.startswith("5") or "no cluster leader" in text.lower():
                raise _Transient(f"Consul at {where} cannot serve: {text}") from None
            raise StateError(f"Consul at {where} failed: {text}") from None

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: str, *, consistent: bool = True) -> tuple[Any, int] | None:
        """The JSON value of ``key`` and its ModifyIndex, or None if Consul has no such key."""
        mode = "consistent" if consistent else None
        _, item = await self._call(lambda c: c.kv.get(self.prefix + key, consistency=mode))
        if item is None:
            return None
        return _loads(item.get("Value")), int(item["ModifyIndex"])

    async def get_text(self, key: str, *, consistent: bool = True) -> str | None:
        mode = "consistent" if consistent else None
        _, item = await self._call(lambda c: c.kv.get(self.prefix + key, consistency=mode))
        if item is None or item.get("Value") is None:
            return None
        value: bytes = item["Value"]
        return value.decode(errors="replace")  # damaged text is read as such, never a crash

    async def holder(self, key: str) -> str | None:
        """The session holding ``key``'s lock, if any."""
        _, item = await self._call(
            lambda c: c.kv.get(self.prefix + key, consistency="consistent"))
        session = (item or {}).get("Session")
        return str(session) if session else None

    async def items(self, folder: str, *, consistent: bool = False) -> dict[str, Any]:
        """Every key under ``folder`` (relative to it) with its JSON value; ``consistent`` when
        the listing decides a write (is anything still using this?)."""
        mode = "consistent" if consistent else None
        _, items = await self._call(
            lambda c: c.kv.get(self.prefix + folder, recurse=True, consistency=mode))
        return _by_key(self.prefix + folder, items)

    async def keys(self, folder: str) -> list[str]:
        _, keys = await self._call(lambda c: c.kv.get(self.prefix + folder, keys=True))
        start = len(self.prefix + folder)
        return [key[start:] for key in keys or ()]

    async def wait_for_change(self, folder: str, index: int | None, *,
                              consistent: bool = False) -> Listing:
        """A blocking query: the folder once its index passes ``index`` (or after the wait).

        With ``index`` None it is a plain read, ``consistent`` if asked: what a watch reads
        first, and again after an outage, must come from a leader that has applied its log.
        """
        prefix = self.prefix + folder
        mode = "consistent" if consistent else None

        def request(c: consul.aio.Consul) -> Any:
            return c.kv.get(prefix, recurse=True, index=index, wait=f"{WATCH_WAIT_SECONDS}s",
                            consistency=mode)

        # The watch loop has its own backoff and starts over after an outage.
        new_index, items = await self._call(request, retry=False,
                                            seconds=WATCH_WAIT_SECONDS + REQUEST_TIMEOUT)
        return Listing(_by_key(prefix, items), int(new_index))

    async def agent_status(self, *, seconds: float = REQUEST_TIMEOUT) -> AgentStatus:
        """The cluster's leader as the agent knows it, and the agent's clock; asked once
        (no retry through an election: "no leader" is the answer)."""

        def parse(response: Response) -> tuple[str, float | None]:
            if response.code in (401, 403):
                raise ACLPermissionDenied(response.body)
            if response.code != 200:
                raise ConsulException(f"{response.code} {response.body}")
            try:
                leader = json.loads(response.body)
            except ValueError:
                raise ConsulException(f"200 {response.body[:200]!r}") from None
            date = response.headers.get("Date")
            try:
                stamp = email.utils.parsedate_to_datetime(date).timestamp() if date else None
            except (TypeError, ValueError):
                stamp = None
            return (leader if isinstance(leader, str) else ""), stamp

        def request(c: consul.aio.Consul) -> Awaitable[tuple[str, float | None]]:
            result: Awaitable[tuple[str, float | None]] = c.http.get(
                parse, "/v1/status/leader", headers=c.prepare_headers())
            return result

        sent = time.time()
        leader, agent_time = await self._call(request, seconds=seconds, retry=False)
        return AgentStatus(leader, agent_time, sent, time.time())

    async def session_exists(self, session: str) -> bool:
        """Whether Consul still knows ``session`` (a session that expired is gone)."""
        _, found = await self._call(lambda c: c.session.info(session))
        return found is not None

    # -- writes ------------------------------------------------------------------------------

    async def put(self, key: str, value: Mapping[str, Any]) -> None:
        await self._call(lambda c: c.kv.put(self.prefix + key, dump(value)))

    async def delete(self, key: str) -> None:
        await self._call(lambda c: c.kv.delete(self.prefix + key))

    async def delete_if_unchanged(self, key: str, index: int) -> bool:
        """Delete ``key`` only if its ModifyIndex is still ``index``; False otherwise."""
        deleted: bool = await self._call(lambda c: c.kv.delete(self.prefix + key, cas=index))
        return deleted

    async def txn(self, ops: list[TxnOp]) -> TxnResult:
        """Apply ``ops`` atomically; a failed check or CAS is a result, not an exception."""

        def parse(response: Response) -> TxnResult:
            if response.code == 200:
                return TxnResult(True)
            if response.code == 409:
                try:
                    errors = json.loads(response.body).get("Errors") or []
                except (ValueError, AttributeError):
                    raise ConsulException(f"409 {response.body}") from None
                return TxnResult(
                    False, {int(e.get("OpIndex", -1)): str(e.get("What", "")) for e in errors}
                )
            if response.code in (401, 403):
                raise ACLPermissionDenied(response.body)
            raise ConsulException(f"{response.code} {response.body}")

        def request(c: consul.aio.Consul) -> Awaitable[TxnResult]:
            # The library's txn helper sends no ACL token, so go through its HTTP layer directly.
            result: Awaitable[TxnResult] = c.http.put(
                parse, "/v1/txn", data=json.dumps(ops), headers=c.prepare_headers()
            )
            return result

        return await self._call(request)

    def op(self, verb: str, key: str, value: str | None = None, index: int | None = None) -> TxnOp:
        """One transaction operation on ``key`` (verbs as Consul's /v1/txn names them)."""
        body: dict[str, Any] = {"Verb": verb, "Key": self.prefix + key}
        if value is not None:
            body["Value"] = base64.b64encode(value.encode()).decode()
        if index is not None:
            body["Index"] = index
        return {"KV": body}

    # -- sessions ----------------------------------------------------------------------------

    async def create_session(self, name: str, ttl: int) -> str:
        """A session that deletes the keys it holds when it expires."""
        session: str = await self._call(lambda c: c.session.create(
            name=name, behavior="delete", ttl=ttl, lock_delay=0, checks=[]))
        return session

    async def renew_session(self, session: str) -> bool:
        """Renew ``session``; False if Consul no longer knows it."""
        return await self._call(lambda c: _renew(c, session)) is not None

    async def destroy_session(self, session: str) -> None:
        await self._call(lambda c: c.session.destroy(session))

    async def acquire(self, key: str, value: Mapping[str, Any], session: str) -> bool:
        """Write ``key`` held by ``session``; False if another session holds it."""
        acquired: bool = await self._call(
            lambda c: c.kv.put(self.prefix + key, dump(value), acquire=session))
        return acquired


async def _renew(client: consul.aio.Consul, session: str) -> Any:
    try:
        return await client.session.renew(session)
    except NotFound:
        return None


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return addr.strip("[]"), 8500
    return host.strip("[]"), int(port)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _loads(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode(errors="replace")


def _by_key(prefix: str, items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {item["Key"][len(prefix):]: _loads(item.get("Value")) for item in items or ()}

