"""nftables through libnftables' JSON API (the only module that imports ``nftables``).

``nftables`` is Debian's python3-nftables, a ctypes binding of libnftables: what the ``nft``
command runs, as a library. One ``json_cmd`` call is one netlink batch, which the kernel commits
or rejects whole: ``transaction`` hands it a list of commands, so a reader never sees half of a
change and a crash never leaves half of one.

The library is blocking and its context is not thread-safe: every call runs in a worker thread,
one at a time per ``Nft``. The library is loaded on first use, so constructing an ``Nft`` touches
nothing. libnftables works in the network namespace of the calling process. Its errors are
translated here, once, into ``DataPlaneError``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import nftables

from adapter.errors import DataPlaneError

Command = dict[str, Any]  # one element of the JSON API's "nftables" array


class Nft:
    """One libnftables context."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._lock = threading.Lock()

    def _context(self) -> Any:
        if self._handle is None:
            try:
                self._handle = nftables.Nftables()
            except OSError as exc:
                raise DataPlaneError(f"cannot load libnftables: {exc}") from None
        return self._handle

    def _run(self, commands: Sequence[Command], what: str) -> list[Command]:
        with self._lock:
            handle = self._context()
            try:
                rc, output, error = handle.json_cmd({"nftables": list(commands)})
            except (OSError, ValueError) as exc:  # ctypes failures, unparsable output
                raise DataPlaneError(f"nftables: {what} failed: {exc}") from None
        if rc != 0:
            detail = " ".join(str(error).split()) or f"error {rc}"
            raise DataPlaneError(f"nftables refused {what}: {detail}")
        if not output:
            return []
        return [item for item in output.get("nftables", []) if "metainfo" not in item]

    async def transaction(self, commands: Sequence[Command], what: str) -> None:
        """Run ``commands`` as one atomic batch; ``what`` names it in an error."""
        await asyncio.to_thread(self._run, commands, what)

    async def list_table(self, family: str, name: str) -> list[Command] | None:
        """The table's objects (table, sets, chains, rules) as listed; None if it is absent."""
        table = {"family": family, "name": name}
        try:
            return await asyncio.to_thread(
                self._run, [{"list": {"table": table}}], f"listing table {family} {name}")
        except DataPlaneError:
            # The library reports a missing table only as text; ask which tables exist instead
            # of parsing it, and raise the original error if ours is one of them.
            tables = await asyncio.to_thread(
                self._run, [{"list": {"tables": {"family": family}}}], f"listing {family} tables")
            if any(item.get("table", {}).get("name") == name for item in tables):
                raise
            return None

    async def delete_table(self, family: str, name: str) -> None:
        """Delete the table with everything in it; nothing to do if it is absent."""
        table = {"family": family, "name": name}
        # Adding first makes the delete succeed either way, in one batch: nobody sees the add.
        await self.transaction([{"add": {"table": table}}, {"delete": {"table": table}}],
                               f"deleting table {family} {name}")
