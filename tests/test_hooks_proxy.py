"""Hooks through `powerplane serve` with a real external adapter process, and bad input."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.dockerd import StartProxy
from tests.support.consul import free_port
from tests.support.dockerd import DockerDaemon

ADAPTER = Path(__file__).parent / "adapters" / "labeler.py"


@pytest.fixture(scope="module")
def adapter_url() -> Iterator[str]:
    """The labeler adapter running as its own process on a free loopback port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ADAPTER), str(port)])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "adapter did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def adapters_file(tmp_path: Path, adapter_url: str, endpoints: str) -> str:
    path = tmp_path / "adapters.yml"
    path.write_text(f"endpoints:\n{endpoints}\nadapters:\n"
                    f"  labeler: {adapter_url}/label\n  rewriter: {adapter_url}/rewrite\n"
                    f"  failer: {adapter_url}/fail\n")
    return str(path)


def docker(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "-H", url, *args], capture_output=True, text=True,
                          timeout=60)


def raw_request(sock_path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(20)
        conn.connect(str(sock_path))
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply


def test_pre_hook_label_and_post_hook_rewrite(
    dockerd: DockerDaemon, start_proxy: StartProxy, adapter_url: str, tmp_path: Path
) -> None:
    """A pre-hook's label shows in `docker inspect`; a post-hook's Code, type, body are sent."""
    config = adapters_file(tmp_path, adapter_url,
                           '  "POST /*/containers/create":\n    pre: [labeler]\n'
                           '  "GET /*/info":\n    post: [rewriter]\n')
    proxy = start_proxy(dockerd.url, ["--adapters", config])
    created = docker(proxy.url, "create", "--net=none", "busybox", "true")
    assert created.returncode == 0, created.stderr
    cid = created.stdout.strip()
    try:
        label = docker(dockerd.url, "inspect", "-f",
                       '{{index .Config.Labels "powerplane.test"}}', cid).stdout
        assert label == "pre-hook\n"
    finally:
        docker(dockerd.url, "rm", "-f", cid)
    reply = raw_request(proxy.socket, b"GET /v1.41/info HTTP/1.1\r\nHost: d\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 201 ")
    assert b"Content-Type: text/plain" in reply
    assert reply.endswith(b"\r\n\r\nrewritten:200")


def test_failing_adapter_stops_create(
    dockerd: DockerDaemon, start_proxy: StartProxy, adapter_url: str, tmp_path: Path
) -> None:
    """An adapter answering 500: the CLI prints its message and no container is created."""
    config = adapters_file(tmp_path, adapter_url,
                           '  "POST /*/containers/create":\n    pre: [failer]\n')
    proxy = start_proxy(dockerd.url, ["--adapters", config])
    before = docker(dockerd.url, "ps", "-aq").stdout
    result = docker(proxy.url, "run", "--net=none", "--name", "pp-hook-fail", "busybox", "true")
    assert result.returncode != 0
    assert "quota exceeded for this tenant" in result.stderr
    assert "failer" in result.stderr
    assert docker(dockerd.url, "ps", "-aq").stdout == before


def test_bad_input_gets_4xx_and_proxy_survives(
    dockerd: DockerDaemon, start_proxy: StartProxy, adapter_url: str, tmp_path: Path
) -> None:
    """Malformed HTTP, a 50 MB JSON body and invalid JSON on a hooked endpoint get clear 4xx."""
    config = adapters_file(tmp_path, adapter_url,
                           '  "POST /*/containers/create":\n    pre: [labeler]\n')
    proxy = start_proxy(dockerd.url, ["--adapters", config])
    assert raw_request(proxy.socket, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"{\"Image\": \"" + b"x" * (50 * 1024 * 1024) + b"\"}"
    reply = raw_request(proxy.socket, b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
                        b"Content-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(big) + big)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"larger than" in reply
    reply = raw_request(proxy.socket, b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"Image\":")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"invalid JSON" in reply
    assert docker(proxy.url, "version").returncode == 0


def test_upstream_down_is_502_naming_socket(start_proxy: StartProxy, tmp_path: Path) -> None:
    """With no dockerd behind it, serve starts and answers 502 naming the socket."""
    missing = tmp_path / "no-docker.sock"
    proxy = start_proxy(f"unix://{missing}", wait_for_upstream=False)
    result = docker(proxy.url, "ps")
    assert result.returncode != 0
    assert str(missing) in result.stderr


def test_serve_refuses_bad_config(tmp_path: Path) -> None:
    """Config errors stop serve at start-up with one line naming the file or flag."""
    bad = tmp_path / "adapters.yml"
    bad.write_text('endpoints:\n  "POST /*/x":\n    pre: [a]\n  "POST /*/x":\n    pre: [b]\n')
    serve = [str(Path(sys.executable).with_name("powerplane")), "serve",
             "--listen", f"unix://{tmp_path}/s.sock", "--consul", "127.0.0.1:1"]
    for extra, expected in (
        (["--adapters", str(bad)], "duplicate key"),
        (["--adapters", str(tmp_path / "missing.yml")], "missing.yml"),
        (["--listen", "tcp://0.0.0.0:0"], "non-loopback"),
    ):
        result = subprocess.run([*serve, *extra], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr


def test_unix_socket_mode_and_removal(dockerd: DockerDaemon, start_proxy: StartProxy) -> None:
    """The unix socket is mode 0660 and SIGTERM removes it; serve exits 0."""
    proxy = start_proxy(dockerd.url)
    assert proxy.socket.stat().st_mode & 0o777 == 0o660
    assert proxy.stop() == 0
    assert not proxy.socket.exists()


def test_json_nested_past_the_recursion_limit_is_400(
    dockerd: DockerDaemon, start_proxy: StartProxy
) -> None:
    """A hooked body nested deeper than Python's recursion limit gets a 400, not a cut."""
    proxy = start_proxy(dockerd.url)
    body = b'{"Image": "busybox", "Labels": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    reply = raw_request(proxy.socket, b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\n"
                        b"Content-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert "Traceback" not in proxy.log()
