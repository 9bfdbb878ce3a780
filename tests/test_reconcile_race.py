"""Fault injection: a reconciliation that runs while a sandbox's create call is in flight.

Docker lists a new container a moment before the create call returns its id. The stress bench
caught the reconciler removing such a sandbox as an orphan ("No such container" on the create
that followed). Here fakes force that exact interleaving, which a real daemon produces only by
chance: the fake Docker runs a whole reconciliation inside ``create_sandbox``, after the sandbox
exists and before its id is returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from adapter.model import Endpoint, Network, NetworkSpec
from adapter.network.agent import HostAgent
from adapter.network.create_rewrite import CreateRequest
from adapter.network.docker_api import SandboxSpec
from adapter.network.endpoints import EndpointManager
from adapter.settings import Settings

NETWORK = NetworkSpec.parse("net", "10.44.0.0/24").network(300)


class FakeDocker:
    """Containers in a dict; the create of a sandbox runs ``during_create`` before returning."""

    def __init__(self) -> None:
        self.containers_by_id: dict[str, dict[str, Any]] = {}
        self.removed: list[str] = []
        self.during_create: Any = None
        self.after_listing_apps: Any = None

    async def create_sandbox(self, spec: SandboxSpec) -> str:
        sandbox_id = f"{len(self.containers_by_id) + 1:064x}"
        self.containers_by_id[sandbox_id] = {"Id": sandbox_id, "Labels": dict(spec.labels),
                                             "State": "created"}
        if self.during_create is not None:
            await self.during_create()
        return sandbox_id

    async def containers(self, *, label: str) -> list[dict[str, Any]]:
        key, _, value = label.partition("=")
        found = [c for c in self.containers_by_id.values()
                 if key in c["Labels"] and (not value or c["Labels"][key] == value)]
        if key == "io.powerplane.sandbox" and self.after_listing_apps is not None:
            hook, self.after_listing_apps = self.after_listing_apps, None
            await hook()
        return found

    async def start(self, container: str) -> None:
        self.containers_by_id[container]["State"] = "running"

    async def running_pid(self, container: str) -> int | None:
        return 4242 if container in self.containers_by_id else None

    async def remove(self, container: str) -> None:
        self.removed.append(container)
        self.containers_by_id.pop(container, None)


class FakeDataPlane:
    def __init__(self) -> None:
        self.ports: dict[str, Any] = {}

    async def plug(self, *, container_id: str, netns: int | str, network: Network,
                   ip: str, groups: Iterable[str] = ()) -> Any:
        port = type("Port", (), {"container_id": container_id, "port": "ovs" + container_id[:12],
                                 "mac": "02:42:0a:2c:00:02"})()
        self.ports[container_id] = port
        return port

    async def unplug(self, container_id: str) -> None:
        self.ports.pop(container_id, None)

    async def plugged(self) -> Sequence[Any]:
        return list(self.ports.values())

    async def port_links(self) -> set[str]:
        # Every plugged port's veth is alive: these tests are about Docker and Consul.
        return {port.port for port in self.ports.values()}

    async def ensure(self) -> bool:
        return False  # the bridge is there

    async def remove_port_link(self, port: str) -> None:
        raise AssertionError(f"no veth is a stray here, yet {port} was removed")

    async def set_gateways(self, networks: Iterable[Network]) -> list[str]:
        return []  # gateways are the data plane's own business; not what these tests race

    async def set_published(self, published: Iterable[Any]) -> bool:
        return False


class NoFloating:
    async def all(self) -> list[Any]:
        return []


class FakeState:
    """The parts of State the endpoint manager and the agent use, in memory."""

    def __init__(self) -> None:
        self.addresses = self
        self.endpoints = self
        self.networks = self
        self.floating = NoFloating()
        self.held: dict[str, str] = {}

    async def get(self, name: str) -> Network:
        return NETWORK

    async def for_subnet(self, subnet: object) -> Network:
        return NETWORK

    async def allocate(self, network: Network, *, container: str, host: str) -> str:
        ip = f"10.44.0.{len(self.held) + 2}"
        self.held[ip] = container
        return ip

    async def release_if_owned(self, network: str, ip: str, owner: str) -> bool:
        return self.held.pop(ip, None) is not None

    async def all(self, *, host: str | None = None) -> list[Any]:
        return [NETWORK] if host is None else []

    async def of_network(self, network: str) -> Mapping[str, Any]:
        return {}

    async def put(self, endpoint: Endpoint) -> None:
        pass


class FakeHost:
    """One host's endpoint manager and agent over the fakes above."""

    def __init__(self) -> None:
        settings = Settings(host_id="h1")
        self.docker, self.dataplane, self.state = FakeDocker(), FakeDataPlane(), FakeState()
        self.endpoints = EndpointManager(
            settings, state=self.state, dataplane=self.dataplane,  # type: ignore[arg-type]
            docker=self.docker)  # type: ignore[arg-type]
        self.agent = HostAgent(
            settings, state=self.state, dataplane=self.dataplane,  # type: ignore[arg-type]
            docker=self.docker, endpoints=self.endpoints)  # type: ignore[arg-type]


