"""The tunnel reconciler: keeps this host's VXLAN ports in line with the hosts and networks.

It follows two Consul watches (hosts, networks) and after every change makes the tunnel ports
exactly (remote hosts) x (networks); never a tunnel to this host itself. A reconciliation that
changes nothing writes nothing to OVS. It also runs once every ``interval`` seconds, so tunnels
that OVS lost (a database started afresh, a port deleted by hand) and tunnel neighbours
an ovs-vswitchd restart forgot come back by themselves.

A host whose registration lapsed keeps its tunnels while Consul still records endpoints on it.
Its session expires when it cannot renew it, which is as true of a host whose Consul agent is
down (its containers running and talking) as of a dead one: traffic must not depend on the
control plane being reachable. A host that is gone and holds nothing loses its tunnels; the
underlay address of a lapsed host is the one last seen (in the host list or on our tunnels).

The userspace datapath drops the first packet to a peer whose underlay MAC it has not learnt
(it sends an ARP request instead, and learns only from ARP it sees, which does not happen while
the host's kernel already knows the peer). Hosts publish their underlay MAC in Consul, and every
reconciliation sets it as the peer's tunnel neighbour (``DataPlane.set_tunnel_neighbors``), so
the first frame to a peer goes out. For a peer that publishes none (an older version), one UDP
datagram to its underlay address may make the ARP exchange happen where OVS sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from adapter.dataplane.switch import DataPlane, TunnelChange
from adapter.errors import PowerplaneError
from adapter.model import Host, Network

if TYPE_CHECKING:
    from adapter.metrics import Metrics

log = logging.getLogger(__name__)

DISCARD_PORT = 9  # RFC 863: nothing answers, nothing is disturbed


class Follows(Protocol):
    """A list in Consul followed with blocking queries (``Hosts`` and ``Networks`` are)."""

    def watch(self) -> AsyncIterator[list[Any]]: ...


def prime_peer(remote_ip: str) -> None:
    """Send one datagram to ``remote_ip`` so that its MAC is resolved before tunnel traffic."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.sendto(b"powerplane", (remote_ip, DISCARD_PORT))


class TunnelReconciler:
    """Runs until cancelled: every host or network change becomes one ``set_tunnels`` call."""

    def __init__(self, dataplane: DataPlane, *, hosts: Follows, networks: Follows,
                 holders: Callable[[], Awaitable[set[str]]] | None = None,
                 interval: float | None = None, metrics: Metrics | None = None) -> None:
        self.dataplane = dataplane
        self._metrics = metrics
        self._host_list = hosts
        self._network_list = networks
        self._holders = holders
        self._interval = interval
        self.hosts: list[Host] | None = None
        self.networks: list[Network] | None = None
        self._known: dict[str, Host] = {}  # every host seen, by id: where a lapsed one was
        self.retained: set[str] = set()  # lapsed hosts whose tunnels stay (they hold endpoints)
        self._changed = asyncio.Event()
        self.reconciled = asyncio.Event()  # set after each reconciliation (tests wait on it)

    async def peers(self, registered: Sequence[Host]) -> list[Host]:
        """The hosts to have tunnels to: the registered ones and lapsed ones holding endpoints."""
        self._known.update((h.host_id, h) for h in registered)
        ids = {h.host_id for h in registered}
        ips = {h.underlay_ip for h in registered}
        lapsed = {i: h for i, h in self._known.items() if i not in ids and h.underlay_ip not in ips}
        if lapsed and self._holders is not None:
            try:
                holding = await self._holders()
            except PowerplaneError as exc:
                # Cannot tell who holds what: dropping tunnels on half a picture is the worse
                # mistake, so keep them until Consul answers.
                log.warning("keeping tunnels to %s: %s", ", ".join(sorted(lapsed)), exc)
                holding = set(lapsed)
        else:
            holding = set()
        for host_id in set(lapsed) - holding:
            del self._known[host_id]
            del lapsed[host_id]
        if set(lapsed) != self.retained:
            log.info("hosts not registered but holding endpoints, tunnels kept: %s",
                     ", ".join(sorted(lapsed)) or "-")
        self.retained = set(lapsed)
        return [*registered, *lapsed.values()]

    async def reconcile(self, hosts: Sequence[Host], networks: Sequence[Network]) -> TunnelChange:
        """Make the tunnels match ``hosts`` x ``networks`` once; tell the datapath the peers."""
        change = await self.dataplane.set_tunnels(hosts, networks)
        await self.dataplane.set_tunnel_neighbors(hosts)
        without_mac = {h.underlay_ip for h in hosts if not h.underlay_mac}
        for remote_ip in sorted({t.remote_ip for t in change.added} & without_mac):
            prime_peer(remote_ip)
        if change.added or change.removed:
            log.info("tunnels: +%d -%d (added to: %s; removed to: %s)", len(change.added),
                     len(change.removed),
                     ", ".join(sorted({t.remote_ip for t in change.added})) or "-",
                     ", ".join(sorted({t.remote_ip for t in change.removed})) or "-")
        if self._metrics is not None:
            # Counted on the bridge, not from the lists: what is really there.
            tunnels = await self.dataplane.tunnels()
            self._metrics.tunnels_set(tunnels=len(tunnels),
                                      peers=len({t.host_id for t in tunnels}))
        return change

    async def _follow_hosts(self) -> None:
        async for hosts in self._host_list.watch():
            self.hosts = hosts
            self._changed.set()

    async def _follow_networks(self) -> None:
        async for networks in self._network_list.watch():
            self.networks = networks
            self._changed.set()

    async def run(self) -> None:
        """Follow both watches and reconcile after every change, until cancelled."""
        # Where our tunnels end is known before Consul answers: after a restart of serve, a
        # lapsed peer's address is on the tunnel ports we left.
        with contextlib.suppress(PowerplaneError):
            for tunnel in await self.dataplane.tunnels():
                self._known.setdefault(tunnel.host_id, Host(tunnel.host_id, tunnel.remote_ip,
                                                             "", ""))
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_hosts(), name="powerplane-watch-hosts")
            tasks.create_task(self._follow_networks(), name="powerplane-watch-networks")
            while True:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation
                # that arrives as the event is set, and serve would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._changed.wait()
                self._changed.clear()
                if self.hosts is None or self.networks is None:
                    continue  # reconcile on a full picture only: never drop tunnels on half of it
                try:
                    await self.reconcile(await self.peers(self.hosts), self.networks)
                except PowerplaneError:  # keep following; the next change retries
                    log.exception("tunnel reconciliation failed; retrying on the next change")
                    await asyncio.sleep(1)
                    self._changed.set()
                self.reconciled.set()
