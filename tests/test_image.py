"""The container image: built here from a Debian base made locally, then run for real."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from adapter import __version__
from tests.support.dockerd import DockerDaemon, ping


def docker(daemon: DockerDaemon, *args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "-H", daemon.url, *args], check=check, capture_output=True,
                          text=True, timeout=timeout)


def test_image_runs_powerplane(image_daemon: DockerDaemon, powerplane_image: str) -> None:
    """The image's entrypoint is the installed powerplane command: --help and --version work."""
    helped = docker(image_daemon, "run", "--rm", "--network", "none", powerplane_image, "--help")
    assert "Multi-host overlay networking for Docker" in helped.stdout
    version = docker(image_daemon, "run", "--rm", "--network", "none", powerplane_image,
                     "--version")
    assert version.stdout.strip() == f"powerplane {__version__}"


def test_image_has_the_host_firewall(image_daemon: DockerDaemon, powerplane_image: str) -> None:
    """The nftables binding imports in the image's venv and finds libnftables (ctypes)."""
    probe = docker(image_daemon, "run", "--rm", "--network", "none", "--entrypoint",
                   "/opt/powerplane/bin/python", powerplane_image, "-c",
                   "import nftables; nftables.Nftables(); print(nftables.__file__)")
    assert probe.stdout.strip().endswith("nftables/__init__.py")


def test_image_defaults(image_daemon: DockerDaemon, powerplane_image: str) -> None:
    """Running the image with no arguments means `powerplane serve` with the example adapters."""
    config = json.loads(docker(image_daemon, "image", "inspect", powerplane_image).stdout)[0][
        "Config"]
    assert config["Entrypoint"] == ["powerplane"]
    assert config["Cmd"] == ["serve"]
    assert "POWERPLANE_ADAPTERS=/etc/powerplane/adapters.yml" in config["Env"]
    shipped = docker(image_daemon, "run", "--rm", "--network", "none", "--entrypoint", "cat",
                     powerplane_image, "/etc/powerplane/adapters.yml").stdout
    assert shipped == (Path(__file__).parents[1] / "deploy" / "adapters.yml").read_text()


def test_image_serve_proxies_ping(image_daemon: DockerDaemon, powerplane_image: str,
                                  tmp_path: Path) -> None:
    """`serve` in the image listens on a mounted unix socket and forwards /_ping to dockerd."""
    helped = docker(image_daemon, "run", "--rm", "--network", "none", powerplane_image,
                    "serve", "--help", check=False)
    if helped.returncode != 0:
        pytest.skip("`powerplane serve` is not in this tree yet")
    listen_dir = tmp_path / "listen"
    listen_dir.mkdir()
    name = f"pp-smoke-{tmp_path.name[-12:]}".replace("_", "-")
    docker(image_daemon, "run", "-d", "--name", name, "--network", "none",
           "-v", f"{image_daemon.socket}:/var/run/docker.sock",
           "-v", f"{listen_dir}:/run/powerplane",
           powerplane_image, "serve", "--listen", "unix:///run/powerplane/docker.sock",
           # Nothing listens there: serve must start anyway and pass plain Docker calls.
           "--consul", "127.0.0.1:9")
    try:
        deadline = time.monotonic() + 30
        while not ping(listen_dir / "docker.sock", timeout=1.0):
            state = docker(image_daemon, "inspect", "-f", "{{.State.Running}}", name).stdout
            logs = docker(image_daemon, "logs", name).stderr
            assert state.strip() == "true", f"serve exited:\n{logs}"
            assert time.monotonic() < deadline, f"no /_ping answer in 30 s:\n{logs}"
            time.sleep(0.2)
    finally:
        docker(image_daemon, "rm", "-f", name, check=False)


def test_image_has_ovs_ofctl(image_daemon: DockerDaemon, powerplane_image: str) -> None:
    """serve installs the flow tables with ovs-ofctl: the image runs it."""
    probe = docker(image_daemon, "run", "--rm", "--network", "none", "--entrypoint",
                   "ovs-ofctl", powerplane_image, "--version")
    assert probe.stdout.startswith("ovs-ofctl (Open vSwitch)")
