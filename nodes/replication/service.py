"""ReplicationService: the replica's side of Replicate, and Snapshot and GetPosition.

Served on the peer port only, behind the peer guard (`nodes.planes`). Beyond
the credential, the map decides (`permission`): a replica applies batches only
from the group's primary at the map's epoch, and a primary copies its state
only to the group's members. A refusal is PERMISSION_DENIED, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import grpc

from common.errors import MeshStatusError, Reason
from common.peer import PeerKey, PeerSigner
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.replication.v1 import replication_pb2_grpc as rpb_grpc
from nodes.planes import calling_peer, drain
from nodes.replication.permission import Verdict, may_copy, replicate_verdict

if TYPE_CHECKING:
    from nodes.replication.group import Group
    from nodes.replication.manager import Replication

__all__ = ["ReplicationService"]

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 60.0
MAP_WAIT = 3.0
"""Seconds a batch from an epoch (or group) this node's map has not shown yet
waits for the map to catch up before it is refused."""

Acks = tuple["list[rpb.Ack]", "list[asyncio.Future[None]]"]
"""Acknowledgements, and what they wait for first: the journal's flushes."""

AckQueue = asyncio.Queue["Acks | None"]
"""A Replicate stream's acknowledgements, in order (None: the stream ended)."""


async def _acks_of(item: Acks | None) -> list[rpb.Ack] | None:
    if item is None:
        return None
    acks, flushes = item
    for flush in flushes:
        await flush
    return acks


def _not_permitted(why: str) -> MeshStatusError:
    return MeshStatusError(grpc.StatusCode.PERMISSION_DENIED, why, Reason.PEER_NOT_PERMITTED)


