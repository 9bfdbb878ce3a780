"""Who may use the proxy: exactly whom dockerd's own socket admits, never every local user.

Real ``powerplane serve`` processes in front of a private dockerd; clients are real processes
running as ``nobody`` through ``setpriv``, with or without the ``docker`` group.
"""

from __future__ import annotations

import argparse
import grp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from adapter.settings import CONSUL_OPTIONS, SERVE_OPTIONS, Settings, load_settings
from tests.fixtures.dockerd import StartProxy
from tests.support.consul import free_port
from tests.support.dockerd import DockerDaemon
from tests.support.env_file import read_env_file

ROOT = Path(__file__).resolve().parents[1]
POWERPLANE = str(Path(sys.executable).with_name("powerplane"))
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
PING_OK = "HTTP/1.1 200 OK | OK"
# The client side of every check: GET /_ping on a unix socket path or HOST:PORT; prints the
# status line and body, or the errno name of a refused connection.
PROBE = r"""
import errno, socket, sys
target = sys.argv[1]
if target.startswith("/"):
    conn, address = socket.socket(socket.AF_UNIX), target
else:
    host, port = target.rsplit(":", 1)
    conn, address = socket.socket(), (host, int(port))
conn.settimeout(20)
try:
    conn.connect(address)
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc)))
    sys.exit(0)
conn.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
reply = b""
while chunk := conn.recv(4096):
    reply += chunk
head, _, body = reply.partition(b"\r\n\r\n")
print(head.split(b"\r\n")[0].decode(), "|", body.decode(errors="replace"))
"""


def member_of(*groups: str) -> tuple[str, ...]:
    """``nobody`` with ``groups`` as its only supplementary groups."""
    return ("setpriv", "--reuid=nobody", "--regid=nogroup", f"--groups={','.join(groups)}")


