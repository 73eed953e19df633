"""One replica group on this node: its role, its position, its services' state.

A group's history is a sequence of commands numbered by ``seq`` and tagged with
the epoch of the primary that issued them. Every change takes one path: on the
primary, a service proposes a command (`Group.propose`), which its machine
applies at once, exactly as replicas will, and whose result comes back in the
`Proposal`; the request is answered once ``await proposal.committed()`` says the
required replicas hold it. On a replica, `Group.apply_batch` applies the
primary's commands in order, and refuses any sender whose epoch is older than
the newest this node has seen (a deposed primary can no longer complete a write).
What a durable machine returns to persist goes to the journal from here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Collection, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from common import tracing
from common.clock import SYSTEM_CLOCK, Clock
from common.errors import MeshStatusError, Reason
from common.tasks import together
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication.log import CommandLog, LogBudget
from nodes.replication.machine import MachineFactory, Persist, StateMachine

if TYPE_CHECKING:
    from nodes.replication.journal import DurableCopy, JournalWriter
    from nodes.replication.sender import ReplicaTracker

__all__ = ["Group", "Proposal", "barriers", "not_committed", "stopped_leading"]

log = logging.getLogger(__name__)

PRIMARY = rpb.GROUP_ROLE_PRIMARY
REPLICA = rpb.GROUP_ROLE_REPLICA
CATCHING_UP = rpb.GROUP_ROLE_CATCHING_UP


def not_committed(group_id: int, why: str) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.UNAVAILABLE,
        f"group {group_id}: the write was applied here but not acknowledged by its "
        f"replicas before {why}; it may or may not have taken effect",
        Reason.NOT_COMMITTED, {"group_id": str(group_id)},
    )


def stopped_leading(group_id: int) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.UNAVAILABLE,
        f"group {group_id} is no longer led by this node (it changed hands while the "
        "call waited); retry at its new primary",
        Reason.GROUP_UNAVAILABLE, {"group_id": str(group_id)},
    )


class Proposal:
    """A command the primary applied: its ``seq`` and its machine's ``result``,
    which counts once `committed` returns (the replicas hold the command)."""

    __slots__ = ("group", "result", "seq")

    def __init__(self, group: Group, seq: int, result: Any) -> None:
        self.group = group
        self.seq = seq
        self.result = result

    async def committed(self) -> Any:
        """The result, once the command is committed (else `not_committed`)."""
        await self.group.wait_committed(self.seq)
        return self.result


class Group:
    """This node's copy of one group (primary or replica)."""

    def __init__(
        self, group_id: int, node_id: str, factories: Mapping[int, MachineFactory],
        origin_epoch: int = 0, durable: DurableCopy | None = None,
        clock: Clock = SYSTEM_CLOCK, journal: JournalWriter | None = None,
        log_budget: LogBudget | None = None,
    ) -> None:
        self.group_id = group_id
        self._journal = journal  # where durable machines' writes go
        self.clock = clock  # stamps the commands it issues (their ``issued_at``)
        self.node_id = node_id
        self.origin_epoch = origin_epoch  # the group history this copy belongs to
        self.epoch = 0  # the highest epoch seen for this group
        self.role: rpb.GroupRole.ValueType = CATCHING_UP
        self.log = CommandLog(budget=log_budget)  # the budget is the node's, shared
        # Durability (see Journal): writes queued but not yet on disk, as
        # (ticket, seq) in ticket order, and replicas' acks waiting for them.
        self._unflushed: deque[tuple[int, int]] = deque()
        self._durable_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.dropped = False  # its durable rows were deleted (it left this node)
        self.closed = False  # it left this node
        # Read back from disk at start-up: the durable services hold their
        # state at the copy's position, the in-memory ones hold nothing, so this
        # copy can become a primary (the group was lost) but not a replica that
        # continues from a log as it is: it asks for a snapshot first, of the
        # in-memory services only when the primary's log still holds its
        # position (`install_in_memory`), of everything otherwise.
        self.restored = durable is not None
        # After `install_in_memory`: the in-memory services already hold every
        # command up to ``volatile_seq`` (copied at the primary's position while
        # the durable ones are behind), so replaying those commands touches the
        # durable services only. ``volatile_epoch`` is the epoch they came from.
        self.volatile_seq = 0
        self.volatile_epoch = 0
        if durable is not None:
            self.origin_epoch = durable.origin_epoch
            self.epoch = durable.epoch
            self.log.reset(durable.epoch, durable.seq)
        self._factories = factories
        self.machines: dict[int, StateMachine] = {k: f(self) for k, f in factories.items()}
        # Primary side.
        self.commit_seq = 0
        self.fenced = False  # a replica reported a newer epoch: stop until the map says more
        self.trackers: dict[str, ReplicaTracker] = {}
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        # Replica side.
        self.snapshotting = False
        self._install: Generator[None, None, None] | None = None  # a snapshot going in

    # -- position ------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY

    @property
    def writable(self) -> bool:
        return self.role == PRIMARY and not self.fenced

    def still_led(self, kind: int) -> StateMachine:
        """Service ``kind``'s machine, for a read resuming after an await: raises
        `stopped_leading` if this node no longer leads the group. The group may
        have left the node meanwhile, its machines with it, or stayed as a
        replica whose state another primary now decides."""
        if not self.writable:
            raise stopped_leading(self.group_id)
        return self.machines[kind]

    @property
    def applied(self) -> tuple[int, int]:
        """``(epoch, seq)`` of the last command in this copy's state."""
        return self.log.last_epoch, self.log.last_seq

    def position(self) -> rpb.GetPositionResponse:
        epoch, seq = self.applied
        response = rpb.GetPositionResponse(
            group_id=self.group_id, epoch=self.epoch, applied_epoch=epoch, applied_seq=seq,
            role=self.role, last_seq=seq)
        for tracker in self.trackers.values():
            response.replicas.append(tracker.progress())
        return response

    # -- primary -------------------------------------------------------------

    def propose(self, slot: int, service: int, payload: bytes,
                issued_ns: int | None = None) -> Proposal:
        """Issue the next command (primary only) and apply it here at once, as a
        replica will; its result is in the `Proposal`. (A durable machine's
        writes are queued before the commit point is computed.) Nothing may
        await between checking the state a command depends on and proposing it.
        ``issued_ns``: the instant the command carries, when its decision counted
        from one it read (a retry's delay from the failure it stamps); else now.
        """
        command = rpb.Command(
            seq=self.log.last_seq + 1, slot=slot, service=service,  # type: ignore[arg-type]
            payload=payload, epoch=self.epoch)
        issued = command.issued_at  # FromNanoseconds is Python, and this is hot
        issued.seconds, issued.nanos = divmod(
            self.clock.wall_ns() if issued_ns is None else issued_ns, 1_000_000_000)
        if tracing.enabled():
            command.traceparent = tracing.traceparent()
        result = None
        if service:
            applied = self.machines[service].apply(command)
            if applied.writes:
                self._persist(command.epoch, command.seq, applied.writes)
            result = applied.result
        self.log.append(command)
        if self.trackers:
            for tracker in self.trackers.values():
                tracker.wake()
        self.advance_commit()
        return Proposal(self, command.seq, result)

    async def barrier(self, slot: int) -> None:
        """Return once a no-op command issued now is committed (a linearizable
        read's first step): every in-sync replica took a command of this epoch
        after the call began, so this node still led the group then (a deposed
        primary's commands are refused), and a read made after it sees every write
        committed before the call. A command of no service changes no state.

        Raises `stopped_leading` if the group was handed over (or left this
        node, its state with it) between the commit and the caller's turn: the
        read would find another copy's state, or none."""
        await self.propose(slot, rpb.SERVICE_KIND_UNSPECIFIED, b"").committed()
        if not self.writable:
            raise stopped_leading(self.group_id)

    async def wait_committed(self, seq: int) -> None:
        """Return once command ``seq`` is held by every required replica."""
        future = self.committing(seq)
        if future is None:
            return
        if not tracing.enabled():
            await future
            return
        with tracing.span("mesh.replicate.commit", group=self.group_id, seq=seq):
            await future

    def committing(self, seq: int) -> asyncio.Future[None] | None:
        """A future done once command ``seq`` is held by every required replica
        (None: it is already), or failed with `not_committed` if this node stops
        leading first; raises `not_committed` if it already has. `wait_committed`
        without a coroutine: a batch awaits the commits of its requests at once."""
        if seq <= self.commit_seq:
            return None
        if not self.writable:
            raise not_committed(self.group_id, "this node stopped being its primary")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        return future

    def advance_commit(self) -> None:
        commit = self.durable_seq
        for tracker in self.trackers.values():
            if tracker.in_sync and tracker.acked_seq < commit:
                commit = tracker.acked_seq
        if commit <= self.commit_seq:
            return
        self.commit_seq = commit
        waiters = self._waiters
        while waiters and waiters[0][0] <= commit:
            _, future = waiters.popleft()
            if not future.done():
                future.set_result(None)

    def fail_waiters(self, why: str) -> None:
        waiters, self._waiters = self._waiters, deque()
        for _, future in waiters:
            if not future.done():
                future.set_exception(not_committed(self.group_id, why))

    def become_primary(self, epoch: int) -> None:
        """Take over at ``epoch``: continue the history from this copy's last command."""
        install, self._install = self._install, None
        if install is not None:
            # Promoted halfway through installing a snapshot (the map may still
            # count a replica in sync while it copies its primary's state): end the
            # install before leading, so that this copy never serves, or is
            # emptied of, half of it (see `installing`).
            try:
                install.close()
            except Exception:  # a restore failed: the install's own handler would log it
                log.exception("group %d: the snapshot being installed failed", self.group_id)
        changed = self.role != PRIMARY or epoch != self.epoch or self.fenced
        if changed:
            log.debug("group %d: primary at epoch %d from seq %d", self.group_id, epoch,
                     self.log.last_seq)
        self.role = PRIMARY
        self.epoch = max(self.epoch, epoch)
        self.fenced = False
        self.snapshotting = False
        if self.volatile_seq > self.log.last_seq:
            # The in-memory services are ahead of the history this copy continues
            # from: like a revived copy's, they start empty instead.
            self._empty_in_memory()
        self.volatile_seq = 0
        self.restored = False  # a revived copy: its in-memory services start empty
        if changed:
            self._role_changed()

    def step_down(self, epoch: int, why: str) -> None:
        """Stop being primary (a newer epoch exists); pending writes fail."""
        was_primary = self.role == PRIMARY
        if was_primary:
            log.debug("group %d: stepping down at epoch %d (%s)", self.group_id, epoch, why)
        self.role = REPLICA
        self.epoch = max(self.epoch, epoch)
        self.fail_waiters(why)
        for tracker in self.trackers.values():
            tracker.detach()
        self.trackers.clear()
        if was_primary:
            self._role_changed()

    def fence(self, seen_epoch: int) -> None:
        """A replica has seen a newer epoch: this primary was deposed."""
        if self.fenced:
            return
        log.warning("group %d: a replica reports epoch %d > ours %d; fenced",
                    self.group_id, seen_epoch, self.epoch)
        self.fenced = True
        self.fail_waiters("a newer primary took over")
        self._role_changed()

    def _role_changed(self) -> None:
        for machine in self.machines.values():
            machine.role_changed()

    # -- replica -------------------------------------------------------------

    def apply_batch(self, batch: rpb.CommandBatch) -> rpb.Ack:
        """Apply a batch from the primary if it continues this copy's history."""
        if batch.epoch < self.epoch:
            return self._ack(rpb.ACK_STATUS_STALE_EPOCH)
        if batch.epoch > self.epoch and self.role == PRIMARY:
            self.step_down(batch.epoch, f"{batch.primary_node_id} leads epoch {batch.epoch}")
        if self.role == PRIMARY:  # same epoch, two primaries: never acknowledge
            return self._ack(rpb.ACK_STATUS_STALE_EPOCH)
        self.epoch = batch.epoch
        if self.snapshotting:
            return self._ack(rpb.ACK_STATUS_SNAPSHOTTING)
        self.role = REPLICA if batch.in_sync else CATCHING_UP
        if self.volatile_seq > self.log.last_seq and batch.epoch != self.volatile_epoch:
            # The in-memory state came from a primary that no longer leads: it may
            # hold commands the new primary's history lacks. Copy it again.
            self._empty_in_memory()
            self.volatile_seq = 0
            self.restored = True
        if self.restored:
            return self._ack(rpb.ACK_STATUS_NEEDS_SNAPSHOT)
        if (batch.prev_epoch, batch.prev_seq) != self.applied:
            return self._ack(rpb.ACK_STATUS_POSITION_MISMATCH)
        machines = self.machines
        volatile_seq = self.volatile_seq
        for command in batch.commands:
            machine = machines.get(command.service)
            if machine is not None and (command.seq > volatile_seq or machine.durable):
                if command.traceparent and tracing.enabled():
                    with tracing.span("mesh.replicate.apply", command.traceparent,
                                      group=self.group_id, seq=command.seq):
                        applied = machine.apply(command)
                else:
                    applied = machine.apply(command)
                if applied.writes:
                    self._persist(command.epoch, command.seq, applied.writes)
            self.log.append(command)
        return self._ack(rpb.ACK_STATUS_OK)

    def _ack(self, status: int) -> rpb.Ack:
        epoch, seq = self.applied
        return rpb.Ack(group_id=self.group_id, epoch=self.epoch, applied_epoch=epoch,
                       applied_seq=seq, status=status, seen_epoch=self.epoch)  # type: ignore[arg-type]

    def ack_ok(self) -> rpb.Ack:
        return self._ack(rpb.ACK_STATUS_OK)

    # -- snapshots -----------------------------------------------------------

    def take_snapshot(self, services: Collection[int] = ()
                      ) -> tuple[int, int, Iterator[tuple[int, int, bytes]]]:
        """``(epoch, seq, (service, slot, data) chunks)``: this copy's state (of
        ``services`` only, if named), captured at once, its chunks made as they
        are iterated."""
        epoch, seq = self.applied
        captured = [(service, machine.snapshot()) for service, machine in self.machines.items()
                    if not services or service in services]
        chunks = ((service, slot, data) for service, pieces in captured
                  for slot, data in pieces)
        return epoch, seq, chunks

    def in_memory_services(self) -> list[int]:
        """The services whose state is not on this node's disk."""
        return [service for service, machine in self.machines.items() if not machine.durable]

    def install(self, epoch: int, seq: int, chunks: Iterable[tuple[int, int, bytes]]) -> None:
        """Replace this copy's state by a snapshot taken at ``(epoch, seq)``."""
        for _ in self.installing(epoch, seq, chunks):
            pass

    def installing(self, epoch: int, seq: int, chunks: Iterable[tuple[int, int, bytes]]
                   ) -> Generator[None, None, None]:
        """`install`, a piece at a time: it yields after each chunk given to a
        machine whose restore is additive (the cache: a million keys take seconds
        to load), so the caller can let the event loop run in between.

        The copy must refuse batches meanwhile (``snapshotting``). Closed before
        the end (the group moved on, the stream broke, `become_primary`), it
        restores the rest at once: it is never left half installed, nor empty.
        """
        self._install = steps = self._installing(epoch, seq, chunks)
        return steps

    def _installing(self, epoch: int, seq: int, chunks: Iterable[tuple[int, int, bytes]]
                    ) -> Generator[None, None, None]:
        by_service: dict[int, list[tuple[int, bytes]]] = {k: [] for k in self._factories}
        for service, slot, data in chunks:
            by_service.setdefault(service, []).append((slot, data))
        self.close_machines()
        # The position first: durable machines record their restored state as
        # written at it.
        self.log.reset(epoch, seq)
        self.restored = False
        self.volatile_seq = 0
        self.machines = {k: f(self) for k, f in self._factories.items()}
        restoring = (step for service, machine in self.machines.items()
                     for step in self._restore(machine, by_service.get(service, []),
                                               epoch, seq))
        done = False
        try:
            for _ in restoring:
                yield
            done = True
        except GeneratorExit:
            # Closed halfway: finish now, without yielding. This copy's earlier
            # state is gone already and every chunk is here; the snapshot holds
            # every write its primary acknowledged (this replica was one it waited
            # for), and GetPosition has reported its position meanwhile. Emptied,
            # a copy the map still counts in sync could be promoted, and lead the
            # group with nothing. (The rest then holds the event loop while it
            # loads: seconds for a million keys, only when an install is cut off.)
            if not self.closed:
                for _ in restoring:
                    pass
                done = True
            raise
        finally:
            self._install = None
            if not done and not self.closed:
                self._forget()  # a restore failed: empty, it asks for a snapshot again
        log.info("group %d: installed a snapshot at (%d, %d)", self.group_id, epoch, seq)

    def _restore(self, machine: StateMachine, pieces: list[tuple[int, bytes]], epoch: int,
                 seq: int) -> Iterator[None]:
        """Restore ``machine`` from ``pieces``; yield after each if it restores additively."""
        if machine.additive_restore:
            for piece in pieces:
                machine.restore([piece])
                yield
            return
        writes = machine.restore(pieces)
        if writes:
            self._persist(epoch, seq, writes)

    def _forget(self) -> None:
        """Back to an empty copy at ``(0, 0)`` (a snapshot was left half installed)."""
        self.close_machines()
        self.log.reset(0, 0)
        self.machines = {k: f(self) for k, f in self._factories.items()}

    def install_in_memory(self, epoch: int, seq: int,
                          chunks: Iterable[tuple[int, int, bytes]]) -> bool:
        """Catch a copy read back from disk up without copying its durable state:
        the in-memory services take a snapshot taken at ``(epoch, seq)``, the
        durable ones stay where the disk left them and replay the commands after
        that from the primary's log. False (nothing changed) unless this copy is
        still a restored one behind ``seq``."""
        if not self.takes_in_memory(seq):
            return False
        for _ in self.installing_in_memory(epoch, seq, chunks):
            pass
        return True

    def takes_in_memory(self, seq: int) -> bool:
        """Whether `install_in_memory` of a snapshot at ``seq`` would change anything."""
        return self.restored and seq >= self.log.last_seq

    def installing_in_memory(self, epoch: int, seq: int,
                             chunks: Iterable[tuple[int, int, bytes]]
                             ) -> Generator[None, None, None]:
        """`install_in_memory` (once `takes_in_memory`), a piece at a time as
        `installing`. Closed before the end, the copy still asks for a snapshot
        (and if made primary, its in-memory services start empty)."""
        self._install = steps = self._installing_in_memory(epoch, seq, chunks)
        return steps

    def _installing_in_memory(self, epoch: int, seq: int,
                              chunks: Iterable[tuple[int, int, bytes]]
                              ) -> Generator[None, None, None]:
        by_service: dict[int, list[tuple[int, bytes]]] = {}
        for service, slot, data in chunks:
            by_service.setdefault(service, []).append((slot, data))
        self._empty_in_memory()
        done = False
        try:
            for service, machine in list(self.machines.items()):
                if not machine.durable:
                    yield from self._restore(machine, by_service.get(service, []), epoch, seq)
            done = True
        finally:
            self._install = None
            if not done and not self.closed:
                self._empty_in_memory()  # still `restored`: it asks again
        self.volatile_seq, self.volatile_epoch = seq, self.epoch
        self.restored = False
        log.info("group %d: caught up from disk at seq %d; in-memory services copied "
                 "at (%d, %d)", self.group_id, self.log.last_seq, epoch, seq)

    def _empty_in_memory(self) -> None:
        """Replace the in-memory services' machines by empty ones."""
        for service, machine in list(self.machines.items()):
            if not machine.durable:
                machine.close()
                self.machines[service] = self._factories[service](self)

    def close_machines(self) -> None:
        for machine in self.machines.values():
            machine.close()
        self.machines = {}

    def close(self, why: str) -> None:
        """The group leaves this node."""
        self.step_down(self.epoch, why)
        self.close_machines()
        self._release_durable_waiters(all_of_them=True)
        self.log.release()
        self.closed = True

    # -- durability ------------------------------------------------------------

    @property
    def durable_seq(self) -> int:
        """Every command up to this seq is durable here: on disk for durable
        services, applied in memory for the others."""
        last = self.log.last_seq
        if not self._unflushed:
            return last
        return min(last, min(seq for _, seq in self._unflushed) - 1)

    def _persist(self, epoch: int, seq: int, writes: Sequence[Persist]) -> None:
        """Queue a durable machine's writes for command ``(epoch, seq)``."""
        if self._journal is None:
            raise RuntimeError(f"group {self.group_id}: a durable service needs a journal")
        ticket = self._journal.write(self.group_id, self.origin_epoch, epoch, seq, writes)
        if ticket > self._journal.flushed_ticket:
            self._unflushed.append((ticket, seq))

    @property
    def flushing(self) -> bool:
        """Whether writes of this group wait for the journal."""
        return bool(self._unflushed)

    def mark_flushed(self, ticket: int) -> None:
        """Every write of this group up to ``ticket`` is on disk."""
        unflushed = self._unflushed
        while unflushed and unflushed[0][0] <= ticket:
            unflushed.popleft()
        self._release_durable_waiters()
        if self.role == PRIMARY:
            self.advance_commit()

    async def wait_durable(self, seq: int) -> None:
        """Return once commands up to ``seq`` are durable here (or the group left)."""
        future = self.durable(seq)
        if future is not None:
            await future

    def durable(self, seq: int) -> asyncio.Future[None] | None:
        """A future done once commands up to ``seq`` are durable here (or the group
        left); None if they are already. `wait_durable` without a coroutine."""
        if self.durable_seq >= seq or self.dropped:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waiters.append((seq, future))
        return future

    def _release_durable_waiters(self, all_of_them: bool = False) -> None:
        if not self._durable_waiters:
            return
        durable = self.durable_seq
        waiting = []
        for seq, future in self._durable_waiters:
            if all_of_them or seq <= durable:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((seq, future))
        self._durable_waiters = waiting


async def barriers(fences: Iterable[tuple[Group, int]]) -> None:
    """`Group.barrier` in each ``(group, slot)`` at once, for a read that spans
    groups: their no-ops travel to each replica in one message. The first
    failure is raised once every no-op issued has its outcome taken."""
    fences = list(fences)
    waits: list[asyncio.Future[None]] = []
    try:
        for group, slot in fences:
            future = group.committing(
                group.propose(slot, rpb.SERVICE_KIND_UNSPECIFIED, b"").seq)
            if future is not None:  # None: committed already (no replica to wait for)
                waits.append(future)
    except BaseException:
        # A group this node no longer leads: the no-ops already issued are
        # committed or fail unobserved, their outcomes taken here.
        asyncio.gather(*waits, return_exceptions=True)
        raise
    await together(waits)
    for group, _ in fences:
        if not group.writable:
            raise stopped_leading(group.group_id)
