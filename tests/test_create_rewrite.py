"""Unit tests of the create-request rewrite: pure functions, no daemon needed."""

from __future__ import annotations

import re

import pytest

from adapter.errors import BadRequest, PowerplaneError
from adapter.network.create_rewrite import (
    LABEL_ALIASES,
    LABEL_GROUPS,
    CreateRequest,
    OverlayRequest,
    aliases_label,
    check_compatible,
    groups_label,
    overlay_request,
    rewrite_create,
    sandbox_spec,
)
from adapter.network.ports import RequestedBinding

CLI_BODY = {
    "Image": "busybox",
    "Cmd": ["sleep", "1000"],
    "Env": ["SOCKETPLANE_CIDR=10.0.6.1/24", "FOO=bar"],
    "Hostname": "web1",
    "Domainname": "example.test",
    "Labels": {"app": "web"},
    "ExposedPorts": {"80/tcp": {}},
    "HostConfig": {
        "NetworkMode": "default",
        "Dns": ["10.0.6.53"],
        "DnsSearch": ["example.test"],
        "ExtraHosts": ["db:10.0.6.9"],
        "RestartPolicy": {"Name": "always"},
        "Binds": ["/tmp:/host"],
        "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]},
        "PublishAllPorts": False,
    },
    "NetworkingConfig": {"EndpointsConfig": {"default": {}}},
}


def test_no_overlay_variables_means_no_overlay() -> None:
    """A create without SOCKETPLANE_* variables is not the hook's business."""
    assert overlay_request({"Env": ["A=1"]}) is None
    assert overlay_request({}) is None


def test_overlay_variables_are_read_from_env() -> None:
    """SOCKETPLANE_CIDR and SOCKETPLANE_NETWORK are both picked up, values trimmed."""
    body = {"Env": ["SOCKETPLANE_CIDR= 10.0.6.1/24 ", "SOCKETPLANE_NETWORK=foo"]}
    assert overlay_request(body) == OverlayRequest(cidr="10.0.6.1/24", network="foo")


def test_empty_overlay_variable_is_refused() -> None:
    """An empty SOCKETPLANE_CIDR is a mistake the user hears about."""
    with pytest.raises(BadRequest, match="empty"):
        overlay_request({"Env": ["SOCKETPLANE_CIDR="]})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"HostConfig": {"NetworkMode": "host"}}, "--network host"),
        ({"HostConfig": {"Links": ["db:db"]}}, "--link"),
        ({"MacAddress": "02:42:00:00:00:01"}, "mac-address"),
    ],
)
def test_incompatible_options_are_refused(change: dict[str, object], message: str) -> None:
    """Options that cannot work with a shared sandbox namespace are refused by name."""
    with pytest.raises(BadRequest, match=message):
        check_compatible({"Image": "busybox", **change})


def test_default_network_modes_are_compatible() -> None:
    """What the docker CLI sends by default passes the check."""
    for mode in ("", "default", "bridge"):
        check_compatible({"HostConfig": {"NetworkMode": mode}})


def test_sandbox_takes_the_options_docker_forbids_on_the_app() -> None:
    """Hostname, domain, DNS and extra hosts move to the sandbox; restart policy follows."""
    spec = sandbox_spec(CLI_BODY, image="busybox:latest", name="web", labels={"k": "v"})
    assert spec.name == "web-powerplane"
    assert spec.hostname == "web1"
    assert spec.domainname == "example.test"
    assert spec.dns == ("10.0.6.53",)
    assert spec.dns_search == ("example.test",)
    assert spec.extra_hosts == ("db:10.0.6.9",)
    assert spec.restart_policy == {"Name": "unless-stopped"}
    assert sandbox_spec({}, image="i", name=None, labels={}).restart_policy == {}