def ping_as(identity: Sequence[str], target: str | Path) -> str:
    """What ``identity`` gets for GET /_ping at ``target``: "HTTP/1.1 200 OK | OK" or an errno."""
    result = subprocess.run([*identity, sys.executable, "-c", PROBE, str(target)], cwd="/",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def docker_gid() -> int:
    try:
        return grp.getgrnam("docker").gr_gid
    except KeyError:
        pytest.fail("no docker group on this host (Debian's docker.io package makes it)")


def serve_refusal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[
        str]:
    """Run serve expecting it to refuse its configuration at start."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POWERPLANE_", "CONSUL_"))}
    return subprocess.run([POWERPLANE, "serve", "--consul", "127.0.0.1:1", *args],
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=30)


def nothing_listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_socket_admits_root_and_docker_group_only(
    dockerd: DockerDaemon, start_proxy: StartProxy
) -> None:
    """The socket is root:docker 0660: a docker member pings dockerd through it, nobody cannot."""
    proxy = start_proxy(dockerd.url)
    info = proxy.socket.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, docker_gid(), 0o660)
    assert ping_as((), proxy.socket) == PING_OK
    assert ping_as(member_of("docker"), proxy.socket) == PING_OK
    assert ping_as(NOBODY, proxy.socket) == "EACCES"
    # nobody can search the directory (no EACCES there): the socket's own group and mode are
    # what refused it.
    assert ping_as(NOBODY, proxy.socket.with_name("absent.sock")) == "ENOENT"
    assert "(group docker, mode 0660)" in proxy.log()


def deploy_configurations(tmp_path: Path) -> dict[str, Settings]:
    """The settings each shipped way of running serve gives it, as far as listeners go."""
    options = (*CONSUL_OPTIONS, *SERVE_OPTIONS)
    subprocess.run([str(ROOT / "deploy" / "host-setup.sh"), "--index", "1", "--nodes",
                    "10.9.0.1", "--config-only", str(tmp_path / "host-setup")], check=True,
                   capture_output=True, timeout=60)
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yml").read_text())
    compose_env = {name: re.sub(r"\$\{\w+:-(\w+)\}", r"\1", str(value)) for name, value in
                   compose["services"]["powerplane"]["environment"].items()}
    env_files = {
        "deploy/powerplane.env (systemd unit)": ROOT / "deploy" / "powerplane.env",
        "host-setup.sh's /etc/default/powerplane (systemd unit, vagrant)":
            tmp_path / "host-setup" / "powerplane.env",
    }
    configurations = {
        name: load_settings(argparse.Namespace(), read_env_file(path), options)
        for name, path in env_files.items()
    }
    configurations["deploy/compose.yml"] = load_settings(argparse.Namespace(), compose_env,
                                                         options)
    # demo.sh passes its listener as flags; the rest is serve's defaults.
    demo = (ROOT / "deploy" / "demo.sh").read_text()
    demo_listeners = re.findall(r"--listen\s+(\S+)", demo)
    assert demo_listeners == ['"$proxy_url"'] and "proxy_url=unix://" in demo
    assert "tcp://" not in demo
    configurations["deploy/demo.sh"] = Settings()
    # The unit itself passes nothing: everything comes from /etc/default/powerplane.
    unit = (ROOT / "deploy" / "systemd" / "powerplane.service").read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/powerplane serve$", unit, re.MULTILINE)
    return configurations


def test_no_shipped_configuration_gives_nobody_the_docker_api(
    dockerd: DockerDaemon, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Every listener the demo, the units, host-setup and compose start refuses nobody.

    Each configuration's listeners are started for real (unix paths moved under a private
    directory, the group kept): a unix socket refuses nobody and admits a docker member; a TCP
    listener without TLS must stop serve at start.
    """
    configurations = deploy_configurations(tmp_path)
    assert set(configurations) >= {"deploy/demo.sh", "deploy/compose.yml"}
    for name, settings in configurations.items():
        listen_dir = searchable_dir()
        flags: list[str] = ["--group", settings.group]
        sockets: list[Path] = []
        for url in settings.listen:
            if url.startswith("unix://"):
                sockets.append(listen_dir / f"{len(sockets)}.sock")
                flags += ["--listen", f"unix://{sockets[-1]}"]
            else:
                flags += ["--listen", re.sub(r":\d+$", f":{free_port()}", url)]
        if settings.insecure_tcp_gives_root:
            flags.append("--insecure-tcp-gives-root")
        if any(not url.startswith("unix://") for url in settings.listen):
            assert settings.tls_cert, f"{name}: a TCP listener without TLS"
            refused = serve_refusal(*flags)
            assert refused.returncode == 1, f"{name}: serve started a TCP listener without TLS"
            continue
        proxy = start_proxy(dockerd.url, flags)
        try:
            for path in sockets:
                assert ping_as(NOBODY, path.with_name("absent.sock")) == "ENOENT", name
                assert ping_as(NOBODY, path) == "EACCES", name
                assert ping_as(member_of("docker"), path) == PING_OK, name
        finally:
            proxy.stop()
            shutil.rmtree(listen_dir)


def searchable_dir() -> Path:
    """A fresh directory everyone may search, like /run/powerplane (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="ppl-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("listen", ["tcp://127.0.0.1:{port}", "tcp://localhost:{port}",
                                    "tcp://0.0.0.0:{port}"])
def test_tcp_listener_without_tls_is_refused_at_start(listen: str, tmp_path: Path) -> None:
    """A TCP listener without TLS, loopback included, stops serve with one line; nothing binds."""
    port = free_port()
    url = listen.format(port=port)
    for how in ("flag", "environment"):
        if how == "flag":
            result = serve_refusal("--listen", f"unix://{tmp_path}/s.sock", "--listen", url)
        else:
            result = serve_refusal(env={"POWERPLANE_LISTEN": f"unix://{tmp_path}/s.sock,{url}"})
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"powerplane: --listen {url}: refusing a ")
        assert "root on this host" in lines[0]
        assert nothing_listens(port)
        assert not (tmp_path / "s.sock").exists()


def test_insecure_opt_in_is_loopback_only(tmp_path: Path) -> None:
    """--insecure-tcp-gives-root never opens a plain TCP port off loopback."""
    port = free_port()
    result = serve_refusal("--listen", f"tcp://0.0.0.0:{port}", "--insecure-tcp-gives-root")
    assert result.returncode == 1
    assert "non-loopback TCP listener without TLS" in result.stderr
    assert nothing_listens(port)


def test_insecure_opt_in_gives_every_local_user_the_api(
    dockerd: DockerDaemon, start_proxy: StartProxy
) -> None:
    """What the opt-in's name says: nobody reaches dockerd through it; serve warns loudly."""
    port = free_port()
    proxy = start_proxy(dockerd.url, ["--listen", f"tcp://127.0.0.1:{port}",
                                      "--insecure-tcp-gives-root"])
    assert ping_as(NOBODY, f"127.0.0.1:{port}") == PING_OK
    assert ping_as(NOBODY, proxy.socket) == "EACCES"
    assert re.search(r"WARNING .*listening on tcp://127\.0\.0\.1:\d+ WITHOUT TLS", proxy.log())
    assert "EVERY LOCAL USER WHO CONNECTS IS ROOT" in proxy.log()


def test_group_option_names_the_socket_group(
    dockerd: DockerDaemon, start_proxy: StartProxy
) -> None:
    """--group takes a number too; then that group's members get in and docker's do not."""
    gid = "4242"
    assert not any(group.gr_gid == int(gid) for group in grp.getgrall())
    proxy = start_proxy(dockerd.url, ["--group", gid])
    assert proxy.socket.stat().st_gid == int(gid)
    assert ping_as(member_of(gid), proxy.socket) == PING_OK
    assert ping_as(member_of("docker"), proxy.socket) == "EACCES"
    assert ping_as(NOBODY, proxy.socket) == "EACCES"


def test_unknown_group_named_explicitly_stops_serve(tmp_path: Path) -> None:
    """A --group that does not exist is a configuration error, named in one line."""
    result = serve_refusal("--listen", f"unix://{tmp_path}/s.sock", "--group", "pp-no-group")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "powerplane: --group: no group 'pp-no-group' on this host (give a group name or number)")
    assert not (tmp_path / "s.sock").exists()


def test_missing_docker_group_leaves_the_socket_to_root(
    dockerd: DockerDaemon, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Without a docker group (Docker not installed yet) serve, like dockerd, gives the socket
    root's group and says so. The group file is hidden in a mount namespace of serve's own."""
    group_file = tmp_path / "group"
    group_file.write_text("".join(line for line in Path("/etc/group").read_text()
                                  .splitlines(keepends=True) if not line.startswith("docker:")))
    group_file.chmod(0o644)
    hide_docker_group = ("unshare", "--mount", "--propagation", "private", "--",
                         "sh", "-c", 'mount --bind "$0" /etc/group && exec "$@"', str(group_file))
    proxy = start_proxy(dockerd.url, command_prefix=hide_docker_group)
    info = proxy.socket.stat()
    assert (info.st_gid, info.st_mode & 0o777) == (0, 0o660)
    assert ping_as((), proxy.socket) == PING_OK
    assert ping_as(member_of("docker"), proxy.socket) == "EACCES"
    assert "--group: no group 'docker' on this host; unix sockets get group root" in proxy.log()
