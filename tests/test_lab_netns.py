"""The lab's namespace underlay: hosts reach each other and nothing else; no leftovers."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.lab.netns import NETNS_DIR, Underlay

pytestmark = pytest.mark.lab


def test_hosts_reach_each_other_and_nothing_outside() -> None:
    """Two lab hosts ping each other; neither has a route out of the lab."""
    with Underlay(2) as lab:
        first, second = lab.hosts
        assert first.name != second.name and first.ip != second.ip
        first.run(["ping", "-c1", "-W2", second.ip])
        second.run(["ping", "-c1", "-W2", lab.underlay.ip])
        routes = first.run(["ip", "route"]).stdout
        assert "default" not in routes
        unreachable = first.run(["ping", "-c1", "-W1", "10.255.255.1"], check=False)
        assert unreachable.returncode != 0
        assert "eth0" in first.run(["ip", "-br", "link"]).stdout


def test_close_kills_processes_and_removes_namespaces() -> None:
    """close() kills started processes and leaves no namespace, process or interface behind."""
    lab = Underlay(1)
    sleeper = lab.hosts[0].popen(["sleep", "600"])
    names = [ns.name for ns in lab.namespaces]
    lab.close()
    assert sleeper.poll() is not None
    assert not any((NETNS_DIR / name).exists() for name in names)
    assert lab.leftovers() == []
    lab.close()  # idempotent


def test_close_reports_and_removes_strays() -> None:
    """A daemon that escaped the lab's bookkeeping is killed and reported as a leftover."""
    lab = Underlay(1)
    host = lab.hosts[0]
    stray = subprocess.Popen(host.command(["sleep", "600"]), start_new_session=True)
    try:
        inode = os.stat(host.netns_path).st_ino
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{stray.pid}/ns/net").st_ino != inode:
            assert time.monotonic() < deadline, "nsenter never entered the namespace"
            time.sleep(0.01)
        with pytest.raises(AssertionError, match="processes"):
            lab.close()
        assert stray.wait(5) is not None
        assert lab.leftovers() == []
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
