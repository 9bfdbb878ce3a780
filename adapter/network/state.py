"""Powerplane's shared state in Consul, one part per kind of record (layout in docs/state.md).

    networks    networks/, subnets/, vnis/, meta/networks-version    (module networks)
    addresses   addresses/<network>/<ip>, ipam/<network>            (module addresses)
    endpoints   endpoints/<container-id>                            (module endpoint_records)
    hosts       hosts/<host-id>, held by TTL sessions               (module hosts)
    floating    floating/<ip>                                       (module floating)
    groups      groups/<name>, meta/groups-version                  (module group_state)
    connections connections/<A>+<B>                                 (module connections)

All of them talk to Consul through one ``ConsulKV`` (the only module importing ``consul``).
Constructing ``State`` touches nothing; the connection opens on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapter.network.addresses import Addresses
from adapter.network.connections import Connections
from adapter.network.consul_kv import ConsulKV
from adapter.network.endpoint_records import EndpointRecords
from adapter.network.floating import FloatingIPs
from adapter.network.group_state import GroupStore
from adapter.network.hosts import Hosts
from adapter.network.networks import VERSION_KEY, Networks
from adapter.settings import Settings

if TYPE_CHECKING:
    from adapter.metrics import Metrics


class State:
    """Networks, addresses, endpoints, hosts, floating addresses, security groups and the
    connections between networks, as every host sees them."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.kv = ConsulKV(settings, metrics)
        self.endpoints = EndpointRecords(self.kv)
        self.networks = Networks(self.kv, settings, self.endpoints)
        self.addresses = Addresses(self.kv, metrics)
        self.hosts = Hosts(self.kv, settings)
        self.floating = FloatingIPs(self.kv)
        self.groups = GroupStore(self.kv, self.endpoints)
        self.connections = Connections(self.kv)

    @property
    def address(self) -> str:
        """Where Consul is, for messages: ``http://127.0.0.1:8500``."""
        return self.kv.address

    async def ping(self) -> None:
        """Raise ConsulUnavailable / ConsulAccessDenied unless Consul serves our KV prefix."""
        # A single-key read: listings are silently filtered by ACLs, single reads are refused.
        await self.kv.get(VERSION_KEY, consistent=False)

    async def close(self) -> None:
        await self.kv.close()
