"""The package's layers import in one direction only (adapter/__init__.py draws them).

Every ``import`` in ``adapter/`` is read from the source (no module is executed) and checked
against the table below; each external system is imported by its one wrapper module only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adapter"

FOUNDATION = {"adapter", "adapter.errors", "adapter.settings", "adapter.model", "adapter.groups",
              "adapter.logs"}

# Layer → the layers it may import (always: itself and the foundation).
ALLOWED: dict[str, set[str]] = {
    "foundation": set(),
    "proxy": set(),
    "dataplane": set(),
    # The metrics registry: told things by the control plane; the proxy and the data plane
    # know nothing of it (the proxy has its observer interface, serve connects the two).
    "metrics": set(),
    "network": {"dataplane", "metrics"},
    "hooks": {"network", "proxy.powerstrip"},
    "commands": {"proxy", "dataplane", "network", "hooks", "cli", "metrics"},
    "cli": {"commands"},
}

# External libraries and the one module that may import each.
WRAPPED: dict[str, str] = {
    "consul": "adapter.network.consul_kv",
    "ovsdbapp": "adapter.dataplane.ovs",
    "pyroute2": "adapter.dataplane.links",
    "docker": "adapter.network.docker_api",
    "nftables": "adapter.dataplane.nft",
    "ovs": "adapter.dataplane.vswitchd",
    "dnslib": "adapter.network.dns_wire",
    "prometheus_client": "adapter.metrics",
}


def layer_of(module: str) -> str:
    """The layer a module of ``adapter`` belongs to."""
    if module in FOUNDATION or module == "adapter.__main__":
        return "foundation" if module != "adapter.__main__" else "cli"
    if module == "adapter.cli":
        return "cli"
    if module == "adapter.proxy.powerstrip":
        return "proxy.powerstrip"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def may_import(importer: str, imported: str) -> bool:
    source, target = layer_of(importer), layer_of(imported)
    if source == "proxy.powerstrip":
        source = "proxy"
    if target == "foundation" or source == target:
        return True
    if target == "proxy.powerstrip" and source == "proxy":
        return True
    allowed = ALLOWED[source]
    return target in allowed or (target == "proxy.powerstrip" and "proxy" in allowed)


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str) -> list[str]:
    """Every module name ``source`` imports (``from x import y`` counts as x and x.y)."""
    found: list[str] = []
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(base)
            found.extend(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(source: str, module: str, known: set[str]) -> list[str]:
    """What ``module`` (with text ``source``) imports against the layers or the wrappers."""
    problems = []
    for imported in imports_of(source, module):
        top = imported.split(".")[0]
        if top in WRAPPED and WRAPPED[top] != module:
            problems.append(f"{module} imports {imported}: only {WRAPPED[top]} may")
        if top == "adapter" and imported in known and not may_import(module, imported):
            problems.append(f"{module} ({layer_of(module)}) imports {imported} "
                            f"({layer_of(imported)})")
    return problems


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_every_import_points_down_the_layers() -> None:
    """No module imports a layer above it or beside it, nor another module's library."""
    modules = package_modules()
    known = set(modules)
    problems = [problem for module, path in sorted(modules.items())
                for problem in violations(path.read_text(), module, known)]
    assert problems == []


@pytest.mark.parametrize(("module", "source"), [
    ("adapter.proxy.relay", "from adapter.network.state import State\n"),
    ("adapter.proxy.relay", "import adapter.dataplane.ovs\n"),
    ("adapter.dataplane.switch", "from adapter.network import endpoints\n"),
    ("adapter.network.agent", "from adapter.hooks.network import NetworkHook\n"),
    ("adapter.network.agent", "from adapter.proxy.relay import DockerProxy\n"),
    ("adapter.hooks.network", "from adapter.commands import serve\n"),
    ("adapter.network.endpoints", "import consul\n"),
    ("adapter.hooks.network", "from pyroute2 import IPRoute\n"),
    ("adapter.network.state", "from ..proxy import relay\n"),
    ("adapter.network.networks", "import consul.aio\n"),
    ("adapter.proxy.session", "from adapter.metrics import Metrics\n"),
    ("adapter.dataplane.switch", "from adapter.metrics import Metrics\n"),
    ("adapter.network.agent", "from prometheus_client import Counter\n"),
])
def test_the_check_catches_an_import_against_the_direction(module: str, source: str) -> None:
    """The check itself can fail: each of these imports is reported."""
    assert violations(source, module, set(package_modules())) != []


@pytest.mark.parametrize(("module", "source"), [
    ("adapter.network.endpoints", "from adapter.dataplane.switch import DataPlane\n"),
    ("adapter.hooks.network", "from adapter.proxy.powerstrip import PowerstripMessage\n"),
    ("adapter.commands.serve", "from adapter.proxy.relay import make_proxy\n"),
    ("adapter.dataplane.switch", "from adapter.model import Network\n"),
])
def test_the_check_allows_imports_along_the_direction(module: str, source: str) -> None:
    assert violations(source, module, set(package_modules())) == []


# Programs product code may start, and the one module that starts each. OVS's and the kernel's
# configuration go through their libraries (ovsdbapp, pyroute2); only OpenFlow has none fit for
# asyncio (adapter/dataplane/openflow.py says why).
PROGRAMS: dict[str, str] = {"ovs-ofctl": "adapter.dataplane.openflow"}
STARTS_PROCESSES = ("subprocess", "create_subprocess_exec", "create_subprocess_shell", "system",
                    "popen", "Popen", "execv", "execvp", "spawnv")


def starts_processes(source: str) -> bool:
    """True when ``source`` imports subprocess or calls something that starts a program."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(name.split(".")[0] == "subprocess" for name in names):
                return True
        if isinstance(node, ast.Attribute) and node.attr in STARTS_PROCESSES:
            return True
    return False


def test_only_the_openflow_wrapper_starts_programs() -> None:
    """No ``ovs-vsctl`` or ``ip`` behind the libraries' backs: one module runs one program."""
    runners = sorted(module for module, path in package_modules().items()
                     if starts_processes(path.read_text()))
    assert runners == sorted(set(PROGRAMS.values()))
    assert 'COMMAND = "ovs-ofctl"' in (PACKAGE / "dataplane" / "openflow.py").read_text()


@pytest.mark.parametrize("source", [
    "import subprocess\n", "from subprocess import run\n",
    "import asyncio\nasyncio.create_subprocess_exec('ip')\n", "import os\nos.system('ip')\n",
])
def test_the_program_check_can_fail(source: str) -> None:
    assert starts_processes(source)
