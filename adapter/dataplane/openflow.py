"""The bridge's OpenFlow tables, through ``ovs-ofctl``: the only module that touches OpenFlow.

Why a command and not a library: the Python OpenFlow libraries are either unmaintained or pull in
a controller framework built on eventlet, which does not live beside asyncio; OVS's own
``ovs-ofctl`` ships with every OVS, speaks every Nicira extension we use (``ct()``, masked
matches) and, with ``--bundle replace-flows``, swaps the whole table in one OpenFlow bundle
(atomic: a packet sees the old table or the new one) while sending only the differences. That is
also how the reconciler is idempotent: it renders the complete table and replaces it.

The bridge is reached at its management socket in OVS's run directory, which is the directory of
the OVSDB unix socket, as ``ovs-vsctl`` would find it. Commands run as child processes under
asyncio; the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from adapter.errors import DataPlaneError

log = logging.getLogger(__name__)

COMMAND = "ovs-ofctl"
PROTOCOL = "OpenFlow14"  # the first with bundles
TIMEOUT_SECONDS = 10.0


class OpenFlow:
    """The flow table of ``bridge`` on the OVS whose OVSDB is at ``ovsdb_url``."""

    def __init__(self, ovsdb_url: str, bridge: str) -> None:
        scheme, _, path = ovsdb_url.partition(":")
        self._target = (f"unix:{Path(path).parent / bridge}.mgmt"
                        if scheme == "unix" and path else None)
        self.bridge = bridge

    @property
    def reachable(self) -> bool:
        """False when OVS is remote (a TCP OVSDB): its management socket is not on this host."""
        return self._target is not None

    async def _run(self, command: str, *operands: str, options: Sequence[str] = ()) -> str:
        if self._target is None:
            raise DataPlaneError(f"the OpenFlow tables of {self.bridge} are not reachable from "
                                 "this host (OVSDB is remote)")
        argv = [COMMAND, "-O", PROTOCOL, *options, command, self._target, *operands]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise DataPlaneError(f"cannot run {COMMAND}: {exc}") from None
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise DataPlaneError(f"{COMMAND} {command} on {self.bridge}: no answer within "
                                 f"{TIMEOUT_SECONDS:g} s (is ovs-vswitchd stuck?)") from None
        if process.returncode != 0:
            message = err.decode(errors="replace").strip().splitlines()
            raise DataPlaneError(f"{COMMAND} {command} on {self.bridge} failed: "
                                 f"{message[-1] if message else f'exit {process.returncode}'}")
        return out.decode(errors="replace")

    async def replace(self, flows: Sequence[str]) -> None:
        """Make the bridge's flow table exactly ``flows``, atomically, touching only changes."""
        # From a file, not a pipe: an ovs-ofctl that cannot reach the switch exits before it
        # reads its input, and a write into its closed pipe would fail outside our control.
        path = await asyncio.to_thread(_write_flows, flows)
        try:
            await self._run("replace-flows", str(path), options=["--bundle"])
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def dump(self, cookie: int | None = None) -> list[str]:
        """The flows now installed (all, or those with exactly ``cookie``), without counters."""
        selector = [f"cookie={cookie:#x}/-1"] if cookie is not None else []
        text = await self._run("dump-flows", *selector, options=["--no-stats"])
        return [line.strip() for line in text.splitlines() if line.strip()]


def _write_flows(flows: Sequence[str]) -> Path:
    with tempfile.NamedTemporaryFile("w", prefix="powerplane-flows-", suffix=".txt",
                                     delete=False) as file:
        file.write("\n".join(flows) + "\n")
    return Path(file.name)
