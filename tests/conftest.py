"""Test plumbing: every module in tests/fixtures/ is a pytest plugin of fixtures.

Fixtures start real components (dockerd, Consul, Open vSwitch, network namespaces) only when a
test asks for them, and remove everything they made; no test depends on another's leftovers.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{module.name}"
    for module in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
)
