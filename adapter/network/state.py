"""Network state in Consul: networks, addresses, endpoints and the host registry.

The only module that talks to Consul (py-consul's asyncio client). It owns the KV layout of
DESIGN.md under ``settings.consul_prefix``, plus two keys of its own (docs/state.md):

    networks/<name>            {name, cidr, gateway, vni, mtu, created}
    subnets/<cidr>             network name          (no two networks share a subnet)
    vnis/<vni>                 network name          (VNIs unique)
    addresses/<network>/<ip>   {container, host, mac, created}
    endpoints/<container-id>   {network, ip, mac, host, port, sandbox}
    hosts/<host-id>            {underlay_ip, hostname, version}, held by a session with a TTL
    ipam/<network>             next host offset to try (a hint: correctness never depends on it)
    meta/networks-version      bumped with CAS by every network creation

Uniqueness is Consul's doing, never ours: every claim is a create-only write (``cas=0``) inside a
Consul transaction, so two hosts asking at the same moment cannot both win. Every library or
transport error is translated here, once, into ``adapter.errors``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import consul.aio
from consul import ConsulException
from consul.base import Response
from consul.exceptions import ACLDisabled, ACLPermissionDenied, NotFound
from consul.exceptions import Timeout as ConsulTimeout

from adapter.errors import (
    ConsulAccessDenied,
    ConsulUnavailable,
    InvalidNetwork,
    NetworkConflict,
    NetworkNotFound,
    PoolExhausted,
    StateError,
)
from adapter.model import (
    AddressRecord,
    Endpoint,
    Host,
    Network,
    mac_for_ip,
    name_for_subnet,
    parse_cidr,
    validate_name,
    validate_vni,
)
from adapter.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Fail fast: a create that needs Consul must not hang the Docker client.
REQUEST_TIMEOUT = 5.0
# Blocking queries wait this long on the server before answering "no change".
WATCH_WAIT_SECONDS = 30
WATCH_BACKOFF_MAX = 10.0
# Consul refuses session TTLs under 10 s and may keep a session up to twice its TTL.
SESSION_TTL_MIN = 10
# Addresses tried from the hint before falling back to one listing of the network's keys.
HINT_PROBES = 8
# Networks this small are cheaper to list than to probe.
SMALL_NETWORK = 64
CREATE_ATTEMPTS = 30
TXN_MAX_OPS = 64

TxnOp = dict[str, dict[str, Any]]


class _TxnResult:
    """Outcome of one Consul transaction: committed, or the failed operations' indexes."""

    def __init__(self, ok: bool, failed: Mapping[int, str]) -> None:
        self.ok = ok
        self.failed = dict(failed)


