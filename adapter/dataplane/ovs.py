"""Open vSwitch configuration through OVSDB (the only module that imports ovsdbapp).

Verbs are named like ``ovs-vsctl``'s and every one is idempotent: ensuring what exists changes
nothing, deleting what is gone is not an error. A change that touches several rows (a port, its
interface and the bridge's port list) is one transaction, so a crash never leaves half of it.

ovsdbapp is blocking; every call runs in a worker thread so the event loop never waits on OVSDB.
The connection is opened on first use: constructing an ``Ovs`` touches nothing. Library errors
are translated here, once, into ``DataPlaneError``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ovsdbapp.backend.ovs_idl import command, connection, idlutils
from ovsdbapp.schema.open_vswitch import impl_idl

from adapter.errors import DataPlaneError

SCHEMA = "Open_vSwitch"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OvsPort:
    """One port of a bridge as OVSDB holds it (a port with a single interface)."""

    name: str
    type: str = ""  # the interface type: "" (system), "internal", "vxlan", ...
    tag: int | None = None
    protected: bool = False
    external_ids: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    ofport: int | None = None
    mac: str = ""  # internal ports only: the MAC OVS gives the device ("" = OVS chooses)
    mtu_request: int | None = None


@dataclass(frozen=True, slots=True)
class SwitchFacts:
    """What an Open vSwitch says about itself in its ``Open_vSwitch`` row.

    ``datapath_types`` and ``iface_types`` are written by ovs-vswitchd when it starts: what
    this build and kernel support. ``ovs_version`` is set by the distribution's start script
    and may be empty when the daemons were started by hand.
    """

    ovs_version: str
    db_version: str
    datapath_types: tuple[str, ...]
    iface_types: tuple[str, ...]


def _scalar(value: Any) -> Any:
    """OVSDB optional columns read as [] or [value]."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


class _PortChanges(command.BaseCommand):  # type: ignore[misc]
    """Ports made, updated and removed on one bridge, inside one transaction.

    One command for the whole change, with the bridge's ports indexed by name once: ovsdbapp's
    per-port commands (add_port, db_set by name, del_port) each scan every port, which made a
    change of many ports on a bridge of many ports quadratic (removing 1,000 of 1,200 took
    2 minutes). A removed port's rows are collected by ovsdb-server once unreferenced.
    """

    def __init__(self, api: Any, bridge: str, wanted: list[OvsPort], unwanted: list[str]) -> None:
        super().__init__(api)
        self.bridge, self.wanted, self.unwanted = bridge, wanted, unwanted

    def run_idl(self, txn: Any) -> None:
        bridge = idlutils.row_by_value(self.api.idl, "Bridge", "name", self.bridge)
        ports = {port.name: port for port in bridge.ports}
        for name in self.unwanted:
            if name in ports:
                bridge.delvalue("ports", ports.pop(name))
        for wanted in self.wanted:
            port = ports.get(wanted.name)
            if port is None or not port.interfaces:
                iface = txn.insert(self.api.idl.tables["Interface"])
                iface.name = wanted.name
                port = txn.insert(self.api.idl.tables["Port"])
                port.name = wanted.name
                port.interfaces = [iface]
                bridge.addvalue("ports", port)
                ports[wanted.name] = port
            else:
                iface = port.interfaces[0]
            port.tag = [wanted.tag] if wanted.tag is not None else []
            port.protected = wanted.protected
            port.external_ids = dict(wanted.external_ids)
            iface.type = wanted.type
            iface.options = dict(wanted.options)
            iface.external_ids = dict(wanted.external_ids)
            iface.mac = [wanted.mac] if wanted.mac else []
            iface.mtu_request = [wanted.mtu_request] if wanted.mtu_request else []


