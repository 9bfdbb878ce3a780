"""Unit tests of host-port claims and of the forwards the firewall gets, over a fake listing.

The fake stands in for Docker's container listing only; the bind probe is the real one where a
test says so, on sockets it opens on 127.0.0.1 of this process's namespace.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from adapter.errors import BadRequest, PortConflict
from adapter.network.port_claims import (
    DEFAULT_EPHEMERAL_RANGE,
    PortClaims,
    ProbeFailure,
    bind_probe,
    ephemeral_range,
)
from adapter.network.ports import PortBinding, PortRequest, PublishedPorts
from adapter.network.published import PortForward, published_ports

HOST = "h1"


def app(app_id: str, ports: PublishedPorts | str, *, host: str = HOST, ip: str = "10.0.6.2",
        created: int = 1) -> dict[str, Any]:
    label = ports if isinstance(ports, str) else ports.encode()
    return {"Id": app_id, "Created": created, "State": "running", "Labels": {
        "io.powerplane.sandbox": "s" + app_id, "io.powerplane.host": host,
        "io.powerplane.ip": ip, "io.powerplane.ports": label}}


def published(*bindings: PortBinding) -> PublishedPorts:
    return PublishedPorts(bindings, frozenset((b.container_port, b.proto) for b in bindings))


class FakeDocker:
    """A container listing in a list; ``during_listing`` runs inside a listing call, after the
    listing was read (the moment a real listing is on its way back)."""

    def __init__(self) -> None:
        self.apps: list[dict[str, Any]] = []
        self.images: dict[str, dict[str, Any]] = {}
        self.during_listing: Callable[[], Awaitable[None]] | None = None
        self.listings = 0

    async def containers(self, *, label: str) -> list[dict[str, Any]]:
        self.listings += 1
        found = [dict(a) for a in self.apps if label in a["Labels"]]
        if self.during_listing is not None:
            hook, self.during_listing = self.during_listing, None
            await hook()
        return found

    async def image_config(self, image: str) -> Mapping[str, Any] | None:
        return self.images.get(image)


def request(port_bindings: Any = None, exposed: Any = None,
            publish_all: bool = False) -> PortRequest:
    return PortRequest.parse({"ExposedPorts": exposed, "HostConfig": {
        "PortBindings": port_bindings, "PublishAllPorts": publish_all}})


def no_process(binding: PortBinding) -> ProbeFailure | None:
    return None


def claims(docker: FakeDocker, probe: Any = no_process) -> PortClaims:
    return PortClaims(docker, HOST, probe=probe)


@pytest.fixture
def loopback_port() -> Iterator[socket.socket]:
    """A TCP socket listening on 127.0.0.1 at a port the kernel chose."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        yield held