def test_rewrite_shares_the_sandbox_namespace_and_keeps_the_rest() -> None:
    """The rewritten create joins the sandbox, drops moved options, keeps everything else."""
    rewritten = rewrite_create(CLI_BODY, sandbox_id="abc123", labels={"io.powerplane.ip": "1"})
    assert rewritten["HostConfig"]["NetworkMode"] == "container:abc123"
    for gone in ("Hostname", "Domainname", "ExposedPorts", "NetworkingConfig"):
        assert gone not in rewritten
    for gone in ("Dns", "DnsSearch", "ExtraHosts", "PortBindings", "PublishAllPorts"):
        assert gone not in rewritten["HostConfig"]
    assert rewritten["HostConfig"]["Binds"] == ["/tmp:/host"]
    assert rewritten["Env"] == CLI_BODY["Env"]
    assert rewritten["Labels"] == {"app": "web", "io.powerplane.ip": "1"}
    # The caller's body is left as it was.
    assert CLI_BODY["HostConfig"]["NetworkMode"] == "default"  # type: ignore[index]


@pytest.mark.parametrize(("body", "message"), [
    ([1], "must be a JSON object, got an array"),
    ({"Env": "SOCKETPLANE_CIDR=10.0.6.0/24"}, "Env must be an array"),
    ({**CLI_BODY, "HostConfig": "host"}, "HostConfig must be an object, got a string"),
    ({**CLI_BODY, "HostConfig": {"RestartPolicy": "always"}}, "HostConfig.RestartPolicy must"),
    ({**CLI_BODY, "HostConfig": {"Dns": ["8.8.8.8", 8]}}, "HostConfig.Dns[1] must be a string"),
    ({**CLI_BODY, "Labels": ["a=b"]}, "Labels must be an object"),
    ({**CLI_BODY, "Env": ["SOCKETPLANE_NETWORK=a/b"]}, "invalid network name 'a/b'"),
])
def test_wrong_types_are_refused_at_parse(body: object, message: str) -> None:
    """CreateRequest.parse refuses wrong types with a 400 before anything is allocated."""
    with pytest.raises(PowerplaneError, match=re.escape(message)) as refused:
        CreateRequest.parse(body, app_name=None)
    assert refused.value.status == 400
    with pytest.raises(BadRequest, match="invalid container name"):
        CreateRequest.parse(CLI_BODY, app_name="a/b")


def test_published_ports_are_read_at_parse_and_refused_there() -> None:
    """-p and --expose are the request's ports (Docker would refuse them on the app); a bad
    one is a 400 at parse, before anything is allocated."""
    create = CreateRequest.parse(CLI_BODY, app_name="web")
    assert create is not None
    assert create.ports.bindings == (RequestedBinding("tcp", "", (8080, 8080), 80),)
    assert create.ports.exposed == {(80, "tcp")}
    assert create.image == "busybox"
    bad = {**CLI_BODY, "HostConfig": {"PortBindings": {"53/sctp": [{"HostPort": "53"}]}}}
    with pytest.raises(BadRequest, match="sctp is not supported on overlay networks"):
        CreateRequest.parse(bad, app_name=None)


def test_aliases_and_hostname_of_a_create() -> None:
    """SOCKETPLANE_ALIASES is read with the request; the hostname is --hostname or Docker's
    default, the sandbox's short id; the name loses Docker's '/'."""
    body = {**CLI_BODY, "Env": [*CLI_BODY["Env"], "SOCKETPLANE_ALIASES=www, Front"]}
    create = CreateRequest.parse(body, app_name="/web")
    assert create is not None
    assert (create.aliases, create.name, create.hostname("f" * 64)) == (
        ("www", "front"), "web", "web1")
    plain = CreateRequest.parse({"Image": "busybox", "Env": ["SOCKETPLANE_CIDR=10.0.6.0/24"]},
                                app_name=None)
    assert plain is not None
    assert (plain.aliases, plain.name, plain.hostname("0123456789abcdef")) == (
        (), "", "0123456789ab")


