"""Security groups in Consul: ``groups/<name>``, changed by CAS, removed only while unused.

    groups/<name>           {rules: [{proto, ports?, source}], created}
    meta/groups-version     bumped with CAS by every change to a group's rules and every removal

A group is created with a create-only write. Changing its rules reads ``meta/groups-version``
and the group, decides, and commits one transaction: CAS-bump the version, CAS-write the group
at the index read. Two rule adds at once: one transaction fails, that side reads again and lands
its rule next to the other's. Because removals bump the same version, "a group is not removed
while another group's rule names it" cannot be raced: a rule naming group X and the removal of X
cannot both commit.

Membership is not covered by the version: containers join a group in their endpoint record,
written when the create returns. ``remove`` refuses while an endpoint record names the group,
but a create that checked the group a moment before the removal can still write its record
after it (a window as long as one ``docker create``). Such a container names a group that does
not exist, which has no rules: it accepts nothing new until the group is created again
(``powerplane group check`` says so).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from adapter.errors import GroupConflict, GroupNotFound, InvalidGroup, NetworkNotFound
from adapter.groups import Group, GroupRule, validate_group_name
from adapter.model import quoted
from adapter.network.consul_kv import ConsulKV, dump
from adapter.network.endpoint_records import EndpointRecords
from adapter.network.watch import watch

log = logging.getLogger(__name__)

FOLDER = "groups/"
VERSION_KEY = "meta/groups-version"
CHANGE_ATTEMPTS = 30


class GroupStore:
    """The security groups every host shares."""

    def __init__(self, kv: ConsulKV, endpoints: EndpointRecords) -> None:
        self._kv = kv
        self._endpoints = endpoints

    async def create(self, name: str) -> Group:
        """A new group without rules; GroupConflict if the name is taken."""
        validate_group_name(name)
        group = Group(name)
        record = {**group.to_json(), "created": time.time()}
        result = await self._kv.txn([self._kv.op("cas", FOLDER + name, dump(record), 0)])
        if not result.ok:
            raise GroupConflict(f"group {name!r} already exists")
        log.info("created group %s", name)
        return group

    async def get(self, name: str) -> Group:
        """The group as Consul's leader has it (a consistent read); GroupNotFound if none."""
        group, _, _ = await self._read(name)
        return group

    async def all(self) -> list[Group]:
        return parse_groups(await self._kv.items(FOLDER))

    async def require(self, names: Iterable[str]) -> None:
        """GroupNotFound naming the first of ``names`` that does not exist (consistent reads)."""
        for name in names:
            if await self._kv.get(FOLDER + validate_group_name(name)) is None:
                raise GroupNotFound(
                    f"security group {name!r} (SOCKETPLANE_GROUPS) does not exist: create it "
                    f"with `powerplane group create {name}`")

    def watch(self) -> AsyncIterator[list[Group]]:
        """Every group now and after every change; rides out Consul outages."""
        return watch(self._kv, FOLDER, parse_groups)

    async def add_rule(self, name: str, rule: GroupRule) -> tuple[Group, bool]:
        """Add ``rule`` to the group; the group and whether it changed (a rule it has already
        is not added twice). The group or network the rule's source names must exist."""
        return await self._change(name, lambda group: group.with_rule(rule), needs=rule)

    async def remove_rule(self, name: str, rule: GroupRule) -> Group:
        """Take ``rule`` out of the group; InvalidGroup if it has no such rule."""
        group, _ = await self._change(name, lambda group: group.without_rule(rule))
        return group

    async def remove(self, name: str) -> None:
        """Delete the group; GroupConflict while a container is in it or a rule of another
        group names it as its source."""
        for attempt in range(CHANGE_ATTEMPTS):
            version = await self._kv.get(VERSION_KEY)
            _, index, _ = await self._read(name)
            members = [e for e in await self._endpoints.all(consistent=True) if name in e.groups]
            if members:
                shown = ", ".join(e.name or e.container_id[:12] for e in members[:5])
                more = f" and {len(members) - 5} more" if len(members) > 5 else ""
                raise GroupConflict(
                    f"group {name!r} is in use by {len(members)} container(s): {shown}{more}; "
                    "remove them first")
            referrers = sorted(g.name for g in await self.all() if g.name != name and any(
                r.source_kind == "group" and r.source_name == name for r in g.rules))
            if referrers:
                raise GroupConflict(
                    f"group {name!r} is named by rules of group(s) {', '.join(referrers)} "
                    f"(--from group:{name}); remove those rules first")
            result = await self._kv.txn([
                self._bump(version),
                self._kv.op("delete-cas", FOLDER + name, index=index),
            ])
            if result.ok:
                log.info("removed group %s", name)
                return
            await _back_off(attempt)
        raise GroupConflict(f"group {name!r} kept changing while being removed; try again")

    async def _change(self, name: str, change: Callable[[Group], Group],
                      needs: GroupRule | None = None) -> tuple[Group, bool]:
        for attempt in range(CHANGE_ATTEMPTS):
            version = await self._kv.get(VERSION_KEY)
            group, index, raw = await self._read(name)
            if needs is not None:
                await self._source_exists(needs)
            changed = change(group)
            if changed == group:
                return group, False
            record = {**raw, **changed.to_json()}
            result = await self._kv.txn([
                self._bump(version),
                self._kv.op("cas", FOLDER + name, dump(record), index),
            ])
            if result.ok:
                log.info("group %s: rules now %s", name,
                         "; ".join(r.describe() for r in changed.rules) or "none")
                return changed, True
            await _back_off(attempt)
        raise GroupConflict(f"group {name!r} kept changing; try again")

    async def _source_exists(self, rule: GroupRule) -> None:
        if rule.source_kind == "group":
            if await self._kv.get(FOLDER + rule.source_name) is None:
                raise GroupNotFound(f"--from {rule.source}: no group {rule.source_name!r}; "
                                    f"create it first")
        elif rule.source_kind == "network" \
                and await self._kv.get(f"networks/{rule.source_name}") is None:
            raise NetworkNotFound(f"--from {rule.source}: no network {rule.source_name!r}")

    def _bump(self, version: tuple[Any, int] | None) -> dict[str, dict[str, Any]]:
        number = version[0] if version and type(version[0]) is int else 0
        return self._kv.op("cas", VERSION_KEY, str(number + 1), version[1] if version else 0)

    async def _read(self, name: str) -> tuple[Group, int, Mapping[str, Any]]:
        """The group, its ModifyIndex and its raw record."""
        validate_group_name(name)
        found = await self._kv.get(FOLDER + name)
        if found is None:
            raise GroupNotFound(f"group {quoted(name)} not found")
        value, index = found
        try:
            return Group.from_json(name, value), index, value
        except ValueError as exc:
            key = f"{self._kv.prefix}{FOLDER}{name}"
            raise InvalidGroup(f"malformed group record {key} in Consul: {exc}; remove it with "
                               f"`consul kv delete {key}`") from None


async def _back_off(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))


def parse_groups(items: Mapping[str, Any]) -> list[Group]:
    """The well-formed groups of a listing, by name; malformed records are logged."""
    groups = []
    for name, value in items.items():
        try:
            groups.append(Group.from_json(validate_group_name(name), value))
        except (ValueError, InvalidGroup) as exc:
            log.warning("ignoring malformed group record %s: %s", quoted(name), exc)
    return sorted(groups, key=lambda g: g.name)
