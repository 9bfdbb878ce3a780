"""Packaging and deployment files: scripts lint clean, configs parse, units and docs are right."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adapter.settings import CONSUL_OPTIONS, OBSERVABILITY_OPTIONS, SERVE_OPTIONS, load_settings
from tests.support.dockerd import DockerDaemon
from tests.support.env_file import read_env_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("deploy", "tests", ".ci", "vagrant")
ALL_OPTIONS = (*CONSUL_OPTIONS, *SERVE_OPTIONS, *OBSERVABILITY_OPTIONS)


def shell_scripts() -> list[Path]:
    """Every shell script under SCRIPT_DIRS: *.sh files and files with a sh/bash shebang."""
    found: list[Path] = []
    for top in SCRIPT_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".sh":
                found.append(path)
                continue
            with path.open("rb") as handle:
                first = handle.readline(200)
            if re.match(rb"#!\s*(/usr)?/bin/(env\s+)?(ba)?sh\b", first):
                found.append(path)
    return found


def require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (deploy/install.sh --test installs it from Debian)"
    return path


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script: Path) -> None:
    """Each shell script in the repository passes shellcheck, following sourced helpers."""
    result = subprocess.run([require("shellcheck"), "-x", str(script)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_strict_and_executable() -> None:
    """Every executable script sets `set -euo pipefail`; the sourced helper library is not run."""
    for script in shell_scripts():
        if script.name == "lib.sh":
            continue
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert "set -euo pipefail" in script.read_text(), f"{script} lacks set -euo pipefail"


def vagrant(*args: str, tmp_path: Path, nodes: str | None = None) -> subprocess.CompletedProcess[
        str]:
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "home"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    env.pop("SOCKETPLANE_NODES", None)
    if nodes is not None:
        env["SOCKETPLANE_NODES"] = nodes
    return subprocess.run([require("vagrant"), *args], cwd=ROOT / "vagrant", env=env,
                          capture_output=True, text=True, timeout=120)


def test_vagrantfile_validates(tmp_path: Path) -> None:
    """`vagrant validate` accepts the Vagrantfile with 3 (default) and 5 nodes, rejects 0."""
    default = vagrant("validate", "--ignore-provider", tmp_path=tmp_path)
    assert default.returncode == 0, default.stdout + default.stderr
    assert [f"node{i}" for i in (1, 2, 3)] == re.findall(r"==> (node\d+):", default.stdout)
    five = vagrant("validate", "--ignore-provider", tmp_path=tmp_path, nodes="5")
    assert five.returncode == 0, five.stdout + five.stderr
    assert "node5" in five.stdout
    zero = vagrant("validate", "--ignore-provider", tmp_path=tmp_path, nodes="0")
    assert zero.returncode != 0
    assert "SOCKETPLANE_NODES" in zero.stdout + zero.stderr


def test_adapters_yml_hooks_network_on_the_contract_endpoints() -> None:
    """The example adapters.yml wires the built-in `network` hook to exactly the lifecycle calls."""
    config = yaml.safe_load((ROOT / "deploy" / "adapters.yml").read_text())
    hooks = {endpoint: {stage: names for stage, names in stages.items()}
             for endpoint, stages in config["endpoints"].items()}
    assert hooks == {
        "POST /*/containers/create": {"pre": ["network"], "post": ["network"]},
        "POST /*/containers/*/start": {"pre": ["network"], "post": ["network"]},
        "DELETE /*/containers/*": {"pre": ["network"], "post": ["network"]},
        "GET /*/containers/*/json": {"post": ["network"]},
        "GET /*/containers/json": {"post": ["network"]},
    }
    assert config["adapters"] == {}


def test_compose_file_runs_consul_and_powerplane_on_host_network() -> None:
    """compose.yml parses; both services use the host network and serve gets both sockets."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"consul", "powerplane"}
    assert all(service["network_mode"] == "host" for service in services.values())
    mounts = {volume.split(":")[1] for volume in services["powerplane"]["volumes"]}
    assert {"/var/run/docker.sock", "/var/run/openvswitch", "/run/powerplane"} <= mounts