async def test_a_sandbox_whose_create_is_in_flight_is_not_removed() -> None:
    """A reconciliation between Docker creating the sandbox and the create call returning
    leaves it alone; the attach completes with the sandbox plugged and its address held."""
    host = FakeHost()
    reports = []

    async def reconcile_now() -> None:
        reports.append(await host.agent.reconcile())

    host.docker.during_create = reconcile_now
    request = CreateRequest.parse({"Env": ["SOCKETPLANE_CIDR=10.44.0.0/24"]}, app_name="app")
    assert request is not None
    attachment = await host.endpoints.attach(request)
    assert len(reports) == 1 and reports[0].removed_sandboxes == []
    assert host.docker.removed == []
    assert attachment.sandbox_id in host.docker.containers_by_id
    assert attachment.sandbox_id in host.dataplane.ports
    assert host.state.held == {attachment.ip: attachment.sandbox_id}


async def test_an_app_committed_during_a_reconciliation_keeps_its_sandbox() -> None:
    """The app's create returns and is committed just after the reconciler listed the apps
    (so its listing lacks the app): the sandbox, its port and its address stay."""
    host = FakeHost()
    request = CreateRequest.parse({"Env": ["SOCKETPLANE_CIDR=10.44.0.0/24"]}, app_name="app")
    assert request is not None
    attachment = await host.endpoints.attach(request)

    async def app_created_and_committed() -> None:
        app_id = "a" * 64
        host.docker.containers_by_id[app_id] = {
            "Id": app_id, "State": "created",
            "Labels": attachment.app_labels("h1")}
        await host.endpoints.commit(app_id=app_id, network="net", ip=attachment.ip,
                               mac=attachment.mac, port=attachment.port,
                               sandbox_id=attachment.sandbox_id)

    host.docker.after_listing_apps = app_created_and_committed
    report = await host.agent.reconcile()
    assert (report.removed_sandboxes, report.removed_ports, report.released_addresses) == (
        [], [], [])
    assert attachment.sandbox_id in host.docker.containers_by_id
    assert attachment.sandbox_id in host.dataplane.ports
    assert host.state.held == {attachment.ip: attachment.sandbox_id}


async def test_a_sandbox_left_by_a_create_that_never_returned_is_removed() -> None:
    """The token protects only a create in flight in this process: a sandbox labelled by a
    create that is over (a crashed serve) is an orphan, and the next reconciliation removes it."""
    host = FakeHost()
    orphan = await host.docker.create_sandbox(SandboxSpec(image="busybox", labels={
        "io.powerplane.role": "sandbox", "io.powerplane.host": "h1",
        "io.powerplane.network": "net", "io.powerplane.creation": "0123456789abcdef"}))
    report = await host.agent.reconcile()
    assert report.removed_sandboxes == [orphan[:12]]
    assert host.docker.removed == [orphan]
