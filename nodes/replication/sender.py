"""The primary's side of replication: one stream per node, one tracker per group.

A `PeerLink` holds one Replicate stream to one node and carries the batches of
every group this node leads and that node replicates (and heartbeats when idle:
every other node of the map has one, `Replication._link_every_node`). Each group's
`ReplicaTracker` keeps one batch in flight at a time: everything appended while
it waits goes out in the next batch, and a refusal never has later batches
racing it. The link itself keeps at most `WINDOW` messages unacknowledged:
while one is out, the writes of every group towards that replica gather, and
the next message carries them all (one batch per group, up to `MESSAGE_BYTES`
of commands) and comes back as one acknowledgement. Without that limit each
concurrent write, arriving in a call of its own, went out in a message of its
own as soon as it was proposed (1.4 commands per message at 64 Sets in flight
on 3 nodes; 2.2 with it). Waiting only delays a send: a write is still
answered once its replicas acknowledged it.

A tracker starts by probing (an empty batch at the primary's position). The
replica's answer says where it is: in the log's history -> stream from there;
anywhere else (new, too far behind, diverged) -> install a snapshot first. A
replica restarted from its disk whose position the log still holds copies only
the in-memory services (``keep_durable``) and streams the rest from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from typing import TYPE_CHECKING

import grpc

from common.clock import to_seconds
from common.peer import PeerSigner
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.replication.v1 import replication_pb2_grpc as rpb_grpc

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["PeerLink", "ReplicaTracker", "SendCounts"]

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Commands per batch: big enough to catch up fast."""
MESSAGE_BYTES = 4 << 20
"""Command bytes a message gathers before it leaves: past them a batch takes no
more commands and a message no more batches (each takes one at least); the rest
go in the next message. Without a bound, writes of big values that gathered
while a message was out (or a replica paused) made a message larger than the
replica accepts, and the stream broke on the same message again and again."""
WINDOW = 1
"""Messages a link keeps unacknowledged: what is proposed meanwhile waits for the
next one, so concurrent writes to one replica share its messages and acks."""
IDLE = 1.0
"""Seconds a link may sit idle before it sends a heartbeat and re-probes the
groups whose snapshot install it never heard the end of."""


def message_limit(max_request_bytes: int) -> int:
    """The largest message a link sends when no client request is larger than
    ``max_request_bytes``: the peer plane's limit. A command holds what one
    request carries, with its records (which are smaller than that again), and
    a message stops gathering past `MESSAGE_BYTES`."""
    return MESSAGE_BYTES + 2 * max_request_bytes


class SendCounts:
    """What this node's replication streams carried, over every link (counters for
    /metrics): messages written, the group batches and commands they held, and the
    acknowledgement messages and acks that came back."""

    __slots__ = ("acks", "batches", "commands", "messages", "responses")

    def __init__(self) -> None:
        self.messages = 0
        self.batches = 0
        self.commands = 0
        self.responses = 0
        self.acks = 0


class Phase(enum.Enum):
    PROBE = "probe"  # send an empty batch to learn the replica's position
    STREAM = "stream"  # send commands from next_seq on
    SNAPSHOT = "snapshot"  # tell the replica to install a snapshot
    INSTALLING = "installing"  # wait for the replica's Ack after its install