class Ovs:
    """Configuration of one Open vSwitch instance, reached at the OVSDB URL ``ovsdb``."""

    def __init__(self, ovsdb: str, *, timeout: float = 10.0) -> None:
        self.url = ovsdb
        self.timeout = timeout
        self._api: Any = None
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> Any:
        with self._lock:
            if self._api is None:
                helper = idlutils.get_schema_helper(self.url, SCHEMA)
                helper.register_all()
                idl = connection.OvsdbIdl(self.url, helper)
                conn = connection.Connection(idl, timeout=self.timeout)
                # NOTE: ovsdbapp keeps the connection in a class attribute, one per class per
                # process. A class of our own per instance lets one process talk to several
                # OVS instances (one per simulated host in the lab, or a tool inspecting many).
                api_class = type("OvsdbApi", (impl_idl.OvsdbIdl,), {"_ovsdb_connection": None})
                self._api = api_class(conn)
            return self._api

    async def _call(self, what: str, work: Callable[[Any], T]) -> T:
        def run() -> T:
            return work(self._connect())

        try:
            return await asyncio.to_thread(run)
        except DataPlaneError:
            raise
        except Exception as exc:
            raise DataPlaneError(f"Open vSwitch at {self.url}: {what} failed: {exc}") from exc

    async def connect(self) -> None:
        """Open the OVSDB connection now (otherwise the first call does)."""
        await self._call("connect", lambda api: None)

    async def close(self) -> None:
        """Close the OVSDB connection (idempotent)."""
        with self._lock:
            api, self._api = self._api, None
        if api is not None:
            await asyncio.to_thread(api.ovsdb_connection.stop, self.timeout)

    # -- bridges -------------------------------------------------------------------------------

    async def ensure_bridge(
        self,
        name: str,
        *,
        datapath: str = "system",
        hwaddr: str | None = None,
        ports: Iterable[str] = (),
        fail_mode: str | None = None,
    ) -> None:
        """Make bridge ``name`` exist with ``datapath`` (and MAC ``hwaddr``) holding ``ports``;
        ``fail_mode`` "secure" keeps ovs-vswitchd from installing a forward-everything flow
        of its own (at start, or when it restarts)."""
        system_ports = list(ports)

        def work(api: Any) -> None:
            # NOTE: one transaction, so a host never sees the underlay port without its bridge.
            with api.transaction(check_error=True) as txn:
                txn.add(api.add_br(name, may_exist=True, datapath_type=datapath))
                txn.add(api.db_set("Bridge", name, ("datapath_type", datapath)))
                if hwaddr is not None:
                    txn.add(api.db_set("Bridge", name, ("other_config", {"hwaddr": hwaddr})))
                if fail_mode is not None:
                    txn.add(api.db_set("Bridge", name, ("fail_mode", fail_mode)))
                for port in system_ports:
                    txn.add(api.add_port(name, port, may_exist=True))

        await self._call(f"ensure bridge {name}", work)

    async def delete_bridge(self, name: str) -> None:
        await self._call(f"delete bridge {name}",
                         lambda api: api.del_br(name, if_exists=True).execute(check_error=True))

    async def switch_facts(self) -> SwitchFacts:
        """The ``Open_vSwitch`` row's version and supported types."""

        def work(api: Any) -> SwitchFacts:
            with api.ovsdb_connection.lock:
                rows = list(api.idl.tables[SCHEMA].rows.values())
                if not rows:
                    return SwitchFacts("", "", (), ())
                row = rows[0]
                return SwitchFacts(
                    ovs_version=str(_scalar(row.ovs_version) or ""),
                    db_version=str(_scalar(row.db_version) or ""),
                    datapath_types=tuple(sorted(row.datapath_types)),
                    iface_types=tuple(sorted(row.iface_types)),
                )

        return await self._call("read the Open_vSwitch table", work)

    async def bridge_datapath(self, name: str) -> str | None:
        """The datapath type of bridge ``name`` ("" means OVS's default, system); None if
        there is no such bridge."""

        def work(api: Any) -> str | None:
            with api.ovsdb_connection.lock:
                row = idlutils.row_by_value(api.idl, "Bridge", "name", name, None)
                return None if row is None else str(row.datapath_type or "")

        return await self._call(f"look up bridge {name}", work)

    async def bridge_exists(self, name: str) -> bool:
        return bool(await self._call(f"look up bridge {name}",
                                     lambda api: api.br_exists(name).execute(check_error=True)))

    # -- ports ---------------------------------------------------------------------------------

    async def ensure_port(
        self,
        bridge: str,
        name: str,
        *,
        tag: int | None = None,
        type: str = "",
        options: Mapping[str, str] | None = None,
        protected: bool = False,
        external_ids: Mapping[str, str] | None = None,
    ) -> None:
        """Make port ``name`` exist on ``bridge`` with exactly these settings."""
        port = OvsPort(name, type, tag, protected, dict(external_ids or {}), dict(options or {}))
        await self.apply(bridge, ensure=[port])

    async def apply(
        self, bridge: str, *, ensure: Iterable[OvsPort] = (), delete: Iterable[str] = ()
    ) -> None:
        """Make ``ensure`` ports exist as described and ``delete`` ports gone: one transaction."""
        wanted = list(ensure)
        unwanted = list(delete)
        if not wanted and not unwanted:
            return

        def work(api: Any) -> None:
            with api.transaction(check_error=True) as txn:
                txn.add(_PortChanges(api, bridge, wanted, unwanted))

        names = ", ".join([*(p.name for p in wanted), *unwanted])
        await self._call(f"change ports {names} on {bridge}", work)

    async def delete_port(self, name: str) -> None:
        """Remove port ``name`` from whatever bridge holds it; nothing if it is gone."""
        await self._call(f"delete port {name}",
                         lambda api: api.del_port(name, if_exists=True).execute(check_error=True))

    async def list_ports(self, bridge: str) -> list[OvsPort]:
        """Every port of ``bridge`` except the bridge's own internal port; [] if no bridge."""

        def work(api: Any) -> list[OvsPort]:
            found: list[OvsPort] = []
            # Read from the IDL's replica under the connection lock: consistent and cheap.
            with api.ovsdb_connection.lock:
                row = idlutils.row_by_value(api.idl, "Bridge", "name", bridge, None)
                if row is None:
                    return found
                for port in row.ports:
                    if port.name == bridge or not port.interfaces:
                        continue
                    iface = port.interfaces[0]
                    found.append(OvsPort(
                        name=port.name,
                        type=iface.type,
                        tag=_scalar(port.tag),
                        protected=bool(_scalar(port.protected)),
                        external_ids=dict(port.external_ids),
                        options=dict(iface.options),
                        ofport=_scalar(iface.ofport),
                        mac=_scalar(iface.mac) or "",
                        mtu_request=_scalar(iface.mtu_request),
                    ))
            return sorted(found, key=lambda p: p.name)

        return await self._call(f"list ports of {bridge}", work)
