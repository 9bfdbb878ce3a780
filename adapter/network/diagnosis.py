"""``powerplane doctor``'s checks of one host: each dependency, and whether they agree.

Phase one asks each system on its own, at the same time, so one that is down neither hides nor
delays the others: serve's status file, ``DOCKER_HOST``, Docker, Consul (leader, clock, this
host's registration), Open vSwitch (OVSDB, ovs-vswitchd, the bridge and its datapath) and the
kernel. Phase two compares what phase one read: OVS ports against Consul's endpoint records,
tunnels against the registered peers, Consul's records of this host against Docker's
containers, and probes each peer across the underlay (``adapter.network.peer_paths``). A check
whose source is already reported broken is skipped, not failed twice.

Every check is bounded in time (``findings.CHECK_SECONDS``); a daemon that does not answer is a
finding like any other.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.dataplane import kernel
from adapter.dataplane.ovs import OvsPort
from adapter.dataplane.switch import DataPlane, PluggedPort, Tunnel
from adapter.model import AddressRecord, Endpoint, Host, Network
from adapter.network import peer_paths
from adapter.network.consul_kv import AgentStatus
from adapter.network.docker_api import Docker
from adapter.network.findings import Finding, bounded
from adapter.network.state import State
from adapter.settings import Settings

# The Date header has whole seconds; beyond the measurement's own error, more than this means
# the clocks are not synchronised (NTP keeps them within milliseconds).
MAX_CLOCK_SKEW = 2.0
CONSUL_SECONDS = 3.0
DOCKER_DEFAULT_SOCKET = "unix:///var/run/docker.sock"
# Said of every disagreement that a create in flight also shows for a moment.
IN_FLIGHT = "(a container being created or removed right now looks like this for a moment: " \
            "run doctor again)"


@dataclass
class Observed:
    """What phase one read, for phase two to compare; None where the source was unreadable."""

    docker_up: bool = False
    hosts: list[Host] | None = None
    networks: list[Network] | None = None
    endpoints: list[Endpoint] | None = None  # this host's
    addresses: list[tuple[str, AddressRecord]] | None = None  # this host's
    ports: list[OvsPort] | None = None
    plugged: list[PluggedPort] = field(default_factory=list)
    tunnels: list[Tunnel] = field(default_factory=list)


class Diagnosis:
    """The checks of this host; ``run()`` returns every finding, problems and all."""

    def __init__(self, settings: Settings, environ: Mapping[str, str], *,
                 serve_status: Mapping[str, Any] | None, status_path: Path, state: State,
                 docker: Docker, dataplane: DataPlane) -> None:
        self.settings = settings
        self.environ = environ
        self.serve_status = serve_status
        self.status_path = status_path
        self.state = state
        self.docker = docker
        self.dataplane = dataplane
        self.seen = Observed()

    async def run(self) -> list[Finding]:
        findings = [serve_finding(self.serve_status, self.status_path),
                    docker_host_finding(self.environ, self.settings)]
        for group in await asyncio.gather(self._docker(), self._consul(), self._ovs(),
                                          self._kernel()):
            findings.extend(group)
        for group in await asyncio.gather(self._ports(), self._tunnels(), self._stale(),
                                          self._peers()):
            findings.extend(group)
        return findings

    # -- phase one: each system on its own ---------------------------------------------------

    async def _docker(self) -> list[Finding]:
        url = self.settings.docker_url

        async def run() -> list[Finding]:
            await self.docker.ping()
            self.seen.docker_up = True
            return [Finding.good("docker", url)]

        return await bounded("docker", run, fix=f"start dockerd, or point --docker "
                             f"(POWERPLANE_DOCKER) at its socket (now {url})")

    async def _consul(self) -> list[Finding]:
        where = self.state.address
        unreachable_fix = (f"start the Consul agent of this host, or point --consul "
                           f"(CONSUL_HTTP_ADDR) at one (now {where})")

        async def leader() -> list[Finding]:
            status = await self.state.kv.agent_status(seconds=CONSUL_SECONDS)
            if not status.leader:
                return [Finding.bad(
                    "consul", f"Consul at {where} answers, but its cluster has no leader: "
                    "nothing can be read or written",
                    "a majority of the Consul servers must run and reach each other: see "
                    "`consul members` and `consul operator raft list-peers`")]
            return [Finding.good("consul", f"{where}, leader {status.leader}"),
                    clock_finding(status, where)]

        found = await bounded("consul", leader, fix=unreachable_fix)
        if not all(f.ok for f in found):
            return [*found, Finding.skipped("registration", "Consul is unusable")]

        async def read() -> list[Finding]:
            me = self.settings.host_id
            self.seen.hosts = await self.state.hosts.all()
            self.seen.networks = await self.state.networks.all()
            self.seen.endpoints = await self.state.endpoints.all(host=me)
            self.seen.addresses = await self.state.addresses.held_by(me)
            return await self._registration()

        return [*found, *await bounded("consul state", read, fix=unreachable_fix)]

    async def _registration(self) -> list[Finding]:
        me, check = self.settings.host_id, "registration"
        start_serve = ("start `powerplane serve` on this host: it registers the host and "
                       "renews the registration; other hosts build no tunnel to it until then")
        registration = await self.state.hosts.registration(me)
        if registration is None:
            return [Finding.bad(check, f"Consul has no record of host {me!r} (hosts/{me})",
                                start_serve)]
        if registration.host is None:
            return [Finding.bad(check, f"the record of host {me!r} is damaged",
                                "restart `powerplane serve`: it writes the record anew")]
        if registration.session is None or not registration.session_alive:
            why = ("no session holds it: it will never expire" if registration.session is None
                   else f"its session {registration.session} no longer exists")
            return [Finding.bad(check, f"the record of host {me!r} is stale: {why}",
                                "restart `powerplane serve`: it takes the record over")]
        wanted = self.settings.underlay_ip
        if wanted and registration.host.underlay_ip != wanted:
            return [Finding.bad(
                check, f"host {me!r} is registered with underlay address "
                f"{registration.host.underlay_ip or 'none'}, but this host's is {wanted}: "
                "peers build their tunnels to the wrong address",
                f"restart `powerplane serve` with --underlay-ip {wanted}")]
        return [Finding.good(check, f"hosts/{me} held by live session {registration.session}")]

    async def _ovs(self) -> list[Finding]:
        settings, ovs = self.settings, self.dataplane.ovs
        found: list[Finding] = []

        async def database() -> list[Finding]:
            facts = await ovs.switch_facts()
            version = facts.ovs_version or f"schema {facts.db_version}"
            if facts.datapath_types and settings.datapath not in facts.datapath_types:
                return [Finding.bad(
                    "ovs", f"this Open vSwitch does not offer the {settings.datapath} datapath "
                    f"(only {', '.join(facts.datapath_types)})",
                    "run serve with --datapath " + facts.datapath_types[0] + ", or install an "
                    "Open vSwitch (and kernel) that offers it")]
            needed = ["vxlan"] + (["afxdp-nonpmd"] if settings.datapath == "netdev" else [])
            missing = [t for t in needed if facts.iface_types and t not in facts.iface_types]
            if missing:
                return [Finding.bad("ovs", f"this Open vSwitch cannot make ports of type "
                                    f"{', '.join(missing)}", "install an Open vSwitch built "
                                    "with them (Debian's openvswitch-switch has both)")]
            return [Finding.good("ovs", f"{ovs.url}, {version}")]

        found += await bounded("ovs", database, fix=f"start Open vSwitch (ovsdb-server), or "
                               f"point --ovsdb at its socket (now {ovs.url})")
        if not found[-1].ok:
            return [*found, Finding.skipped("ovs-vswitchd", "OVSDB does not answer"),
                    Finding.skipped("ovs bridge", "OVSDB does not answer")]
        found += await bounded("ovs-vswitchd", self._vswitchd,
                               fix="start ovs-vswitchd (systemctl restart openvswitch-switch)")
        found += await bounded("ovs bridge", self._bridge,
                               fix=f"check Open vSwitch at {ovs.url}")
        return found

    async def _vswitchd(self) -> list[Finding]:
        vswitchd = self.dataplane.vswitchd
        if not vswitchd.reachable:
            return [Finding.skipped("ovs-vswitchd", "OVSDB is remote: its control socket is "
                                    "not on this host")]
        try:
            version = await vswitchd.version()
        except Exception as exc:  # DataPlaneError, or the control socket's own failure
            return [Finding.bad(
                "ovs-vswitchd", f"ovs-vswitchd does not answer: {exc}. OVSDB still holds the "
                "configuration, but no frame is switched and no tunnel carries anything",
                "start ovs-vswitchd (systemctl restart openvswitch-switch, or ovs-ctl start)")]
        return [Finding.good("ovs-vswitchd", version)]

    async def _bridge(self) -> list[Finding]:
        settings, ovs = self.settings, self.dataplane.ovs
        datapath = await ovs.bridge_datapath(settings.bridge)
        if datapath is None:
            return [Finding.bad("ovs bridge", f"bridge {settings.bridge} does not exist",
                                "start `powerplane serve`: it makes the bridge")]
        actual = datapath or "system"
        if actual != settings.datapath:
            return [Finding.bad(
                "ovs bridge", f"bridge {settings.bridge} uses the {actual} datapath, but "
                f"Powerplane is set up for {settings.datapath}",
                f"run serve with --datapath {actual}, or delete the bridge "
                f"(ovs-vsctl del-br {settings.bridge}) and let serve make it anew")]
        self.seen.ports = await ovs.list_ports(settings.bridge)
        self.seen.plugged = await self.dataplane.plugged()
        self.seen.tunnels = await self.dataplane.tunnels()
        broken = [p.name for p in self.seen.ports if p.ofport == -1]
        if broken:
            return [Finding.bad(
                "ovs bridge", f"Open vSwitch cannot open the device of port(s) "
                f"{', '.join(broken)} on {settings.bridge}",
                "a container's interface vanished (its namespace died): serve re-plugs or "
                "removes it at its next reconciliation; if it stays, look at serve's log")]
        return [Finding.good("ovs bridge", f"{settings.bridge} ({actual}), "
                             f"{len(self.seen.ports)} ports")]

    async def _kernel(self) -> list[Finding]:
        datapath = self.settings.datapath
        features = await asyncio.to_thread(kernel.datapath_features, datapath)
        missing = [Finding.bad(f"kernel: {f.name}", f"the kernel lacks {f.name}, needed for "
                               f"{f.needed_for} ({datapath} datapath)", f.fix)
                   for f in features if not f.present]
        return missing or [Finding.good(
            "kernel", f"{datapath} datapath: {', '.join(f.name for f in features)}")]

    # -- phase two: do they agree? -----------------------------------------------------------

    async def _ports(self) -> list[Finding]:
        seen, check = self.seen, "ports vs state"
        if seen.ports is None or seen.endpoints is None:
            return [Finding.skipped(check, "needs both OVS and Consul")]
        recorded = {e.port: e for e in seen.endpoints}
        plugged = {p.port: p for p in seen.plugged}
        found: list[Finding] = []
        for name in sorted(set(plugged) - set(recorded)):
            port = plugged[name]
            found.append(Finding.bad(
                check, f"OVS port {name} (container {port.container_id[:12]}, {port.ip} on "
                f"{port.network}) has no endpoint record in Consul {IN_FLIGHT}",
                "serve removes such a port at its next reconciliation "
                f"(every {self.settings.reconcile_interval:g} s); if it stays, is serve "
                "running? see its log"))
        for name in sorted(set(recorded) - set(plugged)):
            endpoint = recorded[name]
            found.append(Finding.bad(
                check, f"Consul records container {endpoint.container_id[:12]} "
                f"({endpoint.ip} on {endpoint.network}) on this host at port {name}, which is "
                f"not on bridge {self.settings.bridge} {IN_FLIGHT}",
                "serve plugs a running container again at its next reconciliation; if it "
                "stays, is serve running? see its log"))
        return found or [Finding.good(check, f"{len(plugged)} container ports, each recorded")]

    async def _tunnels(self) -> list[Finding]:
        seen, check = self.seen, "tunnels"
        if seen.ports is None or seen.hosts is None or seen.networks is None:
            return [Finding.skipped(check, "needs both OVS and Consul")]
        peers = {h.underlay_ip: h.host_id for h in peer_paths.peers(self.settings, seen.hosts)}
        ends = {t.remote_ip: t.host_id for t in seen.tunnels}
        wanted = peers if seen.networks else {}
        fix = ("serve follows the host list and makes or removes tunnels within seconds; if "
               "this stays, is serve running? see its log")
        found = [Finding.bad(check, f"no tunnel to peer {host} ({ip}), which is registered",
                             fix) for ip, host in sorted(wanted.items()) if ip not in ends]
        found += [Finding.bad(check, f"a tunnel leads to {ip} ({host or 'unknown host'}), "
                              "which no registered host has", fix)
                  for ip, host in sorted(ends.items()) if ip not in wanted]
        return found or [Finding.good(check, f"{len(seen.tunnels)} tunnel ports to "
                                      f"{len(ends)} peers")]

    async def _stale(self) -> list[Finding]:
        seen, check = self.seen, "stale records"
        if seen.endpoints is None or seen.addresses is None:
            return [Finding.skipped(check, "Consul is unusable")]
        if not seen.docker_up:
            return [Finding.skipped(check, "Docker does not answer")]
        endpoints, addresses = seen.endpoints, seen.addresses

        async def run() -> list[Finding]:
            release = ("serve releases it at its next reconciliation (every "
                       f"{self.settings.reconcile_interval:g} s, and at start); if it stays, "
                       "is serve running? see its log")
            found = []
            for endpoint in endpoints:
                if await self.docker.inspect(endpoint.container_id) is None:
                    found.append(Finding.bad(
                        check, f"Consul records container {endpoint.container_id[:12]}"
                        f"{' (' + endpoint.name + ')' if endpoint.name else ''} with "
                        f"{endpoint.ip} on {endpoint.network} on this host, but Docker has no "
                        "such container: the address stays taken and its name resolves to "
                        "nothing", release))
            held = {(e.network, e.ip) for e in endpoints}
            found += [Finding.bad(
                check, f"address {record.ip} of {network} is held for container "
                f"{record.container[:12]} on this host, but no endpoint record uses it "
                f"{IN_FLIGHT}", release)
                for network, record in addresses if (network, record.ip) not in held]
            return found or [Finding.good(
                check, f"{len(endpoints)} endpoints and {len(addresses)} addresses, each with "
                "its container")]

        return await bounded(check, run, fix="check Docker and Consul")

    async def _peers(self) -> list[Finding]:
        return await peer_paths.check_peers(
            self.settings, hosts=self.seen.hosts, tunnels=self.seen.tunnels,
            networks=self.seen.networks or [], serve_status=self.serve_status)


# -- checks that read no daemon --------------------------------------------------------------


def serve_finding(status: Mapping[str, Any] | None, path: Path) -> Finding:
    """Is ``powerplane serve`` running here, and ready?"""
    if status is None:
        return Finding.bad("serve", f"powerplane serve is not running on this host (no live "
                           f"{path})", "start `powerplane serve` with the settings doctor "
                           "was given")
    if status.get("state") != "ready":
        waiting = "; ".join(f"{part}: {why}" for part, why in
                            (status.get("waiting_for") or {}).items())
        return Finding.bad("serve", f"serve (pid {status.get('pid')}) is "
                           f"{status.get('state') or 'starting'}, waiting for "
                           f"{waiting or 'its parts'}", "fix what it waits for (see the "
                           "other findings); creates are refused until then")
    return Finding.good("serve", f"ready (pid {status.get('pid')})")


def _same_endpoint(url: str) -> str:
    """``url`` in one spelling: unix sockets by real path, other schemes lower case."""
    text = url.strip()
    if text.startswith("unix://"):
        return "unix://" + os.path.realpath(text[len("unix://"):] or "/")
    if text.startswith("/"):
        return "unix://" + os.path.realpath(text)
    return text.lower().rstrip("/")


def docker_host_finding(environ: Mapping[str, str], settings: Settings) -> Finding:
    """Does the docker CLI of this environment go through Powerplane?"""
    check, value = "DOCKER_HOST", environ.get("DOCKER_HOST", "").strip()
    listeners = settings.listen or ("unix:///run/powerplane/docker.sock",)
    fix = f"export DOCKER_HOST={listeners[0]}"
    bypass = ("the docker CLI talks to dockerd directly, past Powerplane: containers with "
              "SOCKETPLANE_* get no overlay network")
    if not value:
        return Finding.bad(check, f"DOCKER_HOST is not set, so {bypass} (unless a docker "
                           f"context says otherwise)", fix)
    target = _same_endpoint(value)
    if target in {_same_endpoint(listener) for listener in listeners}:
        return Finding.good(check, f"{value} (a Powerplane listener)")
    if target in {_same_endpoint(settings.docker_url), _same_endpoint(DOCKER_DEFAULT_SOCKET)}:
        return Finding.bad(check, f"DOCKER_HOST={value} is dockerd's own socket: {bypass}", fix)
    return Finding.bad(check, f"DOCKER_HOST={value} is none of this host's Powerplane "
                       f"listeners ({', '.join(listeners)})", fix)


def clock_finding(status: AgentStatus, where: str) -> Finding:
    """This host's clock against the Consul agent's (its HTTP ``Date`` header)."""
    check = "clock"
    if status.agent_time is None:
        return Finding.skipped(check, f"Consul at {where} sent no Date header")
    # Date truncates to the second: the agent's clock read somewhere in [date, date + 1).
    skew = status.agent_time + 0.5 - (status.sent + status.received) / 2
    if abs(skew) > MAX_CLOCK_SKEW:
        return Finding.bad(check, f"this host's clock is {abs(skew):.0f} s "
                           f"{'behind' if skew > 0 else 'ahead of'} Consul's at {where}",
                           "synchronise the clocks of every host (systemd-timesyncd, chrony "
                           "or ntpd): logs stop lining up and TLS certificates fail")
    return Finding.good(check, f"within {MAX_CLOCK_SKEW:g} s of Consul's")
