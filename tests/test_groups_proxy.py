"""SOCKETPLANE_GROUPS through the real proxy: joining groups that exist, refusing those that don't.

One ``powerplane serve`` for the module in front of a private dockerd, with a Consul dev agent and
Open vSwitch inside one lab namespace (as tests/test_hostile_input.py). A refused create must be
a Docker-shaped 400 the docker CLI prints (a 404 would make it try to pull the image) and leave
nothing: no sandbox, no address, not even the network a SOCKETPLANE_CIDR would have created.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.lab.netns import LabHost
from tests.support import rawhttp
from tests.support.consul import ConsulAgent
from tests.support.dockerd import DockerDaemon
from tests.support.one_host import one_host
from tests.support.ovs import OvsInstance
from tests.support.serve import POWERPLANE, ServeProcess

pytestmark = pytest.mark.lab

PREFIX = "groups/"
CREATE = "/v1.41/containers/create"
SANDBOX_FILTER = quote(json.dumps({"label": ["io.powerplane.role=sandbox"]}))
NETWORK, CIDR = "front", "10.78.0.0/24"
UNUSED_CIDR, UNUSED_NETWORK = "10.79.0.0/24", "net-10.79.0.0-24"


class Plane:
    def __init__(self, netns: LabHost, consul: ConsulAgent, dockerd: DockerDaemon,
                 serve: ServeProcess, ovs: OvsInstance) -> None:
        self.netns = netns
        self.consul = consul
        self.dockerd = dockerd
        self.serve = serve
        self.ovs = ovs

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.netns.run([POWERPLANE, *args, "--consul", self.consul.http_addr,
                               "--consul-prefix", PREFIX], check=False)

    def create(self, *env: str, name: str) -> rawhttp.Reply:
        body = {"Image": "busybox", "Cmd": ["sleep", "1000"], "Env": list(env)}
        return rawhttp.request(self.serve.socket, "POST", f"{CREATE}?name={name}",
                               json.dumps(body).encode())

    def remove(self, container: str) -> None:
        reply = rawhttp.request(self.serve.socket, "DELETE",
                                f"/v1.41/containers/{container}?force=1", content_type=None)
        assert reply.status == 204, reply

    def kv_get(self, key: str) -> Any:
        result = self.netns.run(["curl", "-s", "-w", "\n%{http_code}",
                                 f"http://{self.consul.http_addr}/v1/kv/{PREFIX}{key}?raw"])
        body, _, code = result.stdout.rpartition("\n")
        return json.loads(body) if code == "200" else None

    def kv_keys(self, folder: str) -> list[str]:
        result = self.netns.run(["curl", "-s", "-w", "\n%{http_code}",
                                 f"http://{self.consul.http_addr}/v1/kv/{PREFIX}{folder}?keys"])
        body, _, code = result.stdout.rpartition("\n")
        return [key[len(PREFIX):] for key in json.loads(body)] if code == "200" else []

    def sandboxes(self) -> list[str]:
        reply = rawhttp.request(self.dockerd.socket, "GET",
                                f"/v1.41/containers/json?all=1&filters={SANDBOX_FILTER}")
        assert reply.status == 200, reply
        return [c["Id"] for c in reply.json]

    def assert_nothing_allocated(self) -> None:
        assert self.sandboxes() == []
        assert self.kv_keys("addresses/") == []
        assert self.kv_keys("endpoints/") == []
        assert f"networks/{UNUSED_NETWORK}" not in self.kv_keys("networks/")
        assert "Traceback" not in self.serve.log()


@pytest.fixture(scope="module")
def plane(dockerd: DockerDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    workdir = tmp_path_factory.mktemp("groups")
    with one_host(workdir, dockerd.url, prefix=PREFIX, bridge="ppgroups", host_id="groups",
                  underlay=True, extra=["--dataplane-wait", "30"]) as host:
        made = Plane(host.netns, host.consul, dockerd, host.serve, host.ovs)
        for args in (("network", "create", NETWORK, CIDR), ("group", "create", "web"),
                     ("group", "create", "admin")):
            result = made.cli(*args)
            assert result.returncode == 0, result.stderr
        yield made
        assert host.serve.process.poll() is None, "serve died during the module"


@pytest.mark.parametrize(("env", "needle"), [
    (f"SOCKETPLANE_NETWORK={NETWORK}", "security group 'nope' (SOCKETPLANE_GROUPS) does not "
                                       "exist: create it with `powerplane group create nope`"),
    (f"SOCKETPLANE_CIDR={UNUSED_CIDR}", "security group 'nope'"),
])
def test_unknown_group_is_a_400_and_nothing_is_made(plane: Plane, env: str,
                                                    needle: str) -> None:
    reply = plane.create(env, "SOCKETPLANE_GROUPS=web,nope", name="grp-unknown")
    assert reply.status == 400, reply
    assert reply.headers.get("content-type", "").startswith("application/json")
    assert needle in reply.message, reply.message
    plane.assert_nothing_allocated()


@pytest.mark.parametrize(("groups", "needle"), [
    ("web,-x", "invalid group name '-x'"),
    ("we b", "invalid group name 'we b'"),
])
def test_malformed_group_names_are_a_400(plane: Plane, groups: str, needle: str) -> None:
    reply = plane.create(f"SOCKETPLANE_NETWORK={NETWORK}", f"SOCKETPLANE_GROUPS={groups}",
                         name="grp-bad")
    assert reply.status == 400, reply
    assert needle in reply.message, reply.message
    plane.assert_nothing_allocated()


def test_docker_cli_prints_the_refusal_and_pulls_nothing(plane: Plane) -> None:
    result = subprocess.run(
        ["docker", "-H", plane.serve.url, "create", "--name", "grp-cli",
         "-e", f"SOCKETPLANE_NETWORK={NETWORK}", "-e", "SOCKETPLANE_GROUPS=nope",
         "busybox", "true"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "security group 'nope' (SOCKETPLANE_GROUPS) does not exist" in result.stderr
    assert "Unable to find image" not in result.stderr  # a 404 would make the CLI pull
    plane.assert_nothing_allocated()


def test_a_container_joins_its_groups(plane: Plane) -> None:
    """The endpoint record carries the groups; the group cannot go while the container is in
    it; network info and group info show the membership; after removal, rm works."""
    reply = plane.create(f"SOCKETPLANE_NETWORK={NETWORK}", "SOCKETPLANE_GROUPS= web ,admin,web",
                         name="grp-member")
    assert reply.status == 201, reply
    app_id = reply.json["Id"]
    plain = plane.create(f"SOCKETPLANE_NETWORK={NETWORK}", name="grp-plain")
    assert plain.status == 201, plain
    try:
        record = plane.kv_get(f"endpoints/{app_id}")
        assert record["groups"] == ["web", "admin"]
        assert plane.kv_get(f"endpoints/{plain.json['Id']}")["groups"] == []
        refused = plane.cli("group", "rm", "admin")
        assert refused.returncode == 1
        assert "'admin' is in use by 1 container(s): grp-member" in refused.stderr
        info = json.loads(plane.cli("group", "info", "web", "--json").stdout)
        assert [m["name"] for m in info["members"]] == ["grp-member"]
        network = plane.cli("network", "info", NETWORK)
        row = next(line for line in network.stdout.splitlines() if line.startswith(app_id[:12]))
        assert row.split()[-1] == "web,admin", network.stdout
        status = plane.cli("status", "--docker", plane.dockerd.url, "--ovsdb", plane.ovs.db_url,
                           "--bridge", "ppgroups", "--host-id", "groups",
                           "--run-dir", str(plane.serve.run_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith(app_id[:12]))
        assert row.split()[-1] == "web,admin", status.stdout
        check = plane.cli("group", "check", "grp-plain", "grp-member", "80")
        assert check.returncode == 1 and "denied: no rule of web, admin" in check.stdout
        check = plane.cli("group", "check", "grp-member", "grp-plain", "80")
        assert check.returncode == 0 and "is in no group" in check.stdout
    finally:
        plane.remove(app_id)
        plane.remove(plain.json["Id"])
    removed = plane.cli("group", "rm", "admin")
    assert removed.returncode == 0, removed.stderr
    plane.assert_nothing_allocated()