class ReplicaTracker:
    """The primary's view of one replica of one group."""

    def __init__(self, group: Group, node_id: str, link: PeerLink, in_sync: bool,
                 since_epoch: int = 0) -> None:
        self.group = group
        self.node_id = node_id
        self.link = link
        self.in_sync = in_sync
        self.since_epoch = since_epoch  # the map's assignment this tracker is for
        self.acked_seq = 0
        self.next_seq = 0
        self.phase = Phase.PROBE
        self.inflight = False
        self.sent_in = 0  # the link's message its batch in flight went in (0: none)
        self.sent_bytes = 0  # the command bytes of the last batch made
        self.keep_durable = False  # the snapshot to ask for spares the durable services
        link.attach(self)

    def wake(self) -> None:
        self.link.wake(self)

    def detach(self) -> None:
        self.link.detach(self)

    def reset(self) -> None:
        """The stream broke: start over with a probe on the next one."""
        self.phase = Phase.PROBE
        self.inflight = False
        self.sent_in = 0

    def progress(self) -> rpb.ReplicaProgress:
        last = self.group.log.last_seq
        lag = max(last - self.acked_seq, 0)
        lag_seconds = 0.0
        if lag:
            glog = self.group.log
            issued = glog.issued_at(max(self.acked_seq, glog.base_seq) + 1)
            if issued is not None:
                lag_seconds = max(to_seconds(self.group.clock.wall_ns() - issued), 0.0)
        return rpb.ReplicaProgress(node_id=self.node_id, acked_seq=self.acked_seq,
                                   in_sync=self.in_sync, lag_commands=lag,
                                   lag_seconds=lag_seconds, since_epoch=self.since_epoch)

    def ready(self) -> bool:
        """Whether there is a batch to send now (at most one is in flight)."""
        return not (self.inflight or self.phase is Phase.INSTALLING
                    or (self.phase is Phase.STREAM and self.next_seq > self.group.log.last_seq))

    def next_batch(self, address: str, room: int = MESSAGE_BYTES) -> rpb.CommandBatch | None:
        """The batch to send now, if any (at most one in flight), with commands
        until they pass ``room`` bytes (one at least): ``sent_bytes``."""
        if not self.ready():
            return None
        group = self.group
        glog = group.log
        batch = rpb.CommandBatch(group_id=group.group_id, epoch=group.epoch,
                                 primary_node_id=group.node_id, primary_address=address,
                                 in_sync=self.in_sync)
        self.sent_bytes = 0
        if self.phase is Phase.PROBE:
            batch.prev_epoch, batch.prev_seq = glog.last_epoch, glog.last_seq
        elif self.phase is Phase.SNAPSHOT:
            batch.install_snapshot = True
            batch.keep_durable = self.keep_durable
            self.phase = Phase.INSTALLING
        else:  # STREAM, with something to send
            prev_epoch = glog.epoch_at(self.next_seq - 1)
            if prev_epoch is None:  # the log no longer reaches back that far
                self.phase = Phase.SNAPSHOT
                return self.next_batch(address, room)
            batch.prev_epoch, batch.prev_seq = prev_epoch, self.next_seq - 1
            commands, size = batch.commands, 0
            for data in glog.serialized_since(self.next_seq - 1, MAX_BATCH):
                commands.add().MergeFromString(data)  # parsed straight into the batch
                size += len(data)
                if size >= room:
                    break
            self.sent_bytes = size
        batch.commit_seq = group.commit_seq
        self.inflight = True
        return batch

    def on_ack(self, ack: rpb.Ack) -> None:
        self.inflight = False
        group = self.group
        status = ack.status
        if status == rpb.ACK_STATUS_STALE_EPOCH:
            group.fence(ack.seen_epoch)
            return
        if status == rpb.ACK_STATUS_SNAPSHOTTING:
            self.phase = Phase.INSTALLING
            self.inflight = True  # the replica's Ack after its install releases us
            return
        if status == rpb.ACK_STATUS_NEEDS_SNAPSHOT:
            # Its durable services hold our history up to its position if our log
            # still does: then only the in-memory ones need copying.
            self.keep_durable = ack.applied_seq > 0 and group.log.follows(
                ack.applied_epoch, ack.applied_seq)
            log.info("group %d: replica %s restarted from disk at seq %d; %s",
                     group.group_id, self.node_id, ack.applied_seq,
                     "in-memory snapshot, then the log" if self.keep_durable
                     else "full snapshot")
            self.phase = Phase.SNAPSHOT
            self.acked_seq = 0
            return
        if status == rpb.ACK_STATUS_OK or status == rpb.ACK_STATUS_POSITION_MISMATCH:
            position = (ack.applied_epoch, ack.applied_seq)
            if group.log.follows(*position):
                self.phase = Phase.STREAM
                self.next_seq = ack.applied_seq + 1
                self.acked_seq = ack.applied_seq
            else:
                log.info("group %d: replica %s at %s is not in our history; snapshot",
                         group.group_id, self.node_id, position)
                self.phase = Phase.SNAPSHOT
                self.keep_durable = False
                self.acked_seq = 0
        if self.phase is Phase.STREAM and not self.in_sync \
                and self.acked_seq >= group.log.last_seq:
            self.in_sync = True
            log.info("group %d: replica %s is in sync at seq %d", group.group_id,
                     self.node_id, self.acked_seq)
        group.advance_commit()


