"""The OpenFlow wrapper when the switch does not answer: a DataPlaneError, never a crash.

ovs-vswitchd restarting has no management socket for a moment; ``ovs-ofctl`` then exits before
it reads its input. The table once went through a pipe to its stdin, and the write into the
closed pipe escaped (under uvloop, as serve runs) as a RuntimeError that ended serve's runtime.
The table now goes through a file; these tests hold the failure to its one translated shape,
with the real ovs-ofctl and with one that exits at once without reading anything.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import uvloop

from adapter.dataplane import openflow
from adapter.dataplane.openflow import OpenFlow
from adapter.errors import DataPlaneError

BIG_TABLE = [f"table=0,priority={i},tcp,tp_dst={i},actions=drop" for i in range(1, 4000)]


def replace_on_a_switch_that_is_gone(tmp_path: Path) -> str:
    async def attempt() -> str:
        switch = OpenFlow(f"unix:{tmp_path / 'db.sock'}", "powerplane0")
        with pytest.raises(DataPlaneError) as failure:
            await switch.replace(BIG_TABLE)
        return str(failure.value)
    return asyncio.run(attempt())


def test_a_switch_that_does_not_answer_is_a_data_plane_error(tmp_path: Path) -> None:
    message = replace_on_a_switch_that_is_gone(tmp_path)
    assert "replace-flows on powerplane0 failed" in message
    assert "powerplane0.mgmt" in message


def test_a_command_that_exits_at_once_under_uvloop(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    impatient = tmp_path / "ovs-ofctl"
    impatient.write_text("#!/bin/sh\necho 'ovs-ofctl: connecting to x (Connection refused)' >&2\n"
                         "exit 1\n")
    impatient.chmod(0o755)
    monkeypatch.setattr(openflow, "COMMAND", str(impatient))
    tables = tmp_path / "tables"  # this test's own, so other processes' files do not count
    tables.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tables))
    uvloop.install()
    try:
        for _ in range(20):
            assert "Connection refused" in replace_on_a_switch_that_is_gone(tmp_path)
    finally:
        asyncio.set_event_loop_policy(None)
    assert not list(tables.iterdir()), "a table file left behind"
