"""ovs-vswitchd's control socket (unixctl), for what OVSDB cannot say: the only ``ovs`` importer.

Used for two things: asking whether ovs-vswitchd runs at all (``version``; OVSDB answers
without it), and the userspace datapath's tunnel neighbour table. Userspace VXLAN resolves
the underlay MAC of a tunnel's far end itself, from ARP it snoops on the underlay bridge; until
it has one, it drops the packet it was asked to send and sends an ARP instead. The host's own
kernel usually knows the peer already (Consul talks over the underlay), so no ARP passes and the
first frames to a peer are lost. Every host publishes its underlay MAC in Consul; here it is set
as a neighbour entry (``tnl/neigh/set``), so the first frame to a peer goes out.

The control socket is found as ``ovs-appctl`` finds it: ``ovs-vswitchd.pid`` in the run
directory, which is the directory of the OVSDB unix socket. The library is blocking: each call
runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import ovs.unixctl.client

from adapter.errors import DataPlaneError

PIDFILE = "ovs-vswitchd.pid"


class Vswitchd:
    """The ovs-vswitchd next to the OVSDB at ``ovsdb_url`` (``unix:PATH`` only)."""

    def __init__(self, ovsdb_url: str) -> None:
        scheme, _, path = ovsdb_url.partition(":")
        self._rundir = Path(path).parent if scheme == "unix" and path else None

    @property
    def reachable(self) -> bool:
        """False when OVS is remote (a TCP OVSDB): its control socket is not on this host."""
        return self._rundir is not None

    def pid(self) -> int | None:
        """The running ovs-vswitchd's pid as its pidfile says; None if unknown. A new pid
        means a restarted vswitchd, which has lost everything it held only in memory."""
        if self._rundir is None:
            return None
        try:
            return int((self._rundir / PIDFILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _control_socket(self) -> str:
        assert self._rundir is not None
        try:
            pid = int((self._rundir / PIDFILE).read_text().strip())
        except FileNotFoundError:
            raise DataPlaneError(
                f"ovs-vswitchd is not running (no {self._rundir / PIDFILE})") from None
        except (OSError, ValueError) as exc:
            raise DataPlaneError(
                f"ovs-vswitchd is not running (no pid in {self._rundir / PIDFILE}): {exc}"
            ) from None
        return str(self._rundir / f"ovs-vswitchd.{pid}.ctl")

    def _command(self, command: str, *args: str) -> str:
        path = self._control_socket()
        error, client = ovs.unixctl.client.UnixctlClient.create(path)
        if error or client is None:
            reason = os.strerror(error) if isinstance(error, int) and error else "no client"
            raise DataPlaneError(f"cannot reach ovs-vswitchd at {path}: {reason}")
        try:
            error, failure, result = client.transact(command, list(args))
        finally:
            client.close()
        if error or failure is not None:
            raise DataPlaneError(f"ovs-vswitchd refused {command} {' '.join(args)}: "
                                 f"{failure or f'error {error}'}".strip())
        return str(result or "")

    async def version(self) -> str:
        """ovs-vswitchd's own version line; DataPlaneError when it does not answer (stopped)."""
        return (await asyncio.to_thread(self._command, "version")).strip().splitlines()[0]

    async def tunnel_neighbors(self) -> dict[str, str]:
        """The userspace datapath's tunnel neighbours: underlay IP → MAC."""
        table = await asyncio.to_thread(self._command, "tnl/neigh/show")
        neighbors: dict[str, str] = {}
        for line in table.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].count(".") == 3:
                neighbors[fields[0]] = fields[1].lower()
        return neighbors

    async def set_tunnel_neighbor(self, bridge: str, ip: str, mac: str) -> None:
        """Tell the userspace datapath the underlay MAC of tunnel end ``ip`` behind ``bridge``."""
        await asyncio.to_thread(self._command, "tnl/neigh/set", bridge, ip, mac)
