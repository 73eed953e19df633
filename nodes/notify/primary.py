"""The primary's side of one group's notifications: decide, then propose.

Idempotency is checked against the state and the command proposed with no
await in between, so two publishes with one id can never both append. The
retention settings a log gets (the node's defaults filled in), what retention
by age removes and which presence members expired (judged by the primary's
clock) travel in the commands: replicas never read their own clock or
settings. Ephemeral channels are the one thing decided and kept here alone.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from common.slots import slot_for
from mesh.notify.v1 import notify_replication_pb2 as npb
from nodes.notify.machine import NOTIFY, Appended, NotifyMachine
from nodes.notify.model import CHANNEL, CREATED_NS, INBOX, OFFSET, SEQ, Log
from nodes.notify.presence import Member

if TYPE_CHECKING:
    from nodes.replication.group import Group, Proposal

__all__ = ["TRIM_BATCH", "NotifyPrimary"]

TRIM_BATCH = 10_000
"""Most entries one trim command removes (later passes take the rest)."""


class NotifyPrimary:
    """Decisions for one group this node leads (no state of its own)."""

    __slots__ = ("group", "machine")

    def __init__(self, group: Group, machine: NotifyMachine) -> None:
        self.group = group
        self.machine = machine

    def append(self, kind: int, name: str, data: bytes, idempotency_id: str,
               settings: npb.LogSettings | None, defaults: npb.LogSettings) -> Appended:
        """Append to the log ``(kind, name)`` (``settings``: replace its retention;
        ``defaults``: a new log's), or return the entry ``idempotency_id`` names."""
        log = self.machine.logs.get((kind, name))
        if log is not None and idempotency_id:
            entry = log.ids.get(idempotency_id)
            if entry is not None:
                return Appended(entry[OFFSET], log.epoch, entry[SEQ], duplicate=True)
        if log is None and settings is None:
            settings = defaults
        command = npb.AppendEntry(kind=kind, name=name, data=data,  # type: ignore[arg-type]
                                  idempotency_id=idempotency_id, settings=settings)
        result: Appended = self._propose(name, npb.NotifyCommand(append=command)).result
        return result

    def publish(self, name: str, data: bytes, idempotency_id: str,
                settings: npb.LogSettings | None, ephemeral: bool | None,
                defaults: npb.LogSettings, now_ns: int) -> Appended:
        """Publish to channel ``name``, replicated or ephemeral: as ``ephemeral``
        says, else as the channel is (a new one: replicated). Turning a channel
        into the other kind drops its history (the next entry starts a new epoch)."""
        machine = self.machine
        current = machine.ephemeral.get(name)
        if ephemeral is None:
            ephemeral = current is not None
        if not ephemeral:
            if current is not None:
                del machine.ephemeral[name]
            return self.append(CHANNEL, name, data, idempotency_id, settings, defaults)
        if (CHANNEL, name) in machine.logs:  # it was replicated: forget that history
            self._propose(name, npb.NotifyCommand(trim=npb.TrimLog(
                kind=CHANNEL, name=name, forget=True)))
        sooner = current is None or not current.entries
        if current is None:
            settings = settings or defaults
            current = machine.ephemeral[name] = Log(
                CHANNEL, name, slot_for(name), f"~{uuid.uuid4().hex[:16]}", settings.size,
                settings.ttl_ns)
            machine.created += 1
        elif settings is not None:
            sooner = sooner or settings.ttl_ns < current.ttl_ns
            current.size, current.ttl_ns = settings.size, settings.ttl_ns
        if idempotency_id:
            entry = current.ids.get(idempotency_id)
            if entry is not None:
                return Appended(entry[OFFSET], current.epoch, 0, duplicate=True)
        # seq 0: nothing to wait for, it counts as committed at once.
        entry = current.append(data, idempotency_id, now_ns, 0)
        if sooner:
            machine.ephemeral_sooner(current)
        return Appended(entry[OFFSET], current.epoch, 0)

    def mark_read(self, name: str, cursor: int) -> tuple[int, int]:
        """Move an inbox's read cursor to ``cursor``; ``(read_cursor, seq)`` (no
        command when it would not move)."""
        log = self.machine.logs.get((INBOX, name))
        if log is None:
            return 0, 0
        if min(cursor, log.last_offset) <= log.read_cursor:
            return log.read_cursor, log.changed_seq
        proposal = self._propose(name, npb.NotifyCommand(
            mark_read=npb.MarkRead(name=name, cursor=cursor)))
        return proposal.result, proposal.seq

    def join(self, channel: str, client_id: str, user: str, info: bytes,
             ttl_ns: int) -> tuple[Member, int]:
        """Put (or renew) a client in ``channel``'s presence; ``(member, seq)``."""
        proposal = self._propose(channel, npb.NotifyCommand(join=npb.PresenceJoin(
            channel=channel, client_id=client_id, user=user, info=info, ttl_ns=ttl_ns)))
        return proposal.result, proposal.seq

    def leave(self, channel: str, client_id: str) -> tuple[bool, int]:
        """Take a client out of ``channel``'s presence; ``(was_present, seq)`` (no
        command if it was not there)."""
        if client_id not in self.machine.presence.channels.get(channel, {}):
            return False, 0
        proposal = self._propose(channel, npb.NotifyCommand(leave=npb.PresenceLeave(
            channel=channel, client_ids=[client_id])))
        return bool(proposal.result), proposal.seq

    def expire(self, now_ns: int) -> int:
        """Propose the leave of every member expired at ``now_ns``; how many commands."""
        expired = self.machine.presence.expired(now_ns)
        for channel, client_ids in expired.items():
            self._propose(channel, npb.NotifyCommand(leave=npb.PresenceLeave(
                channel=channel, client_ids=client_ids, expired=True)))
        return len(expired)

    def trim(self, now_ns: int, lifetime_ns: int) -> int:
        """Propose the removal of entries older than their log's ttl, and of idle
        channels with nothing left past ``lifetime_ns``; how many commands. The
        logs due are found through the machine's `TrimSchedule`s, so a pass
        costs what is due, not every log held."""
        issued = 0
        machine = self.machine
        logs = machine.logs
        schedule = machine.trim_schedule(lifetime_ns)
        for key in schedule.due(now_ns):
            log = logs.get(key)
            if log is None:
                continue  # forgotten meanwhile
            command = trim_of(log, now_ns, lifetime_ns)  # None: it came early
            if command is not None:
                self._propose(log.name, npb.NotifyCommand(trim=command))  # applied at once
                issued += 1
                if command.forget:
                    continue
            schedule.put(log)
        # Ephemeral channels are trimmed in place: nothing of them is replicated.
        ephemeral = machine.ephemeral
        schedule = machine.ephemeral_schedule(lifetime_ns)
        for _, name in schedule.due(now_ns):
            log = ephemeral.get(name)
            if log is None:
                continue
            command = trim_of(log, now_ns, lifetime_ns)
            if command is not None and command.forget:
                del ephemeral[name]
                continue
            if command is not None:
                log.trim_before(command.before_offset)
            schedule.put(log)
        return issued

    def _propose(self, name: str, command: npb.NotifyCommand) -> Proposal:
        return self.group.propose(slot_for(name), NOTIFY, command.SerializeToString())


def trim_of(log: Log, now_ns: int, lifetime_ns: int) -> npb.TrimLog | None:
    """What retention by age removes from ``log`` at ``now_ns``, if anything."""
    entries = log.entries
    if not entries:
        # Inboxes are kept (their read cursor and numbering matter to devices);
        # a channel idle past its lifetime is forgotten.
        if log.kind != INBOX and now_ns - log.last_append_ns > lifetime_ns:
            return npb.TrimLog(kind=log.kind, name=log.name, forget=True)  # type: ignore[arg-type]
        return None
    oldest = now_ns - log.ttl_ns
    keep, limit = entries[0][OFFSET], min(len(entries), TRIM_BATCH)
    for i in range(limit):
        if entries[i][CREATED_NS] >= oldest:
            break
        keep = entries[i][OFFSET] + 1
    if keep == entries[0][OFFSET]:
        return None
    return npb.TrimLog(kind=log.kind, name=log.name, before_offset=keep)  # type: ignore[arg-type]