def _encode(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _dump(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return addr.strip("[]"), 8500
    return host.strip("[]"), int(port)


class State:
    """Powerplane's shared state; lazy: constructing it touches nothing."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._prefix = settings.consul_prefix
        self._addr = settings.consul_addr
        self._client: consul.aio.Consul | None = None
        # Allocations for one network from this process go one at a time: contention is then
        # only between hosts, and a burst of local requests costs no failed claims.
        self._allocation_locks: dict[str, asyncio.Lock] = {}

    # -- connection and error translation ------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self._settings.consul_scheme}://{self._addr}"

    def _consul(self) -> consul.aio.Consul:
        if self._client is None:
            host, port = _split_addr(self._addr)
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
        seconds: float = REQUEST_TIMEOUT,
    ) -> T:
        """Run one request; translate every failure into the adapter.errors tree."""
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
        except (aiohttp.ClientError, OSError) as exc:
            raise ConsulUnavailable(
                f"Consul at {where} is unreachable: {_first_line(exc) or type(exc).__name__}"
            ) from None
        except ConsulException as exc:
            text = _first_line(exc)
            if "no cluster leader" in text.lower() or text.startswith("5"):
                raise ConsulUnavailable(f"Consul at {where} cannot serve: {text}") from None
            raise StateError(f"Consul at {where} failed: {text}") from None

    async def ping(self) -> None:
        """Raise ConsulUnavailable / ConsulAccessDenied unless Consul serves our KV prefix."""
        # A single-key read: listings are silently filtered by ACLs, single reads are refused.
        await self._call(lambda c: c.kv.get(self._prefix + "meta/networks-version"))

    # -- KV helpers -------------------------------------------------------------------------

    async def _get(self, key: str) -> tuple[Any, int] | None:
        """The JSON value of ``key`` and its ModifyIndex, or None."""
        _, item = await self._call(lambda c: c.kv.get(self._prefix + key))
        if item is None:
            return None
        return _loads(item.get("Value")), int(item["ModifyIndex"])

    async def _get_text(self, key: str) -> str | None:
        _, item = await self._call(lambda c: c.kv.get(self._prefix + key))
        if item is None or item.get("Value") is None:
            return None
        value: bytes = item["Value"]
        return value.decode()

    async def _list(self, folder: str) -> dict[str, Any]:
        """Every key under ``folder`` (relative to it) with its JSON value."""
        _, items = await self._call(lambda c: c.kv.get(self._prefix + folder, recurse=True))
        return _by_key(self._prefix + folder, items)

    async def _keys(self, folder: str) -> list[str]:
        _, keys = await self._call(lambda c: c.kv.get(self._prefix + folder, keys=True))
        start = len(self._prefix + folder)
        return [key[start:] for key in keys or ()]

    async def _put(self, key: str, value: Mapping[str, Any]) -> None:
        await self._call(lambda c: c.kv.put(self._prefix + key, _dump(value)))

    async def _delete(self, key: str, *, recurse: bool = False) -> None:
        await self._call(lambda c: c.kv.delete(self._prefix + key, recurse=recurse or None))

    async def _txn(self, ops: list[TxnOp]) -> _TxnResult:
        """Apply ``ops`` atomically; a failed check or CAS is a result, not an exception."""

        def parse(response: Response) -> _TxnResult:
            if response.code == 200:
                return _TxnResult(True, {})
            if response.code == 409:
                try:
                    errors = json.loads(response.body).get("Errors") or []
                except (ValueError, AttributeError):
                    raise ConsulException(f"409 {response.body}") from None
                return _TxnResult(
                    False, {int(e.get("OpIndex", -1)): str(e.get("What", "")) for e in errors}
                )
            if response.code in (401, 403):
                raise ACLPermissionDenied(response.body)
            raise ConsulException(f"{response.code} {response.body}")

        def request(c: consul.aio.Consul) -> Awaitable[_TxnResult]:
            # The library's txn helper sends no ACL token, so go through its HTTP layer directly.
            result: Awaitable[_TxnResult] = c.http.put(
                parse, "/v1/txn", data=json.dumps(ops), headers=c.prepare_headers()
            )
            return result

        return await self._call(request)

    def _op(self, verb: str, key: str, value: str | None = None, index: int | None = None) -> TxnOp:
        body: dict[str, Any] = {"Verb": verb, "Key": self._prefix + key}
        if value is not None:
            body["Value"] = _encode(value)
        if index is not None:
            body["Index"] = index
        return {"KV": body}

    # -- networks ---------------------------------------------------------------------------

    async def create_network(
        self,
        name: str,
        cidr: str,
        *,
        gateway: str | None = None,
        vni: int | None = None,
        mtu: int | None = None,
    ) -> Network:
        """Create a network; NetworkConflict if its name, subnet (or an overlap) or VNI is taken.

        Every creation bumps ``meta/networks-version`` with CAS in the same transaction that
        claims the name, subnet and VNI, so the overlap check below can never be raced: a
        concurrent creation makes our transaction fail, and we look again.
        """
        validate_name(name)
        parse_cidr(cidr)
        if vni is not None:
            validate_vni(vni)
        for attempt in range(CREATE_ATTEMPTS):
            version = await self._get("meta/networks-version")
            version_index = version[1] if version else 0
            existing = await self.list_networks()
            chosen_vni = self._check_new_network(name, cidr, vni, existing)
            network = Network.build(name, cidr, gateway=gateway, vni=chosen_vni, mtu=mtu)
            result = await self._txn([
                self._op("cas", "meta/networks-version",
                         str((version[0] if version else 0) + 1), version_index),
                self._op("cas", f"networks/{name}", _dump(network.to_json()), 0),
                self._op("cas", f"subnets/{network.cidr}", name, 0),
                self._op("cas", f"vnis/{network.vni}", name, 0),
            ])
            if result.ok:
                log.info("created network %s (%s, VNI %d)", name, network.cidr, network.vni)
                return network
            # Someone else created a network meanwhile; back off a little and look again.
            await asyncio.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))
        raise NetworkConflict(
            f"could not create network {name!r}: network state kept changing; try again"
        )

    def _check_new_network(
        self, name: str, cidr: str, vni: int | None, existing: list[Network]
    ) -> int:
        subnet, _ = parse_cidr(cidr)
        used_vnis: dict[int, str] = {}
        for other in existing:
            if other.name == name:
                raise NetworkConflict(f"network {name!r} already exists ({other.cidr})")
            if other.overlaps(subnet):
                raise NetworkConflict(
                    f"subnet {subnet} overlaps network {other.name!r} ({other.cidr})"
                )
            used_vnis[other.vni] = other.name
        if vni is not None:
            if vni in used_vnis:
                raise NetworkConflict(f"VNI {vni} is already used by network {used_vnis[vni]!r}")
            return vni
        low, high = self._settings.vni_min, self._settings.vni_max
        for candidate in range(low, high + 1):
            if candidate not in used_vnis:
                return candidate
        raise NetworkConflict(f"no free VNI left in the range {low}-{high}")

    async def network_for_cidr(self, value: str) -> Network:
        """The network whose subnet ``value`` names (SOCKETPLANE_CIDR), created on first use.

        Two hosts asking at once end with one network: the loser of the creation race finds the
        winner's network by its subnet.
        """
        subnet, _ = parse_cidr(value)
        for _ in range(3):
            found = await self._network_by_subnet(str(subnet))
            if found is not None:
                return found
            try:
                return await self.create_network(name_for_subnet(subnet), str(subnet))
            except NetworkConflict:
                found = await self._network_by_subnet(str(subnet))
                if found is not None:
                    return found
                raise
        raise NetworkConflict(f"could not find or create the network for {subnet}")

    async def _network_by_subnet(self, cidr: str) -> Network | None:
        name = await self._get_text(f"subnets/{cidr}")
        if name is None:
            return None
        try:
            return await self.get_network(name)
        except NetworkNotFound:
            return None  # being created or deleted right now

    async def get_network(self, name: str) -> Network:
        found = await self._get(f"networks/{name}") if _safe_key(name) else None
        if found is None or not isinstance(found[0], dict):
            raise NetworkNotFound(f"network {name!r} not found")
        return _network(found[0])

    async def list_networks(self) -> list[Network]:
        return _networks(await self._list("networks/"))

    async def delete_network(self, name: str, *, force: bool = False) -> None:
        """Delete a network; refused while it has addresses allocated, unless ``force``."""
        network = await self.get_network(name)
        in_use = await self._keys(f"addresses/{name}/")
        if in_use and not force:
            raise NetworkConflict(
                f"network {name!r} still has {len(in_use)} address(es) in use; remove its "
                "containers first or force the removal"
            )
        result = await self._txn([
            self._op("delete-cas", f"networks/{name}", index=await self._modify_index(
                f"networks/{name}")),
            self._op("delete", f"subnets/{network.cidr}"),
            self._op("delete", f"vnis/{network.vni}"),
            self._op("delete-tree", f"addresses/{name}/"),
            self._op("delete", f"ipam/{name}"),
        ])
        if not result.ok:
            raise NetworkConflict(f"network {name!r} changed while being removed; try again")
        if force:
            for endpoint in await self.list_endpoints():
                if endpoint.network == name:
                    await self.delete_endpoint(endpoint.container_id)
        log.info("deleted network %s", name)

    async def _modify_index(self, key: str) -> int:
        found = await self._get(key)
        if found is None:
            raise NetworkNotFound(f"{key} vanished")
        return found[1]

    # -- addresses --------------------------------------------------------------------------

    async def allocate_address(self, network: Network, *, container: str, host: str) -> str:
        """Claim a free address of ``network`` for ``container``; PoolExhausted when none is left.

        Next-fit from a per-network hint: the claim (create-only) and the hint update are one
        transaction, which also checks that the network still exists. Only after
        ``HINT_PROBES`` taken addresses in a row does it list the network's keys, once.
        """
        lock = self._allocation_locks.setdefault(network.name, asyncio.Lock())
        async with lock:
            if network.capacity > SMALL_NETWORK:
                hint = await self._hint(network)
                for step in range(HINT_PROBES):
                    offset = (hint + step) % network.size
                    ip = network.host_address(offset)
                    if ip == network.gateway:
                        continue
                    if await self._claim(network, ip, offset, container, host):
                        return ip
            return await self._claim_from_listing(network, container, host)

    async def _hint(self, network: Network) -> int:
        text = await self._get_text(f"ipam/{network.name}")
        try:
            return int(text) % network.size if text else 0
        except ValueError:
            return 0

    async def _claim(
        self, network: Network, ip: str, offset: int, container: str, host: str
    ) -> bool:
        record = AddressRecord(ip=ip, container=container, host=host, mac=mac_for_ip(ip))
        result = await self._txn([
            self._op("get", f"networks/{network.name}"),
            self._op("cas", f"addresses/{network.name}/{ip}", _dump(record.to_json()), 0),
            self._op("set", f"ipam/{network.name}", str((offset + 1) % network.size)),
        ])
        if 0 in result.failed:
            # Consul's own words say which check failed: a missing network, or something else.
            raise NetworkNotFound(f"network {network.name!r} not found while claiming {ip} "
                                  f"(Consul: {result.failed[0] or 'no reason given'})")
        return result.ok

    async def _claim_from_listing(self, network: Network, container: str, host: str) -> str:
        taken = set(await self._keys(f"addresses/{network.name}/"))
        start = await self._hint(network)
        for ip in network.assignable(start):
            if ip in taken:
                continue
            if await self._claim(network, ip, network.host_offset(ip), container, host):
                return ip
        raise PoolExhausted(
            f"network {network.name!r} ({network.cidr}) has no free address: all "
            f"{network.capacity} are allocated"
        )

    async def release_address(self, network: str, ip: str) -> None:
        """Free an address; releasing a free address is not an error."""
        if _safe_key(network) and _safe_key(ip):
            await self._delete(f"addresses/{network}/{ip}")

    async def release_address_if_owned(self, network: str, ip: str, owner: str) -> bool:
        """Free ``ip`` only while ``owner`` holds it: one read, then a delete checked against
        that read's index, so an address handed to someone else meanwhile stays theirs."""
        if not (_safe_key(network) and _safe_key(ip)):
            return False
        key = f"addresses/{network}/{ip}"
        found = await self._get(key)
        if found is None or not isinstance(found[0], dict):
            return False
        if AddressRecord.from_json(ip, found[0]).container != owner:
            return False
        deleted: bool = await self._call(
            lambda c: c.kv.delete(self._prefix + key, cas=found[1]))
        return deleted

    async def addresses(self, network: str) -> dict[str, AddressRecord]:
        items = await self._list(f"addresses/{network}/")
        return {
            ip: AddressRecord.from_json(ip, value)
            for ip, value in sorted(items.items(), key=lambda kv: _ip_sort_key(kv[0]))
            if isinstance(value, dict)
        }

    async def address_counts(self) -> dict[str, int]:
        """How many addresses each network has allocated, from one key listing."""
        counts: dict[str, int] = {}
        for key in await self._keys("addresses/"):
            network, _, ip = key.partition("/")
            if ip:
                counts[network] = counts.get(network, 0) + 1
        return counts

    # -- endpoints --------------------------------------------------------------------------

    async def put_endpoint(self, endpoint: Endpoint) -> None:
        await self._put(f"endpoints/{endpoint.container_id}", endpoint.to_json())

    async def get_endpoint(self, container_id: str) -> Endpoint | None:
        if not _safe_key(container_id):
            return None
        found = await self._get(f"endpoints/{container_id}")
        if found is None or not isinstance(found[0], dict):
            return None
        return _endpoint(container_id, found[0])

    async def delete_endpoint(self, container_id: str) -> None:
        if _safe_key(container_id):
            await self._delete(f"endpoints/{container_id}")

    async def list_endpoints(self, *, host: str | None = None) -> list[Endpoint]:
        endpoints = [
            endpoint
            for container_id, value in (await self._list("endpoints/")).items()
            if isinstance(value, dict)
            and (endpoint := _endpoint(container_id, value)) is not None
            and (host is None or endpoint.host == host)
        ]
        return sorted(endpoints, key=lambda e: (e.network, _ip_sort_key(e.ip)))

    # -- hosts ------------------------------------------------------------------------------

    async def list_hosts(self) -> list[Host]:
        return _hosts(await self._list("hosts/"))

    @asynccontextmanager
    async def registered(self, host: Host, *,
                         on_registered: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Hold ``hosts/<id>`` under a TTL session renewed in the background; drop it on exit.

        If the process dies, Consul deletes the key once the session expires. We ask Consul for
        half of ``host_ttl`` because it may wait up to twice a session's TTL (minimum 10 s).
        Consul being down on entry is not an error (``serve`` starts without Consul): the
        background task keeps trying and registers as soon as Consul answers.
        ``on_registered`` is called after every successful registration.
        """
        ttl = max(SESSION_TTL_MIN, math.ceil(self._settings.host_ttl / 2))
        holder: list[str | None] = [None]
        notify = on_registered or (lambda: None)
        try:
            holder[0] = await self._register(host, ttl)
            notify()
        except StateError as exc:
            log.warning("host %s: not registered yet, will retry: %s", host.host_id, exc)
        renewer = asyncio.create_task(self._keep_registered(host, ttl, holder, notify),
                                      name=f"powerplane-register-{host.host_id}")
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            session = holder[0]
            if session is not None:
                try:
                    await self._call(lambda c: c.kv.delete(
                        self._prefix + f"hosts/{host.host_id}"))
                    await self._destroy_session(session)
                except StateError as exc:
                    log.warning("could not deregister host %s: %s", host.host_id, exc)

    async def _register(self, host: Host, ttl: int) -> str:
        key = self._prefix + f"hosts/{host.host_id}"
        value = _dump(host.to_json())
        session: str = await self._call(lambda c: c.session.create(
            name=f"powerplane host {host.host_id}", behavior="delete", ttl=ttl, lock_delay=0,
            checks=[],
        ))
        for _ in range(3):
            acquired = await self._call(lambda c: c.kv.put(key, value, acquire=session))
            if acquired:
                log.info("registered host %s (%s)", host.host_id, host.underlay_ip)
                return session
            # A previous run of this very host still holds the key: its session is stale.
            _, item = await self._call(lambda c: c.kv.get(key))
            stale = (item or {}).get("Session")
            if stale and stale != session:
                log.warning("host %s: taking over the key from stale session %s",
                            host.host_id, stale)
                await self._destroy_session(stale)
        await self._destroy_session(session)
        raise StateError(f"could not register host {host.host_id!r}: its key is held elsewhere")

    async def _destroy_session(self, session: str) -> None:
        await self._call(lambda c: c.session.destroy(session))

    async def _renew(self, session: str) -> Any:
        return await self._call(lambda c: _renew(c, session))

    async def _keep_registered(self, host: Host, ttl: int, holder: list[str | None],
                               notify: Callable[[], None]) -> None:
        retry = min(1.0, ttl / 3)
        interval = ttl / 3 if holder[0] else retry
        while True:
            await asyncio.sleep(interval)
            try:
                session = holder[0]
                if session is None or await self._renew(session) is None:
                    if session is not None:
                        log.warning("host %s: session expired; registering again",
                                    host.host_id)
                    holder[0] = await self._register(host, ttl)
                    notify()
                interval = ttl / 3
            except StateError as exc:
                log.warning("host %s: cannot renew registration: %s", host.host_id, exc)
                interval = retry

    # -- watches ----------------------------------------------------------------------------

    def watch_hosts(self) -> AsyncIterator[list[Host]]:
        """Yield the host list now and after every change; rides out Consul outages."""
        return self._watch("hosts/", _hosts)

    def watch_networks(self) -> AsyncIterator[list[Network]]:
        """Yield the network list now and after every change; rides out Consul outages."""
        return self._watch("networks/", _networks)

    async def _watch(
        self, folder: str, parse: Callable[[dict[str, Any]], list[T]]
    ) -> AsyncIterator[list[T]]:
        prefix = self._prefix + folder
        index: int | None = None
        last: list[T] | None = None
        backoff = 0.5
        while True:
            try:
                new_index, items = await self._call(
                    functools.partial(_blocking_list, prefix=prefix, index=index),
                    seconds=WATCH_WAIT_SECONDS + REQUEST_TIMEOUT,
                )
            except StateError as exc:
                log.warning("watching %s: %s; retrying in %.1f s", prefix, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX)
                index = None  # the cluster may have been rebuilt: start over
                continue
            backoff = 0.5
            number = int(new_index)
            # Consul's rule: an index that goes backwards (or is 0) means start over.
            index = None if number <= 0 or (index is not None and number < index) else number
            value = parse(_by_key(prefix, items))
            if value != last:
                last = value
                yield value


def _blocking_list(client: consul.aio.Consul, *, prefix: str, index: int | None) -> Any:
    return client.kv.get(prefix, recurse=True, index=index, wait=f"{WATCH_WAIT_SECONDS}s")


async def _renew(client: consul.aio.Consul, session: str) -> Any:
    """Renew a session; None if Consul no longer knows it."""
    try:
        return await client.session.renew(session)
    except NotFound:
        return None


# -- decoding ------------------------------------------------------------------------------


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


def _safe_key(part: str) -> bool:
    """True if ``part`` can only name one key (no traversal into other keys)."""
    return bool(part) and "/" not in part and part not in (".", "..")


def _ip_sort_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(octet) for octet in ip.split("."))
    except ValueError:
        return (1 << 32,)


def _network(data: Mapping[str, Any]) -> Network:
    try:
        return Network.from_json(data)
    except ValueError as exc:
        raise InvalidNetwork(f"malformed network record in Consul: {exc}") from None


def _networks(items: dict[str, Any]) -> list[Network]:
    networks = []
    for name, value in items.items():
        try:
            networks.append(Network.from_json(value))
        except (ValueError, AttributeError, TypeError):
            log.warning("ignoring malformed network record %s", name)
    return sorted(networks, key=lambda n: n.name)


def _endpoint(container_id: str, data: Mapping[str, Any]) -> Endpoint | None:
    try:
        return Endpoint.from_json(container_id, data)
    except ValueError:
        log.warning("ignoring malformed endpoint record %s", container_id)
        return None


def _hosts(items: dict[str, Any]) -> list[Host]:
    hosts = []
    for host_id, value in items.items():
        try:
            hosts.append(Host.from_json(host_id, value))
        except (ValueError, AttributeError):
            log.warning("ignoring malformed host record %s", host_id)
    return sorted(hosts, key=lambda h: h.host_id)
