"""The host's own network state, snapshotted so a test run can prove it left the host alone.

A snapshot holds what tests could disturb in the network namespace they run in (the host's,
normally): links, addresses, routes and policy rules (``ip -j``), the nftables ruleset and, where
the tools exist, ``iptables-save`` / ``ip6tables-save``. ``differences`` names every change, one
line each. Fields that move by themselves are left out: packet and byte counters, address and
route lifetimes, nftables handles. Anything else that changed is a difference, a link going
down included.

Concurrent runs: other checkouts' tests share this machine and run at the same time. Their labs
live in namespaces of their own and never touch this namespace, so these objects stay theirs;
the namespaces a run leaves behind are told apart by name (``tests/support/netns.py``). One
thing a concurrent run of older code can still do here is what this check exists for: a dockerd
started with ``--bridge=none`` in this namespace deletes ``docker0``. Such daemons are named in
the report, so a difference caused by someone else is recognisable as such.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys whose values change with traffic or time, never with configuration.
VOLATILE_KEYS = frozenset({
    "stats", "stats64", "valid_life_time", "preferred_life_time", "expires", "handle",
    "packets", "bytes", "used", "metainfo",
})
COUNTERS = re.compile(r"\[\d+:\d+\]")


def _run_json(args: list[str]) -> Any:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout or "[]")


def _strip(value: Any) -> Any:
    """``value`` without volatile keys, at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _canonical(value: Any) -> str:
    return json.dumps(_strip(value), sort_keys=True)


@dataclass(frozen=True)
class HostState:
    """One snapshot; every field maps a stable key to a canonical description."""

    links: dict[str, str] = field(default_factory=dict)
    addresses: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()
    nftables: frozenset[str] = frozenset()
    iptables: dict[str, tuple[str, ...]] = field(default_factory=dict)


def snapshot() -> HostState:
    """The network state of the namespace this process runs in."""
    links = {link["ifname"]: _canonical(link) for link in _run_json(["ip", "-j", "link", "show"])}
    addresses = frozenset(
        f"{link['ifname']} {_canonical(address)}"
        for link in _run_json(["ip", "-j", "addr", "show"])
        for address in link.get("addr_info", [])
    )
    routes = frozenset(
        f"{family} {_canonical(route)}" for family in ("-4", "-6")
        for route in _run_json(["ip", "-j", family, "route", "show", "table", "all"])
    )
    rules = frozenset(
        f"{family} {_canonical(rule)}" for family in ("-4", "-6")
        for rule in _run_json(["ip", "-j", family, "rule", "show"])
    )
    nftables: frozenset[str] = frozenset()
    if shutil.which("nft"):
        ruleset = _run_json(["nft", "-j", "list", "ruleset"])
        objects = ruleset.get("nftables", []) if isinstance(ruleset, dict) else []
        nftables = frozenset(_canonical(item) for item in objects if "metainfo" not in item)
    iptables: dict[str, tuple[str, ...]] = {}
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            out = subprocess.run([tool], capture_output=True, text=True, timeout=60).stdout
            iptables[tool] = tuple(COUNTERS.sub("[0:0]", line) for line in out.splitlines()
                                   if line and not line.startswith("#"))
    return HostState(links, addresses, routes, rules, nftables, iptables)


def differences(before: HostState, after: HostState) -> list[str]:
    """One line per change from ``before`` to ``after``; empty when nothing changed."""
    found: list[str] = []
    for name in sorted(before.links.keys() - after.links.keys()):
        found.append(f"link {name} removed (was {before.links[name]})")
    for name in sorted(after.links.keys() - before.links.keys()):
        found.append(f"link {name} added: {after.links[name]}")
    for name in sorted(before.links.keys() & after.links.keys()):
        if before.links[name] != after.links[name]:
            found.append(f"link {name} changed: {before.links[name]} -> {after.links[name]}")
    for what in ("addresses", "routes", "rules", "nftables"):
        old, new = getattr(before, what), getattr(after, what)
        found.extend(f"{what}: removed {item}" for item in sorted(old - new))
        found.extend(f"{what}: added {item}" for item in sorted(new - old))
    for tool in sorted(before.iptables.keys() | after.iptables.keys()):
        old_lines = before.iptables.get(tool, ())
        new_lines = after.iptables.get(tool, ())
        if old_lines != new_lines:
            found.extend(f"{tool}: removed {line}" for line in old_lines if line not in new_lines)
            found.extend(f"{tool}: added {line}" for line in new_lines if line not in old_lines)
            if set(old_lines) == set(new_lines):
                found.append(f"{tool}: rules reordered")
    return found


def bridge_none_dockerds() -> list[str]:
    """dockerds in this process's namespace started with ``--bridge=none``: ``pid cmdline``.

    This run starts none there (every private dockerd has a namespace of its own), so any found
    belong to someone else, and each would delete a ``docker0`` in this namespace.
    """
    own = os.stat("/proc/self/ns/net").st_ino
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino != own:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"dockerd") and b"--bridge=none" in argv:
            found.append(f"{entry.name} {b' '.join(argv).decode(errors='replace').strip()}")
    return found