class ReplicationService(rpb_grpc.ReplicationServiceServicer):
    def __init__(self, replication: Replication, key: PeerKey | None = None,
                 refused: Callable[[str], None] = lambda _reason: None) -> None:
        self._replication = replication
        self._key = key
        self._refused = refused
        self._streams: set[AckQueue] = set()
        self._logged_at = 0.0

    def _refuse(self, reason: str, error: MeshStatusError) -> MeshStatusError:
        """Count and log (at most every 10 s) a refusal; returns ``error``."""
        self._refused(reason)
        now = time.monotonic()
        if now - self._logged_at >= 10.0:
            self._logged_at = now
            log.warning("refused: %s", error.message)
        return error

    def close(self) -> None:
        """End every incoming Replicate stream (the node is stopping): a stream
        never ends on its own, and the server's grace period would wait for it."""
        for acks in self._streams:
            acks.put_nowait(None)

    async def Replicate(
        self, request_iterator: AsyncIterator[rpb.ReplicateRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[rpb.ReplicateResponse]:
        peer = calling_peer(context, self._key)
        if peer is not None and not peer.is_node:
            error = self._refuse("not_a_node", _not_permitted(
                f"{peer} may not replicate: only nodes send commands"))
            await drain(request_iterator)
            await context.abort_with_status(error.to_status())
        acks: AckQueue = asyncio.Queue()
        installs: set[asyncio.Task[None]] = set()
        denied: list[MeshStatusError] = []

        async def read() -> None:
            try:
                async for request in request_iterator:
                    answers = []
                    for batch in request.batches:
                        # Open plane (no cluster secret): the batch's own claim.
                        sender = peer.id if peer is not None else batch.primary_node_id
                        verdict = replicate_verdict(self._replication.table, batch, sender)
                        if verdict is Verdict.WAIT:
                            verdict = await self._wait_for_map(batch, sender)
                        if verdict is Verdict.DENY:
                            denied.append(self._refuse("not_primary", _not_permitted(
                                f"node {sender} does not lead group {batch.group_id} at "
                                f"epoch {batch.epoch} in this node's cluster map")))
                            await drain(request_iterator)  # then end the call
                            return
                        answers.append(self._stale(batch) if verdict is Verdict.STALE
                                       else self._apply(batch, acks, installs))
                    acks.put_nowait(self._when_durable(answers))
            finally:
                acks.put_nowait(None)

        reader = asyncio.create_task(read())
        self._streams.add(acks)
        try:
            while (ready := await _acks_of(await acks.get())) is not None:
                # Whatever else is ready goes in the same response.
                ended = False
                while not acks.empty():
                    more = await _acks_of(acks.get_nowait())
                    if more is None:
                        ended = True
                        break
                    ready.extend(more)
                yield rpb.ReplicateResponse(acks=ready)
                if ended:
                    break
            if denied:
                await context.abort_with_status(denied[0].to_status())
        finally:
            self._streams.discard(acks)
            reader.cancel()
            for task in list(installs):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _wait_for_map(self, batch: rpb.CommandBatch, sender: str) -> Verdict:
        """The map's verdict on a batch from an epoch this node's map has not
        shown yet, after waiting (a little) for it: the primary may simply have
        read the newer map first."""
        replication = self._replication
        verdict = Verdict.WAIT
        deadline = time.monotonic() + MAP_WAIT
        while verdict is Verdict.WAIT and (left := deadline - time.monotonic()) > 0:
            await replication.newer_map(left)
            verdict = replicate_verdict(replication.table, batch, sender)
        return Verdict.DENY if verdict is Verdict.WAIT else verdict

    def _stale(self, batch: rpb.CommandBatch) -> rpb.Ack:
        """STALE_EPOCH for a batch from an epoch the map has moved past: it tells a
        deposed primary to stop, and changes nothing here."""
        table = self._replication.table
        view = table.groups.get(batch.group_id) if table is not None else None
        group = self._replication.groups.get(batch.group_id)
        seen = max(view.epoch if view is not None else 0,
                   group.epoch if group is not None else 0)
        return rpb.Ack(group_id=batch.group_id, epoch=seen, status=rpb.ACK_STATUS_STALE_EPOCH,
                       seen_epoch=seen)

    def _when_durable(self, acks: list[rpb.Ack]) -> Acks:
        """``acks``, with what must be durable here before they go: nothing for
        in-memory services, the journal's next flush for durable ones. (Later
        batches keep being applied meanwhile, and share that flush.) Futures,
        not a task: a task per message cost the replica more than its wait."""
        groups = self._replication.groups
        flushes = [future for ack in acks
                   if ack.status == rpb.ACK_STATUS_OK
                   and (group := groups.get(ack.group_id)) is not None
                   and (future := group.durable(ack.applied_seq)) is not None]
        return acks, flushes

    def _apply(self, batch: rpb.CommandBatch, acks: AckQueue,
               installs: set[asyncio.Task[None]]) -> rpb.Ack:
        """Apply one batch; an install request starts the install and is answered
        SNAPSHOTTING now (and again once the install is done)."""
        group = self._replication.group_for_batch(batch)
        if batch.install_snapshot and not group.snapshotting \
                and batch.epoch >= group.epoch and not group.is_primary:
            group.epoch = batch.epoch
            group.snapshotting = True
            task = asyncio.create_task(self._install(group, batch, acks))
            installs.add(task)
            task.add_done_callback(installs.discard)
            return group.apply_batch(rpb.CommandBatch(group_id=batch.group_id,
                                                      epoch=batch.epoch))
        return group.apply_batch(batch)

    async def _install(self, group: Group, batch: rpb.CommandBatch,
                       acks: AckQueue) -> None:
        # From the primary's peer port as the map has it, never an address a
        # request names.
        table = self._replication.table
        address = table.peer_addresses.get(batch.primary_node_id, "") if table else ""
        # A copy restarted from disk keeps its durable services' state when the
        # primary's log can bring them up to date: only the rest is copied.
        in_memory = group.in_memory_services() if batch.keep_durable and group.restored \
            else None
        try:
            if in_memory == []:  # only durable services here: nothing to copy
                epoch, seq = group.applied
                chunks: list[tuple[int, int, bytes]] = []
            else:
                epoch, seq, chunks = await fetch_snapshot(
                    self._replication.channel(address), group.group_id, batch.epoch,
                    self._replication.signer, services=in_memory or ())
            def moved_on() -> bool:
                return group.epoch > batch.epoch or group.is_primary or group.closed

            if moved_on():
                return  # the world moved on while we copied
            size = sum(len(data) for _, _, data in chunks)
            if in_memory is None:
                kind, steps = "full", group.installing(epoch, seq, chunks)
            elif group.takes_in_memory(seq):
                kind, steps = "in_memory", group.installing_in_memory(epoch, seq, chunks)
            else:
                kind, steps = "", None  # nothing to change: the ack says where it is
            if steps is not None:
                # A piece at a time, the loop free in between: the node's other
                # groups, its etcd lease and its callers go on meanwhile.
                with contextlib.closing(steps):
                    for _ in steps:
                        await asyncio.sleep(0)
                        if moved_on():
                            return  # closed halfway: `Group.installing` says what is left
                self._replication.count_snapshot(kind, size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("group %d: snapshot from %s failed: %s", group.group_id,
                        address, exc)
            await asyncio.sleep(0.2)
        finally:
            group.snapshotting = False
        acks.put_nowait(self._when_durable([group.ack_ok()]))

    async def Snapshot(
        self, request: rpb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.SnapshotResponse]:
        peer = calling_peer(context, self._key)
        if peer is not None and not (peer.is_node and may_copy(
                self._replication.table, request.group_id, peer.id)):
            error = self._refuse("not_member", _not_permitted(
                f"{peer} is not a member of group {request.group_id}"))
            await context.abort_with_status(error.to_status())
        group = self._replication.groups.get(request.group_id)
        if group is None or not group.is_primary or group.epoch != request.epoch:
            reason = Reason.STALE_EPOCH if group is not None and group.epoch < request.epoch \
                else Reason.NOT_A_MEMBER
            await context.abort_with_status(MeshStatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"not the primary of group {request.group_id} at epoch {request.epoch}",
                reason).to_status())
            return
        # Captured in one step (consistent), then serialized a chunk at a time with
        # the loop free in between: other calls go on while a big group streams.
        began = time.perf_counter()
        epoch, seq, chunks = group.take_snapshot(request.services)
        captured = time.perf_counter() - began
        crc = 0
        total = 0
        count = 0
        longest = 0.0  # the longest step the loop spent making one chunk
        while True:
            step = time.perf_counter()
            piece = next(chunks, None)
            longest = max(longest, time.perf_counter() - step)
            if piece is None:
                break
            service, slot, data = piece
            crc = zlib.crc32(data, crc)
            total += len(data)
            count += 1
            yield rpb.SnapshotResponse(chunk=rpb.SnapshotChunk(
                service=service, slot=slot, data=data))  # type: ignore[arg-type]
            await asyncio.sleep(0)
        yield rpb.SnapshotResponse(end=rpb.SnapshotEnd(
            last_epoch=epoch, last_seq=seq, chunks=count, bytes=total, crc32=crc))
        log.info("group %d: snapshot at seq %d sent to %s: %d chunks, %d bytes in %.1f s "
                 "(captured in %.0f ms, longest chunk %.0f ms)", group.group_id, seq,
                 peer.id if peer is not None else "a peer", count, total,
                 time.perf_counter() - began, captured * 1e3, longest * 1e3)

    async def GetPosition(
        self, request: rpb.GetPositionRequest, context: grpc.aio.ServicerContext
    ) -> rpb.GetPositionResponse:
        group = self._replication.groups.get(request.group_id)
        if group is None:
            await context.abort_with_status(MeshStatusError(
                grpc.StatusCode.NOT_FOUND, f"no state of group {request.group_id} here",
                Reason.GROUP_NOT_FOUND).to_status())
            raise AssertionError("unreachable")
        return group.position()


async def fetch_snapshot(
    channel: grpc.aio.Channel, group_id: int, epoch: int, signer: PeerSigner,
    services: Sequence[int] = (),
) -> tuple[int, int, list[tuple[int, int, bytes]]]:
    """Copy a group's state (of ``services`` only, if named) from its primary:
    ``(epoch, seq, [(service, slot, data)])``."""
    stub = rpb_grpc.ReplicationServiceStub(channel)
    chunks: list[tuple[int, int, bytes]] = []
    crc = 0
    request = rpb.SnapshotRequest(group_id=group_id, epoch=epoch,
                                  services=services)  # type: ignore[arg-type]
    call = stub.Snapshot(request, timeout=SNAPSHOT_TIMEOUT, metadata=signer.metadata())
    async for response in call:
        if response.HasField("chunk"):
            chunk = response.chunk
            crc = zlib.crc32(chunk.data, crc)
            chunks.append((chunk.service, chunk.slot, chunk.data))
        else:
            end = response.end
            if end.chunks != len(chunks) or end.crc32 != crc:
                raise ValueError(f"snapshot of group {group_id} arrived damaged")
            return end.last_epoch, end.last_seq, chunks
    raise ValueError(f"snapshot of group {group_id} ended without its end marker")
