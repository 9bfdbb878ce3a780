"""A diagnosis's vocabulary: one ``Finding`` per thing checked, and time bounds for checks.

A finding says, in words, what is wrong and what to do about it (``problem``, ``fix``), or what
was seen when all is well (``detail``). A check that cannot run because something it needs is
already reported broken is ``skipped``: it counts neither as healthy nor as a second problem.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adapter.errors import PowerplaneError

# No single check may hold doctor longer than this: a daemon that does not answer is a finding.
CHECK_SECONDS = 10.0


class Status(enum.Enum):
    OK = "ok"
    PROBLEM = "problem"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check."""

    check: str  # what was checked: "consul", "peer h2 path MTU", ...
    status: Status
    problem: str = ""  # what is wrong, in words ("" unless PROBLEM)
    fix: str = ""  # what to do about it
    detail: str = ""  # what was seen (OK), or why the check was skipped

    @property
    def ok(self) -> bool:
        """Nothing found wrong (a skipped check hides no problem of its own)."""
        return self.status is not Status.PROBLEM

    @classmethod
    def good(cls, check: str, detail: str = "") -> Finding:
        return cls(check, Status.OK, detail=detail)

    @classmethod
    def bad(cls, check: str, problem: str, fix: str) -> Finding:
        return cls(check, Status.PROBLEM, problem=problem, fix=fix)

    @classmethod
    def skipped(cls, check: str, why: str) -> Finding:
        return cls(check, Status.SKIPPED, detail=why)

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status.value, "ok": self.ok,
                "problem": self.problem, "fix": self.fix, "detail": self.detail}


def healthy(findings: Sequence[Finding]) -> bool:
    return all(finding.ok for finding in findings)


async def bounded(check: str, run: Callable[[], Awaitable[list[Finding]]], *,
                  fix: str, seconds: float = CHECK_SECONDS) -> list[Finding]:
    """``run``'s findings; its failure (an error of ours, or no answer within ``seconds``) as
    one problem of ``check``, with ``fix`` as the thing to do."""
    try:
        async with asyncio.timeout(seconds):
            return await run()
    except TimeoutError:
        return [Finding.bad(check, f"no answer within {seconds:g} s", fix)]
    except PowerplaneError as exc:
        return [Finding.bad(check, str(exc), fix)]


def summary(findings: Sequence[Finding]) -> str:
    """One line: all passed, or how many problems."""
    problems = sum(1 for f in findings if not f.ok)
    if not problems:
        return f"all {len(findings)} checks passed"
    return f"{problems} problem{'s' if problems != 1 else ''} found ({len(findings)} checks)"