async def test_a_port_published_by_another_app_of_this_host_is_refused() -> None:
    """Docker's words, with the address asked for; other hosts' apps and other ports pass."""
    docker = FakeDocker()
    docker.apps = [app("a", published(PortBinding("tcp", "", 8080, 80))),
                   app("b", published(PortBinding("tcp", "", 9090, 80)), host="h2")]
    ports = claims(docker)
    with pytest.raises(PortConflict) as refused:
        await ports.claim(request({"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}),
                          image=None, endpoint="web")
    assert refused.value.status == 409
    assert refused.value.message == (
        "driver failed programming external connectivity on endpoint web: "
        "Bind for 127.0.0.1:8080 failed: port is already allocated")
    claim = await ports.claim(request({"80/tcp": [{"HostPort": "9090"}],
                                       "81/udp": [{"HostPort": "8080"}]}),
                              image=None, endpoint=None)
    assert claim.ports.bindings == (PortBinding("tcp", "", 9090, 80),
                                    PortBinding("udp", "", 8080, 81))


async def test_two_addresses_of_one_port_may_both_be_published() -> None:
    """127.0.0.1:8080 and 192.168.50.11:8080 are two addresses: both may be published."""
    docker = FakeDocker()
    docker.apps = [app("a", published(PortBinding("tcp", "127.0.0.1", 8080, 80)))]
    claim = await claims(docker).claim(
        request({"80/tcp": [{"HostIp": "192.168.50.11", "HostPort": "8080"}]}),
        image=None, endpoint=None)
    assert claim.ports.bindings == (PortBinding("tcp", "192.168.50.11", 8080, 80),)


async def test_one_create_asking_twice_for_a_port_is_refused() -> None:
    """-p 8080:80 -p 8080:81 in one create is refused as Docker refuses it."""
    with pytest.raises(PortConflict, match=r"Bind for 0\.0\.0\.0:8080 failed"):
        await claims(FakeDocker()).claim(
            request({"80/tcp": [{"HostPort": "8080"}], "81/tcp": [{"HostPort": "8080"}]}),
            image=None, endpoint=None)


async def test_concurrent_creates_for_one_port_one_wins() -> None:
    """Both list before either chooses: the reservation of the first is what the second meets."""
    docker = FakeDocker()
    ports = claims(docker)
    wanted = request({"80/tcp": [{"HostPort": "8080"}]})
    results = await asyncio.gather(
        *(ports.claim(wanted, image=None, endpoint=None) for _ in range(5)),
        return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, PortConflict) for r in results if isinstance(r, BaseException))
    assert len(ports) == 1


async def test_a_failed_create_gives_its_ports_back() -> None:
    """A released claim holds nothing: the same port can be claimed again at once."""
    ports = claims(FakeDocker())
    wanted = request({"80/tcp": [{"HostPort": "8080"}]})
    claim = await ports.claim(wanted, image=None, endpoint=None)
    ports.release(claim)
    assert len(ports) == 0
    await ports.claim(wanted, image=None, endpoint=None)


async def test_a_settled_claim_counts_until_a_listing_begun_after_it() -> None:
    """An app settled while a listing was on its way (the listing lacks it) still holds its
    port; the next listing, which shows the app, is what holds it from then on."""
    docker = FakeDocker()
    ports = claims(docker)
    wanted = request({"80/tcp": [{"HostPort": "8080"}]})
    first = await ports.claim(wanted, image=None, endpoint=None)

    async def app_created_and_settled() -> None:
        ports.settle(first)  # the listing already read misses the app

    docker.during_listing = app_created_and_settled
    with pytest.raises(PortConflict):
        await ports.claim(wanted, image=None, endpoint=None)
    docker.apps = [app("a", first.ports)]
    with pytest.raises(PortConflict):
        await ports.claim(wanted, image=None, endpoint=None)
    assert len(ports) == 0  # the listing shows the app: the settled claim is dropped
    docker.apps = []  # the app was removed
    await ports.claim(wanted, image=None, endpoint=None)


async def test_free_ports_are_handed_out_in_turn_around_taken_ones() -> None:
    """HostPort empty: the kernel's ephemeral range, skipping what is taken, published or
    bound, and starting after the last one handed out."""
    docker = FakeDocker()
    low = ephemeral_range()[0]
    docker.apps = [app("a", published(PortBinding("tcp", "", low, 80)))]
    bound = {low + 1}

    def probe(binding: PortBinding) -> ProbeFailure | None:
        if binding.host_port in bound:
            return ProbeFailure("bind", OSError(98, "Address already in use"))
        return None

    ports = claims(docker, probe)
    first = await ports.claim(request({"80/tcp": [{}], "81/tcp": [{"HostPort": str(low + 3)}]}),
                              image=None, endpoint=None)
    assert first.ports.bindings == (PortBinding("tcp", "", low + 2, 80),
                                    PortBinding("tcp", "", low + 3, 81))
    second = await ports.claim(request({"80/udp": [{}], "80/tcp": [{}]}), image=None,
                               endpoint=None)
    assert second.ports.bindings == (PortBinding("tcp", "", low + 4, 80),
                                     PortBinding("udp", "", low, 80))


async def test_a_host_range_takes_its_first_free_port_or_is_refused() -> None:
    """-p 8000-8001:80 takes the first port of the range nobody holds; none left is a 409."""
    docker = FakeDocker()
    docker.apps = [app("a", published(PortBinding("tcp", "", 8000, 80)))]
    ports = claims(docker)
    claim = await ports.claim(request({"80/tcp": [{"HostPort": "8000-8001"}]}), image=None,
                              endpoint=None)
    assert claim.ports.bindings == (PortBinding("tcp", "", 8001, 80),)
    with pytest.raises(PortConflict, match=r"Bind for 0\.0\.0\.0:8000-8001 failed: no free tcp"):
        await ports.claim(request({"80/tcp": [{"HostPort": "8000-8001"}]}), image=None,
                          endpoint=None)


async def test_publish_all_takes_the_images_exposed_ports() -> None:
    """-P publishes the request's exposed ports and the image's, each on a free port."""
    docker = FakeDocker()
    docker.images["nginx"] = {"ExposedPorts": {"80/tcp": {}}}
    claim = await claims(docker).claim(request(None, {"9000/udp": {}}, True), image="nginx",
                                       endpoint=None)
    assert [(b.container_port, b.proto) for b in claim.ports.bindings] == [(80, "tcp"),
                                                                          (9000, "udp")]
    assert claim.ports.exposed == {(80, "tcp"), (9000, "udp")}


async def test_exposing_alone_asks_docker_nothing() -> None:
    """--expose without -p/-P publishes nothing, so no listing is needed."""
    docker = FakeDocker()
    claim = await claims(docker).claim(request(None, {"80/tcp": {}}), image=None, endpoint=None)
    assert claim.ports == PublishedPorts((), frozenset({(80, "tcp")}))
    assert docker.listings == 0


async def test_a_port_a_process_listens_on_is_refused_in_dockers_words(
        loopback_port: socket.socket) -> None:
    """The real probe: a TCP listener on 127.0.0.1 holds the port for 127.0.0.1 and for every
    address; UDP of the same number is free."""
    port = loopback_port.getsockname()[1]
    ports = claims(FakeDocker(), bind_probe)
    for host_ip, address in (("127.0.0.1", "127.0.0.1"), ("", "0.0.0.0")):
        with pytest.raises(PortConflict) as refused:
            await ports.claim(request({"80/tcp": [{"HostIp": host_ip, "HostPort": str(port)}]}),
                              image=None, endpoint="web")
        assert refused.value.message == (
            "driver failed programming external connectivity on endpoint web: Error starting "
            f"userland proxy: listen tcp4 {address}:{port}: bind: address already in use")
    assert len(ports) == 0
    claim = await ports.claim(request({"80/udp": [{"HostIp": "127.0.0.1",
                                                   "HostPort": str(port)}]}),
                              image=None, endpoint=None)
    assert claim.ports.bindings == (PortBinding("udp", "127.0.0.1", port, 80),)


def test_the_probe_sees_udp_and_leaves_nothing_bound() -> None:
    """A bound UDP port fails the probe; a free one passes, and the probe keeps nothing bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        failure = bind_probe(PortBinding("udp", "127.0.0.1", port, 53))
        assert failure is not None and failure.call == "bind" and failure.error.errno == 98
    assert bind_probe(PortBinding("udp", "127.0.0.1", port, 53)) is None
    assert bind_probe(PortBinding("udp", "127.0.0.1", port, 53)) is None  # closed again


async def test_an_address_not_of_this_host_is_a_400_at_once() -> None:
    """192.0.2.1 (TEST-NET) is nobody's here: one probe, a 400, even for a free-port pick."""
    probes: list[PortBinding] = []

    def probe(binding: PortBinding) -> ProbeFailure | None:
        probes.append(binding)
        return bind_probe(binding)

    ports = claims(FakeDocker(), probe)
    for host_port in ("8080", ""):
        with pytest.raises(BadRequest) as refused:
            await ports.claim(request({"80/tcp": [{"HostIp": "192.0.2.1",
                                                   "HostPort": host_port}]}),
                              image=None, endpoint=None)
        assert refused.value.status == 400
        assert "bind: cannot assign requested address" in refused.value.message
    assert len(probes) == 2


def test_the_ephemeral_range_is_the_kernels_or_dockers_default(tmp_path: Path) -> None:
    """The kernel's range when it reads as one; Docker's default otherwise."""
    (tmp_path / "range").write_text("32768\t60999\n")
    assert ephemeral_range(tmp_path / "range") == (32768, 60999)
    (tmp_path / "range").write_text("0 70000\n")
    assert ephemeral_range(tmp_path / "range") == DEFAULT_EPHEMERAL_RANGE
    assert ephemeral_range(tmp_path / "missing") == DEFAULT_EPHEMERAL_RANGE


# -- what the firewall gets -----------------------------------------------------------------


def test_published_ports_flattens_this_hosts_apps() -> None:
    """One forward per published port of this host's apps; other hosts' apps, exposed-only
    and empty labels give none."""
    apps = [
        app("a", PublishedPorts(
            (PortBinding("tcp", "", 18100, 80), PortBinding("tcp", "", 18101, 81),
             PortBinding("udp", "127.0.0.1", 5353, 53)), frozenset({(9000, "tcp")})),
            ip="10.0.6.2"),
        app("b", published(PortBinding("tcp", "", 8080, 80)), host="h2"),
        app("c", PublishedPorts((), frozenset({(80, "tcp")})), ip="10.0.6.3"),
        app("d", "", ip="10.0.6.4"),
        {"Id": "sandbox", "Labels": {"io.powerplane.role": "sandbox"}},
    ]
    assert published_ports(apps, HOST) == [
        PortForward("tcp", "", 18100, "10.0.6.2", 80),
        PortForward("tcp", "", 18101, "10.0.6.2", 81),
        PortForward("udp", "127.0.0.1", 5353, "10.0.6.2", 53),
    ]


def test_published_ports_skips_what_is_malformed_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """Forged labels: bad JSON, a bad address, a port an older app forwards already; the
    rest is forwarded and each skip is logged."""
    apps = [
        app("new", published(PortBinding("tcp", "127.0.0.1", 8080, 80),
                             PortBinding("tcp", "", 8081, 81)), ip="10.0.6.5", created=9),
        app("bad-json", "{not json", ip="10.0.6.3"),
        app("bad-ip", published(PortBinding("tcp", "", 9000, 80)), ip="10.0.6.999"),
        app("old", published(PortBinding("tcp", "", 8080, 80)), ip="10.0.6.2", created=1),
        {"Id": "nolabels", "Labels": None},
        {"Id": "odd", "Labels": {"io.powerplane.host": HOST, "io.powerplane.ports": 5}},
    ]
    with caplog.at_level(logging.WARNING):
        forwards = published_ports(apps, HOST)
    assert forwards == [PortForward("tcp", "", 8080, "10.0.6.2", 80),
                        PortForward("tcp", "", 8081, "10.0.6.5", 81)]
    logged = caplog.text
    assert "bad-json" in logged and "10.0.6.999" in logged
    assert "127.0.0.1:8080/tcp is published by an older container" in logged