@pytest.mark.parametrize("aliases", ["a_b", "www,", "-x", "a" * 64])
def test_bad_aliases_are_a_400_before_anything(aliases: str) -> None:
    body = {"Image": "busybox",
            "Env": ["SOCKETPLANE_CIDR=10.0.6.0/24", f"SOCKETPLANE_ALIASES={aliases}"]}
    with pytest.raises(PowerplaneError, match="SOCKETPLANE_ALIASES") as caught:
        CreateRequest.parse(body, app_name=None)
    assert caught.value.status == 400


def test_aliases_label_is_checked_again() -> None:
    """Anyone can label a container: a label that holds no DNS labels gives no aliases."""
    assert aliases_label({LABEL_ALIASES: "www,front"}) == ("www", "front")
    assert aliases_label({LABEL_ALIASES: "bad_one"}) == ()
    assert aliases_label({}) == ()


def test_groups_of_a_create() -> None:
    """SOCKETPLANE_GROUPS is read with the request: names each once, in order; none without."""
    body = {**CLI_BODY, "Env": [*CLI_BODY["Env"], "SOCKETPLANE_GROUPS=web, admin,web"]}
    create = CreateRequest.parse(body, app_name="/web")
    assert create is not None and create.groups == ("web", "admin")
    plain = CreateRequest.parse(CLI_BODY, app_name="/web")
    assert plain is not None and plain.groups == ()
    # Without an overlay the variable is the container's own business.
    assert CreateRequest.parse({"Image": "busybox", "Env": ["SOCKETPLANE_GROUPS=-x"]},
                               app_name=None) is None


@pytest.mark.parametrize("groups", ["-x", "web,a b", "a/b", "x" * 65])
def test_bad_group_names_are_a_400_before_anything(groups: str) -> None:
    body = {"Image": "busybox",
            "Env": ["SOCKETPLANE_CIDR=10.0.6.0/24", f"SOCKETPLANE_GROUPS={groups}"]}
    with pytest.raises(PowerplaneError, match="SOCKETPLANE_GROUPS: invalid group name") as caught:
        CreateRequest.parse(body, app_name=None)
    assert caught.value.status == 400


def test_groups_label_is_checked_again() -> None:
    """The label the agent restores a lost endpoint record from: bad names give no groups."""
    assert groups_label({LABEL_GROUPS: "web,admin"}) == ("web", "admin")
    assert groups_label({LABEL_GROUPS: "web,-x"}) == ()
    assert groups_label({LABEL_GROUPS: ""}) == groups_label({}) == ()


def test_sandbox_resolver_is_the_gateway_unless_dns_is_given() -> None:
    """Dns=[gateway] by default; the user's --dns is kept, as Docker keeps it."""
    plain = {"Image": "busybox", "Env": ["SOCKETPLANE_CIDR=10.0.6.0/24"]}
    assert sandbox_spec(plain, image="i", name=None, labels={},
                        gateway="10.0.6.1").dns == ("10.0.6.1",)
    assert sandbox_spec(CLI_BODY, image="i", name=None, labels={},
                        gateway="10.0.6.1").dns == ("10.0.6.53",)


@pytest.mark.parametrize("hostname, name, expected", [
    ("web1", "/web", "web1"),  # --hostname wins
    (None, "/web", "web"),  # else the name, a DNS label
    (None, "my_app", None),  # a name that is no DNS label: Docker's default
    (None, None, None),
])
def test_sandbox_hostname(hostname: str | None, name: str | None,
                          expected: str | None) -> None:
    body = {"Image": "busybox", "Env": ["SOCKETPLANE_CIDR=10.0.6.0/24"],
            **({"Hostname": hostname} if hostname else {})}
    assert sandbox_spec(body, image="i", name=name, labels={}).hostname == expected
    create = CreateRequest.parse(body, app_name=name)
    assert create is not None
    assert create.hostname("0123456789abcdef") == (expected or "0123456789ab")
