"""Named network namespaces of one test run, so the run can tell its own apart from others'.

Several test runs (other checkouts, other engineers) share this machine and make namespaces at
the same time. Every namespace this run makes is named ``ppt<tag>...``: the tag is drawn once
per run and handed to child processes through the environment (``PPTEST_RUN_TAG``), so the
end-of-session check can ask "is anything of *ours* left?" without tripping over a concurrent
run's lab. ``ppt`` cannot start another run's ``pp<hex>`` names: ``t`` is not a hex digit.

Processes are started in a namespace with ``nsenter --net=/run/netns/NAME``, not ``ip netns
exec``: the latter remounts /sys, and dockerd fails there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")
RUN_TAG_ENV = "PPTEST_RUN_TAG"


def run_prefix() -> str:
    """``ppt<tag>``: the start of every namespace name this run (and its children) makes."""
    tag = os.environ.setdefault(RUN_TAG_ENV, secrets.token_hex(3))
    return f"ppt{tag}"


def unique_prefix() -> str:
    """A fresh name stem of this run with no ``-`` in it, e.g. for one lab's namespaces."""
    return f"{run_prefix()}{secrets.token_hex(2)}"


def run_namespaces() -> list[str]:
    """Named namespaces of this run that exist now."""
    prefix = run_prefix()
    with contextlib.suppress(FileNotFoundError):
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    return []


def add_netns(role: str) -> str:
    """Create an empty namespace with loopback up; return its name (``<stem>-<role>``)."""
    name = f"{unique_prefix()}-{role}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
    except BaseException:
        delete_netns(name)
        raise
    return name


def netns_inode(name: str) -> int | None:
    try:
        return (NETNS_DIR / name).stat().st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(inode: int) -> list[int]:
    """Live (non-zombie) processes whose network namespace is ``inode``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "ns" / "net").stat().st_ino != inode:
                continue
            # PID 1 reaps orphans slowly here: a zombie is dead already.
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def delete_netns(name: str, timeout: float = 5.0) -> None:
    """Kill whatever still runs inside ``name``, then delete it; quiet if it is gone already.

    ``ip netns delete`` only drops the name: a namespace lives on while a process is in it.
    """
    inode = netns_inode(name)
    if inode is None:
        return
    deadline = time.monotonic() + timeout
    while (stray := pids_in_netns(inode)) and time.monotonic() < deadline:
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