def test_consul_configs_validate_for_each_role(tmp_path: Path) -> None:
    """host-setup.sh writes Consul configs that `consul validate` accepts, servers first."""
    consul = require("consul")
    ips = ["10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4"]
    for index in (1, 4):
        out = tmp_path / f"node{index}"
        subprocess.run([str(ROOT / "deploy" / "host-setup.sh"), "--index", str(index),
                        "--nodes", ",".join(ips), "--config-only", str(out)],
                       check=True, capture_output=True, timeout=60)
        common = json.loads((out / "10-powerplane.json").read_text())
        node = json.loads((out / "50-node.json").read_text())
        assert common["disable_update_check"] is True
        assert node["bind_addr"] == ips[index - 1]
        assert node["retry_join"] == ips[:3]
        assert common["server"] is (index <= 3)
        if index <= 3:
            assert node["bootstrap_expect"] == 3
            assert common["performance"]["raft_multiplier"] == 1
        checked = subprocess.run([consul, "validate", str(out / "10-powerplane.json"),
                                  str(out / "50-node.json")], capture_output=True, text=True,
                                 timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_host_setup_rejects_bad_parameters(tmp_path: Path) -> None:
    """host-setup.sh refuses an index outside the node list, naming the problem."""
    result = subprocess.run([str(ROOT / "deploy" / "host-setup.sh"), "--index", "4", "--nodes",
                             "10.9.0.1,10.9.0.2", "--config-only", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--index must be between 1 and 2" in result.stderr


def test_env_files_name_real_options_with_valid_values(tmp_path: Path) -> None:
    """The example env file and host-setup's generated one use known variables that load."""
    known = {option.env for option in ALL_OPTIONS}
    subprocess.run([str(ROOT / "deploy" / "host-setup.sh"), "--index", "1", "--nodes",
                    "10.9.0.1", "--config-only", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for path in (ROOT / "deploy" / "powerplane.env", tmp_path / "powerplane.env"):
        environ = read_env_file(path)
        assert set(environ) <= known, f"{path}: unknown {set(environ) - known}"
        settings = load_settings(argparse.Namespace(), environ, ALL_OPTIONS)
        assert settings.underlay_ip == environ["POWERPLANE_UNDERLAY_IP"]
        assert len(settings.listen) == len(environ["POWERPLANE_LISTEN"].split(","))


@pytest.mark.parametrize("unit", sorted((ROOT / "deploy" / "systemd").glob("*.service")),
                         ids=lambda p: p.name)
def test_systemd_unit_verifies(unit: Path) -> None:
    """systemd-analyze accepts each unit, which includes its ExecStart being a real executable."""
    result = subprocess.run([require("systemd-analyze"), "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    exec_start = re.search(r"^ExecStart=(\S+)", unit.read_text(), re.MULTILINE)
    assert exec_start and os.access(exec_start.group(1), os.X_OK)


def test_powerplane_unit_ordered_after_its_dependencies() -> None:
    """powerplane.service starts after docker, openvswitch-switch and consul."""
    text = (ROOT / "deploy" / "systemd" / "powerplane.service").read_text()
    after = re.search(r"^After=(.*)$", text, re.MULTILINE)
    assert after
    assert {"docker.service", "openvswitch-switch.service", "consul.service"} <= set(
        after.group(1).split())


def test_configuration_doc_lists_every_option() -> None:
    """docs/configuration.md documents every flag and every environment variable."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for option in ALL_OPTIONS
               for name in (option.flag, option.env, *option.env_fallbacks)
               if f"`{name}" not in doc]
    assert not missing, f"undocumented: {missing}"


def test_docs_links_resolve() -> None:
    """Relative links in docs/ and vagrant/README.md point at files that exist."""
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "vagrant" / "README.md"]
    assert {"architecture.md", "configuration.md", "troubleshooting.md"} <= {p.name for p in pages}
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_dockerfile_base_is_a_pinned_build_argument() -> None:
    """The Dockerfile's base image is an ARG whose default names an exact Python version."""
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    assert re.search(r"^FROM \$\{BASE\}$", text, re.MULTILINE)
    assert "--no-index" in text


def test_demo_helpers_import_busybox_and_stop_by_pidfile(tmp_path: Path) -> None:
    """deploy/lib.sh makes a working busybox image with no registry and stops only its pidfile."""
    daemon = DockerDaemon.start(tmp_path / "dockerd")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "sleep.pid").write_text(str(sleeper.pid))
        script = f"""set -euo pipefail
            . {ROOT / 'deploy' / 'lib.sh'}
            docker_ping {daemon.socket}
            import_busybox {daemon.url} demo/busybox:test
            docker -H {daemon.url} run --rm --network none demo/busybox:test echo hello
            alive {tmp_path / 'sleep.pid'}
            stop_pidfile {tmp_path / 'sleep.pid'} sleeper
            if alive {tmp_path / 'sleep.pid'}; then exit 3; fi
            if docker_ping {tmp_path / 'nothing.sock'}; then exit 4; fi
        """
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "hello" in result.stdout
        assert sleeper.wait(timeout=10) != 0
    finally:
        sleeper.kill()
        sleeper.wait()
        daemon.stop()


def archive_uri(suite: str, apt_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """deploy/lib.sh's debian_archive_uri, run for real."""
    args = [suite] if apt_dir is None else [suite, str(apt_dir)]
    return subprocess.run(["bash", "-c", '. "$0" && debian_archive_uri "$@"',
                           str(ROOT / "deploy" / "lib.sh"), *args],
                          capture_output=True, text=True, timeout=30)


def test_debian_archive_uri_follows_the_apt_sources(tmp_path: Path) -> None:
    """The mirror comes from deb822 sources (enabled, right suite, continuation lines), else
    from one-line sources.list entries; a suite no source names is an error."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "a.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n")
    (tmp_path / "sources.list.d" / "b.sources").write_text(
        "Types: deb\nURIs:\n http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg")
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian trixie main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one-line.example/debian trixie main\n")
    assert archive_uri("bookworm", tmp_path).stdout == "http://mirror.example/debian\n"
    assert archive_uri("trixie", tmp_path).stdout == "http://one-line.example/debian\n"
    missing = archive_uri("sid", tmp_path)
    assert (missing.returncode, missing.stdout) == (1, "")
    # This machine: the URI is one its apt sources really name.
    here = archive_uri("bookworm")
    assert here.returncode == 0, here.stderr
    sources = "\n".join(path.read_text() for path in [
        *Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]
        if path.exists())
    assert here.stdout.strip() in sources


def test_no_hard_coded_debian_archive() -> None:
    """Installers and the base-image builder name no archive address of their own."""
    for path in [*sorted((ROOT / "deploy").glob("*.sh")),
                 ROOT / "tests" / "support" / "baseimage.py"]:
        assert not re.search(r"https?://[\w.-]*debian\.org", path.read_text()), path



def test_venv_sees_debians_nftables_and_no_other_system_package() -> None:
    """install.sh links python3-nftables' package (not on PyPI) into the venv and nothing else:
    Debian's other Python packages, PyYAML among them, stay out of the venv's path."""
    code = ("import os, sys, nftables, yaml; print(os.path.realpath(nftables.__file__)); "
            "print(os.path.realpath(yaml.__file__)); print(sys.path)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    nft_file, yaml_file, path = shown.stdout.splitlines()
    assert nft_file == "/usr/lib/python3/dist-packages/nftables/__init__.py"
    assert yaml_file.startswith(os.path.realpath(sys.prefix))
    assert "/usr/lib/python3/dist-packages" not in path
    assert "python3-nftables" in (ROOT / "deploy" / "install.sh").read_text()

FAKE_APT_GET = """#!/bin/sh
cat "$POLICY_UNDER_TEST" > "$SEEN"
case "$FAKE_APT" in
  fail) exit 100 ;;
  hang) echo started > "$SEEN.started"; sleep 60 ;;
esac
"""


def install_step(policy: Path, tmp_path: Path, behaviour: str) -> subprocess.Popen[str]:
    """lib.sh's apt_install_holding_services as install.sh runs it, with a fake apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    script = (f'set -euo pipefail; . {ROOT / "deploy" / "lib.sh"}; '
              'apt_install_holding_services "$1" docker.io consul; echo installed')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_APT": behaviour,
           "POLICY_UNDER_TEST": str(policy), "SEEN": str(tmp_path / "seen")}
    return subprocess.Popen(["bash", "-c", script, "install", str(policy)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_started(tmp_path: Path) -> None:
    deadline = time.monotonic() + 20
    while not (tmp_path / "seen.started").exists():
        assert time.monotonic() < deadline, "the fake apt-get never started"
        time.sleep(0.02)


def test_install_puts_the_administrators_policy_rc_d_back(tmp_path: Path) -> None:
    """Packages install with services held; an existing policy-rc.d is the same file after,
    also when apt-get fails, on SIGTERM, and after a SIGKILL once the next run is over."""
    policy = tmp_path / "policy-rc.d"
    admin = "#!/bin/sh\n# the administrator's own\nexit 0\n"
    policy.write_text(admin)
    policy.chmod(0o700)
    original = policy.stat()

    def unchanged() -> bool:
        now = policy.stat()
        return (policy.read_text(), now.st_ino, now.st_mode) == (
            admin, original.st_ino, original.st_mode) and sorted(
            p.name for p in tmp_path.iterdir() if p.name.startswith("policy")) == ["policy-rc.d"]

    done = install_step(policy, tmp_path, "ok")
    assert done.wait(30) == 0 and done.stdout and "installed" in done.stdout.read()
    assert "exit 101" in (tmp_path / "seen").read_text()
    assert unchanged()

    failed = install_step(policy, tmp_path, "fail")
    assert failed.wait(30) == 100
    assert unchanged()

    for sig, restored in ((signal.SIGTERM, True), (signal.SIGKILL, False)):
        (tmp_path / "seen.started").unlink(missing_ok=True)
        step = install_step(policy, tmp_path, "hang")
        wait_started(tmp_path)
        os.killpg(step.pid, sig)  # like ^C: the whole foreground job
        step.wait(30)
        assert unchanged() is restored
    # After the SIGKILL the next run finds the set-aside file and puts it back.
    again = install_step(policy, tmp_path, "ok")
    assert again.wait(30) == 0
    assert "exit 101" in (tmp_path / "seen").read_text()
    assert unchanged()


def test_install_leaves_no_policy_rc_d_where_there_was_none(tmp_path: Path) -> None:
    """Without a policy-rc.d before, there is none after (success, failure or SIGTERM)."""
    policy = tmp_path / "policy-rc.d"
    for behaviour in ("ok", "fail", "hang"):
        (tmp_path / "seen.started").unlink(missing_ok=True)
        step = install_step(policy, tmp_path, behaviour)
        if behaviour == "hang":
            wait_started(tmp_path)
            os.killpg(step.pid, signal.SIGTERM)
        step.wait(30)
        assert "exit 101" in (tmp_path / "seen").read_text()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("policy")] == []