class PeerLink:
    """One Replicate stream to one node, shared by every group it replicates for us.

    Every other node of the map has one, carrying groups or not: idle, it
    heartbeats, so a node that stops answering this one is noticed (`nodes.stalls`)
    whether or not it holds a copy of a group this node leads."""

    def __init__(self, node_id: str, address: str, channel: grpc.aio.Channel,
                 local_address: str, signer: PeerSigner,
                 counts: SendCounts | None = None) -> None:
        self.node_id = node_id
        self.counts = counts if counts is not None else SendCounts()
        self._signer = signer
        self.address = address
        self._stub = rpb_grpc.ReplicationServiceStub(channel)
        self._local_address = local_address
        self._trackers: dict[int, ReplicaTracker] = {}
        # Trackers that may have something to send: a write wakes only its
        # group's tracker, not every group this link carries. In the order they
        # are to go (a dict as an ordered set): those a full message left out
        # come first in the next, so a busy group cannot starve the others.
        self._pending: dict[ReplicaTracker, None] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Messages sent on this stream and not yet acknowledged: message number ->
        # batches whose ack has not come back (`WINDOW`).
        self._unacked: dict[int, int] = {}
        self._sent = 0
        self._waiting_since: float | None = None  # loop time the send loop began to wait
        self._idle: asyncio.TimerHandle | None = None
        # Loop time since which the replica owes us an answer: a message it has
        # not acknowledged, or (``_broken``) a stream that broke or would not open
        # since its last answer. See `unanswered_for`.
        self._owed_since: float | None = None
        self._broken = False
        self._heartbeat_due = False
        self._heartbeating = False  # a heartbeat is out and nothing has answered since
        self.answered_at = 0.0
        """Loop time of the replica's last answer on this link (0: none yet)."""

    def start(self) -> None:
        """Open the stream (it reopens by itself until `close`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"replicate-to-{self.node_id}")

    def attach(self, tracker: ReplicaTracker) -> None:
        self._trackers[tracker.group.group_id] = tracker
        self.start()
        self.wake(tracker)

    def detach(self, tracker: ReplicaTracker) -> None:
        if self._trackers.get(tracker.group.group_id) is tracker:
            del self._trackers[tracker.group.group_id]
        self._pending.pop(tracker, None)
        self._acked(tracker)  # its ack may never be read now
        self._wakeup.set()

    def _acked(self, tracker: ReplicaTracker) -> None:
        """``tracker``'s batch in flight is acknowledged (or will never be)."""
        message = tracker.sent_in
        if not message:
            return
        tracker.sent_in = 0
        left = self._unacked.get(message, 0) - 1
        if left > 0:
            self._unacked[message] = left
        else:
            self._unacked.pop(message, None)

    def __len__(self) -> int:
        return len(self._trackers)

    def unanswered_for(self, now: float) -> float:
        """Seconds the replica has owed this link an answer at loop time ``now`` (0:
        it owes none). Long means it stopped acknowledging: cut off, stopped, or
        its disk hung, while the groups it holds in sync wait for it."""
        since = self._owed_since
        if since is None or not (self._unacked or self._broken or self._heartbeating):
            return 0.0  # (what was owed went with trackers that left)
        return max(now - since, 0.0)

    def wake(self, tracker: ReplicaTracker) -> None:
        self._pending[tracker] = None
        self._wakeup.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.05
        while True:
            # The replica checks the credential once, when the stream opens.
            call = self._stub.Replicate(metadata=self._signer.metadata())
            reader = asyncio.create_task(self._read(call))
            try:
                await self._send(call, reader)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("replication stream to %s broke: %s", self.node_id, exc)
            finally:
                call.cancel()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
                for tracker in self._trackers.values():
                    tracker.reset()
                self._unacked.clear()
                self._broken = True
                if self._owed_since is None:
                    self._owed_since = asyncio.get_running_loop().time()
                self._pending.update(dict.fromkeys(self._trackers.values()))
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    async def _send(self, call: grpc.aio.StreamStreamCall, reader: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        reader.add_done_callback(lambda _: self._wakeup.set())
        # One timer for the stream's life, not a timeout around every wait (that
        # cost a few percent of a busy node's CPU): see `_idle_check`.
        self._idle = loop.call_later(IDLE, self._idle_check)
        try:
            while not reader.done():
                self._wakeup.clear()
                if self._pending and len(self._unacked) < WINDOW:
                    pending, self._pending = self._pending, {}
                    self._sent += 1
                    message = self._sent
                    batches = []
                    room = MESSAGE_BYTES
                    for tracker in pending:
                        if room <= 0:  # full: the rest go first in the next message
                            self._pending[tracker] = None
                            continue
                        batch = tracker.next_batch(self._local_address, room)
                        if batch is not None:
                            batches.append(batch)
                            tracker.sent_in = message
                            room -= tracker.sent_bytes
                    if batches:
                        if self._owed_since is None:
                            self._owed_since = loop.time()
                        self._unacked[message] = len(batches)
                        counts = self.counts
                        counts.messages += 1
                        counts.batches += len(batches)
                        counts.commands += sum(len(batch.commands) for batch in batches)
                        await call.write(rpb.ReplicateRequest(batches=batches))
                        continue  # more may have been appended while we wrote
                if self._heartbeat_due:
                    self._heartbeat_due = False
                    if not self._unacked:
                        await self._heartbeat(call, loop)
                self._waiting_since = loop.time()
                await self._wakeup.wait()
                self._waiting_since = None
        finally:
            self._waiting_since = None
            self._idle.cancel()
        reader.result()  # raise the reader's error, if any

    async def _heartbeat(self, call: grpc.aio.StreamStreamCall,
                         loop: asyncio.AbstractEventLoop) -> None:
        """An empty message, which the replica answers like any other: on a link
        with nothing to send, a node that stopped answering is then noticed as
        on a busy one (`unanswered_for`). Without it, a primary cut off from its
        peers was reported only by the peers that happened to write to a group
        it replicates, and its own groups failed over later (twice as late in
        ``tests/test_partitions.py``'s cut-off scenario)."""
        self._heartbeating = True
        if self._owed_since is None:
            self._owed_since = loop.time()
        await call.write(rpb.ReplicateRequest())

    def _idle_check(self) -> None:
        """Every ``IDLE`` seconds while a stream is open: if the link has waited
        that long for something to send, send a heartbeat (when nothing is owed
        already) and re-probe the trackers stuck in flight (a lost stream would
        have ended; this only unsticks an install whose Ack never came)."""
        loop = asyncio.get_running_loop()
        since = self._waiting_since
        quiet = 0.0 if since is None else loop.time() - since
        if quiet >= IDLE:
            self._heartbeat_due = True
            for tracker in self._trackers.values():
                if tracker.phase is Phase.INSTALLING:
                    self._acked(tracker)
                    tracker.reset()
                    self._pending[tracker] = None
            self._wakeup.set()
            quiet = 0.0
        self._idle = loop.call_later(IDLE - quiet, self._idle_check)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        counts = self.counts
        loop = asyncio.get_running_loop()
        async for response in call:
            self.answered_at = now = loop.time()
            counts.responses += 1
            counts.acks += len(response.acks)
            for ack in response.acks:
                tracker = self._trackers.get(ack.group_id)
                if tracker is not None:
                    self._acked(tracker)
                    tracker.on_ack(ack)
                    # Only with something to send: a lone write's ack woke the
                    # send loop for nothing. (What makes a tracker ready later,
                    # a proposal, a broken stream, the idle check, wakes it then.)
                    if tracker.ready():
                        self._pending[tracker] = None
            if self._pending:  # these, or others that waited for the window
                self._wakeup.set()
            # Still owed: the messages sent since the one just answered.
            self._owed_since = now if self._unacked else None
            self._broken = self._heartbeating = False
        raise ConnectionError("the replica ended the stream")
