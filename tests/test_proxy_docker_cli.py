"""The real `docker` CLI through `powerplane serve` behaves as it does against dockerd directly."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.dockerd import DockerDaemon
from tests.support.serve import ServeProcess

DOCKER = "docker"


def docker(url: str, *args: str, input: str | None = None, timeout: float = 60) -> str:
    result = subprocess.run([DOCKER, "-H", url, *args], input=input, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_version_and_ps_identical(dockerd: DockerDaemon, proxy: ServeProcess) -> None:
    """`docker version` and `docker ps -a` print the same through the proxy as directly."""
    assert docker(proxy.url, "version") == docker(dockerd.url, "version")
    assert docker(proxy.url, "ps", "-a", "--no-trunc") == docker(dockerd.url, "ps", "-a",
                                                                  "--no-trunc")


def test_run_rm_echo_and_piped_stdin(proxy: ServeProcess) -> None:
    """`run --rm echo` prints; `echo hi | run -i cat` prints hi and exits (half-close)."""
    assert docker(proxy.url, "run", "--rm", "--net=none", "busybox", "echo", "hello") == "hello\n"
    assert docker(proxy.url, "run", "-i", "--rm", "--net=none", "busybox", "cat",
                  input="hi\n", timeout=20) == "hi\n"


def test_logs_follow_streams_while_running(proxy: ServeProcess) -> None:
    """`logs -f` delivers lines while the container is still producing them."""
    cid = docker(proxy.url, "run", "-d", "--net=none", "busybox", "sh", "-c",
                 "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.5; done").strip()
    follower = subprocess.Popen([DOCKER, "-H", proxy.url, "logs", "-f", cid],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "line1\n"
        state = docker(proxy.url, "inspect", "-f", "{{.State.Running}}", cid).strip()
        assert state == "true", "the first line must arrive before the container ends"
        rest = follower.stdout.read()
        assert rest.split() == [f"line{i}" for i in range(2, 7)]
        assert follower.wait(timeout=10) == 0
    finally:
        follower.kill()
        follower.wait()
    assert docker(proxy.url, "wait", cid).strip() == "0"
    docker(proxy.url, "rm", "-f", cid)
    assert cid not in docker(proxy.url, "ps", "-aq", "--no-trunc")


def test_attach_exec_and_stats(proxy: ServeProcess) -> None:
    """`attach` relays stdin/stdout; `exec` prints; `stats --no-stream` answers; rm -f removes."""
    cid = docker(proxy.url, "run", "-d", "-i", "--net=none", "busybox", "sh", "-c",
                 "read line; echo got:$line").strip()
    try:
        assert docker(proxy.url, "exec", cid, "echo", "from-exec") == "from-exec\n"
        stats = docker(proxy.url, "stats", "--no-stream", "--format", "{{.ID}}", cid)
        assert cid.startswith(stats.strip())
        attach = subprocess.Popen([DOCKER, "-H", proxy.url, "attach", cid],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert attach.stdin is not None and attach.stdout is not None
            time.sleep(0.5)  # attached before the line is sent, or the shell reads EOF
            attach.stdin.write("ping\n")
            attach.stdin.flush()
            assert attach.stdout.readline() == "got:ping\n"
            assert attach.wait(timeout=10) == 0
        finally:
            attach.kill()
            attach.wait()
    finally:
        docker(proxy.url, "rm", "-f", cid)


def test_exec_it_under_pty(proxy: ServeProcess) -> None:
    """`exec -it` under a pseudo-terminal runs an interactive shell through the hijack."""
    cid = docker(proxy.url, "run", "-d", "--net=none", "busybox", "sleep", "60").strip()
    pid, fd = pty.fork()
    if pid == 0:  # child: becomes the docker CLI on the pty
        os.execvp(DOCKER, [DOCKER, "-H", proxy.url, "exec", "-it", cid, "sh"])
    try:
        os.write(fd, b"echo $((6*7))tty; exit\r")
        output = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and b"42tty" not in output:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break
        assert b"42tty" in output, output
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
        docker(proxy.url, "rm", "-f", cid)


def test_events_stream(proxy: ServeProcess) -> None:
    """`docker events` streams an event as it happens."""
    watcher = subprocess.Popen([DOCKER, "-H", proxy.url, "events", "--format",
                                "{{.Type}} {{.Action}}", "--filter", "type=volume"],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        docker(proxy.url, "volume", "create", "pp-events-test")
        assert watcher.stdout is not None
        ready, _, _ = select.select([watcher.stdout], [], [], 10)
        assert ready, "no event within 10 s"
        assert watcher.stdout.readline() == "volume create\n"
    finally:
        watcher.kill()
        watcher.wait()
        docker(proxy.url, "volume", "rm", "pp-events-test")


def test_build_200mb_context(proxy: ServeProcess, tmp_path: Path) -> None:
    """`docker build` with a 200 MB context succeeds and sees the whole file."""
    context = tmp_path / "context"
    context.mkdir()
    size = 200 * 1024 * 1024
    with (context / "big.bin").open("wb") as big:
        block = os.urandom(1024 * 1024)
        for _ in range(size // len(block)):
            big.write(block)
    (context / "Dockerfile").write_text(
        "FROM busybox\nCOPY big.bin /big.bin\nRUN test $(stat -c %s /big.bin) = 209715200\n")
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    result = subprocess.run([DOCKER, "-H", proxy.url, "build", "--network=none", "-q", "-t",
                             "pp-big:test", str(context)], capture_output=True, text=True,
                            env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    docker(proxy.url, "rmi", "pp-big:test")


def test_cp_both_ways_and_save_load(proxy: ServeProcess, tmp_path: Path) -> None:
    """`cp` into and out of a container, and `save | load`, round-trip the bytes."""
    payload = os.urandom(256 * 1024)
    (tmp_path / "in.bin").write_bytes(payload)
    cid = docker(proxy.url, "create", "--net=none", "busybox", "true").strip()
    try:
        docker(proxy.url, "cp", str(tmp_path / "in.bin"), f"{cid}:/in.bin")
        docker(proxy.url, "cp", f"{cid}:/in.bin", str(tmp_path / "out.bin"))
        assert (tmp_path / "out.bin").read_bytes() == payload
    finally:
        docker(proxy.url, "rm", "-f", cid)
    archive = tmp_path / "busybox.tar"
    docker(proxy.url, "tag", "busybox:latest", "pp-saved:test")
    docker(proxy.url, "save", "-o", str(archive), "pp-saved:test")
    docker(proxy.url, "rmi", "pp-saved:test")
    with archive.open("rb") as data:
        loaded = subprocess.run([DOCKER, "-H", proxy.url, "load"], stdin=data,
                                capture_output=True, text=True, timeout=60)
    assert "pp-saved:test" in loaded.stdout, loaded.stderr
    docker(proxy.url, "rmi", "pp-saved:test")


@pytest.mark.parametrize("api_prefix", ["", "/v1.41"])
def test_docker_py_through_proxy(proxy: ServeProcess, api_prefix: str) -> None:
    """docker-py: containers run/logs/exec/attach socket, images, volumes work via the proxy."""
    import docker as docker_py

    client = docker_py.DockerClient(base_url=proxy.url, version="1.41" if api_prefix else "auto")
    try:
        assert client.containers.run("busybox", ["echo", "py"], network_mode="none",
                                     remove=True) == b"py\n"
        container = client.containers.run("busybox", ["sh", "-c", "echo out; sleep 30"],
                                          network_mode="none", detach=True, stdin_open=True)
        try:
            assert container.exec_run(["echo", "exec-py"]).output == b"exec-py\n"
            socket = container.attach_socket(params={"stdout": 1, "stream": 1, "logs": 1})
            raw = socket._sock
            raw.settimeout(10)
            assert b"out" in raw.recv(4096)
            socket.close()
            assert b"out" in container.logs()
        finally:
            container.remove(force=True)
        assert any("busybox:latest" in image.tags for image in client.images.list())
        volume = client.volumes.create("pp-py-volume")
        assert "pp-py-volume" in [v.name for v in client.volumes.list()]
        volume.remove()
    finally:
        client.close()
