"""Private dockerds leave the host's network alone (issue 13).

A dockerd started with ``--bridge=none`` deletes the ``docker0`` of the namespace it runs in;
run in the host's, it broke the machine's own ``docker run`` ("could not find bridge docker0").
These tests use a scratch namespace with a ``docker0`` of its own as the "host", so the real
host is never put at risk, and show both sides: a daemon in that namespace deletes the bridge,
a DockerDaemon started from it does not.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dockerd import DockerDaemon
from tests.support.host_state import HostState, differences
from tests.support.netns import NETNS_DIR, add_netns, delete_netns, pids_in_netns, run_prefix

ROOT = Path(__file__).resolve().parents[1]


def has_docker0(netns: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", "docker0"],
                          capture_output=True).returncode == 0


@pytest.fixture
def scratch_host() -> Iterator[str]:
    """A namespace standing in for a host whose Docker made ``docker0``."""
    name = add_netns("host")
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "docker0", "type", "bridge"],
                       check=True, capture_output=True)
        yield name
    finally:
        delete_netns(name)


def test_private_dockerd_runs_in_a_namespace_of_its_own(tmp_path: Path) -> None:
    """By default the daemon gets a fresh namespace of this run; stop() kills and deletes it."""
    daemon = DockerDaemon.start(tmp_path / "dockerd")
    try:
        inode = os.stat(f"/proc/{daemon.process.pid}/ns/net").st_ino
        assert inode != os.stat("/proc/self/ns/net").st_ino
        assert daemon.netns.startswith(run_prefix())
        assert (NETNS_DIR / daemon.netns).stat().st_ino == inode
        ran = subprocess.run(["docker", "-H", daemon.url, "info", "--format", "{{.ID}}"],
                             capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
    finally:
        daemon.stop()
    assert not (NETNS_DIR / daemon.netns).exists()
    assert pids_in_netns(inode) == []


def snapshot_in(netns: str) -> HostState:
    """The host-state snapshot, taken by a process inside ``netns``."""
    code = ("import pickle, sys; from tests.support.host_state import snapshot; "
            "sys.stdout.buffer.write(pickle.dumps(snapshot()))")
    taken = subprocess.run(["nsenter", f"--net={NETNS_DIR / netns}", sys.executable, "-c", code],
                           cwd=ROOT, capture_output=True, timeout=60, check=True)
    state: HostState = pickle.loads(taken.stdout)
    return state


def test_a_dockerd_in_the_hosts_namespace_deletes_docker0(
    scratch_host: str, tmp_path: Path
) -> None:
    """The bug itself, on the scratch host: a --bridge=none daemon there removes docker0, and
    the end-of-session comparison names it."""
    before = snapshot_in(scratch_host)
    with DockerDaemon.start(tmp_path / "dockerd", netns=scratch_host):
        assert not has_docker0(scratch_host)
        after = snapshot_in(scratch_host)
    found = differences(before, after)
    assert found and found[0].startswith("link docker0 removed"), found


def test_docker0_survives_a_private_dockerd_started_from_the_host(
    scratch_host: str, tmp_path: Path
) -> None:
    """A DockerDaemon started by a process in the scratch host changes nothing there."""
    before = snapshot_in(scratch_host)
    code = ("import sys; from pathlib import Path; from tests.support.dockerd import DockerDaemon; "
            "DockerDaemon.start(Path(sys.argv[1])).stop()")
    started = subprocess.run(["nsenter", f"--net={NETNS_DIR / scratch_host}", sys.executable,
                              "-c", code, str(tmp_path / "dockerd")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    assert has_docker0(scratch_host)
    assert differences(before, snapshot_in(scratch_host)) == []


def test_counters_are_no_difference_but_a_new_rule_is(scratch_host: str) -> None:
    """Traffic through counting nftables rules changes nothing; a rule added is named."""
    def nft(*args: str) -> None:
        subprocess.run(["nsenter", f"--net={NETNS_DIR / scratch_host}", "nft", *args],
                       check=True, capture_output=True, timeout=30)

    nft("add", "table", "inet", "pptest")
    nft("add", "chain", "inet", "pptest", "out", "{ type filter hook output priority 0; }")
    nft("add", "rule", "inet", "pptest", "out", "counter")
    before = snapshot_in(scratch_host)
    subprocess.run(["nsenter", f"--net={NETNS_DIR / scratch_host}", "ping", "-c", "3", "-i",
                    "0.01", "127.0.0.1"], check=True, capture_output=True, timeout=30)
    assert differences(before, snapshot_in(scratch_host)) == []
    nft("add", "rule", "inet", "pptest", "out", "ip daddr 127.0.0.2 drop")
    found = differences(before, snapshot_in(scratch_host))
    assert len(found) == 1 and found[0].startswith("nftables: added"), found
    assert "127.0.0.2" in found[0]
