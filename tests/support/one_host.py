"""One complete host in a lab namespace: a Consul dev agent, a private OVS and ``serve``.

For tests that drive the real proxy against a dockerd of their own (the module's ``dockerd``
fixture) without needing other hosts: serve runs inside the namespace with the netdev datapath,
and is ready (its status file says so) when the context is entered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.lab.netns import LabHost, Underlay
from tests.support.consul import ConsulAgent
from tests.support.ovs import OvsInstance
from tests.support.serve import ServeProcess

READY_SECONDS = 30


@dataclass
class OneHost:
    netns: LabHost
    consul: ConsulAgent
    ovs: OvsInstance
    serve: ServeProcess


@contextmanager
def one_host(workdir: Path, docker_url: str, *, prefix: str, bridge: str, host_id: str,
             underlay: bool = False, extra: Sequence[str] = ()) -> Iterator[OneHost]:
    """Start the host (``underlay``: with the namespace's address as ``--underlay-ip``); stop
    serve, OVS and Consul and remove the namespace on the way out."""
    with Underlay(1) as lab:
        netns = lab.hosts[0]
        consul = ConsulAgent.start_dev(workdir / "consul", netns=netns.name)
        ovs: OvsInstance | None = None
        serve: ServeProcess | None = None
        try:
            ovs = OvsInstance.start(workdir / "ovs", netns=netns.name)
            serve = ServeProcess.start(
                workdir / "serve", docker_url,
                ["--consul", consul.http_addr, "--consul-prefix", prefix,
                 "--ovsdb", ovs.db_url, "--datapath", "netdev", "--bridge", bridge,
                 "--host-id", host_id, "--reconcile-interval", "3600",
                 *(["--underlay-ip", netns.ip] if underlay else []), *extra],
                command_prefix=netns.command([]))
            deadline = time.monotonic() + READY_SECONDS
            while (serve.status() or {}).get("state") != "ready":
                assert time.monotonic() < deadline, serve.log()
                time.sleep(0.05)
            yield OneHost(netns, consul, ovs, serve)
        finally:
            if serve is not None:
                serve.stop()
            if ovs is not None:
                ovs.stop()
            consul.kill()
