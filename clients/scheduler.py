"""Typed job scheduler calls: ``await mesh.scheduler.enqueue("mail", "email.send", {...})``.

A queue routes like any key (its slot's primary holds it); a job id carries a
hash tag of its queue's slot, so calls naming only a job go to the same primary.
A Claim names queues that one node must lead: ``claim`` splits the queues by
owner on the cluster map and asks every owner at once. Workers normally use
``clients.worker.Worker``, which keeps one claim loop per owner.

Retries (see ``clients.retry``): reads, Heartbeat, Complete, Fail (the node
answers a repeat with the same token the same way), Cancel, dead-letter
requeue/purge and schedule deletion are safe to repeat. So is Enqueue: every
call carries a ``request_id`` (the caller's, or a fresh UUID per call) that its
retries reuse, and the queue answers a repeat with the job the first try made
(``replayed``), for the node's request retention (default 24 h), failovers and
restarts included. Claim is never repeated after an unknown outcome: a lost
answer leaves its jobs leased to nobody until their leases expire (which spends
no attempt).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

from clients.coalesce import BATCH_BYTES, MAX_IN_FLIGHT, CoalescedCall, chunks, in_batch
from clients.durations import duration
from clients.errors import (
    InvalidArgumentError,
    MeshError,
    NoNodesError,
    UnavailableError,
    mesh_error,
)
from clients.job_types import (
    CancelResult,
    ClaimedJob,
    DeadLetterPage,
    EnqueueResult,
    FailResult,
    Job,
    JobBackoff,
    JobState,
    JobTemplate,
    NewJob,
    Payload,
    QueueStats,
    Schedule,
    SchedulePage,
    encode,
)
from clients.requests import build, under
from clients.retry import Backoff, with_retries
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh
    from clients.worker import Handler, Worker

SERVICE = "scheduler"
MAX_CLAIM = 100
"""Most jobs one Claim may lease (the contract's bound)."""
MAX_BATCH = 1000
"""Most items of one EnqueueBatch or HeartbeatBatch (the contract's bound)."""
COMPLETES_IN_FLIGHT = 2
"""CompleteBatch calls open to one node. A worker pool's jobs end at about the
same time, each then completes and starts the job its Complete leased: with one
call open, each round went as a lone Complete (it left as soon as the batch before
it returned, before that batch's callers had run their next jobs) and then a
batch of the rest, one after the other; with two, the batch goes while the lone
call is out (a pool of 16: 15 completions per batch either way, and 50-70% more
jobs run end to end). The pool bounds the completions, so batches do not shrink
as they would for unbounded callers (`clients.coalesce`)."""
_BACKOFF = Backoff(initial=0.05, maximum=1.0)
"""Pauses before sending again the batch items a node could not take."""


def default_worker_id() -> str:
    """``host:pid:random``, recorded in each attempt."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class RequeueResult:
    """Dead jobs made ready again, and those left."""

    requeued: int
    remaining: int
    """Dead jobs still in the queue: call again (without ids) to go on."""


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """Dead jobs deleted, and those left."""

    purged: int
    remaining: int


class Regroup(Exception):
    """The queues of a claim are no longer led by one node (the map changed)."""


def shares(total: int, parts: int, turn: int = 0) -> list[int]:
    """``total`` split over ``parts`` as evenly as possible, the larger shares first
    from ``turn`` on (parts beyond ``total`` get 0, in rotation)."""
    base, extra = divmod(total, parts)
    return [base + (1 if (i - turn) % parts < extra else 0) for i in range(parts)]


def _enqueue_result(r: pb.EnqueueResponse) -> EnqueueResult:
    return EnqueueResult(r.job_id, r.duplicate, JobState.parse(r.state),
                         r.run_time.ToNanoseconds() / 1e9 if r.HasField("run_time") else None,
                         r.replayed)


def _expiry(r: pb.HeartbeatResponse) -> float | None:
    return r.lease_expire_time.ToNanoseconds() / 1e9 if r.HasField(
        "lease_expire_time") else None


def _enqueue_requests(jobs: Iterable[NewJob]) -> list[pb.EnqueueRequest]:
    """Each job's request. A job no request can carry (a NaN delay) is refused
    before anything is sent, naming it as a node names the jobs it refuses:
    ``jobs[3].delay``."""
    requests = []
    for i, job in enumerate(jobs):
        if not isinstance(job, NewJob):
            raise TypeError(f"jobs[{i}]: a NewJob, not {type(job).__name__}")
        try:
            requests.append(job.to_proto())
        except InvalidArgumentError as exc:
            raise under(f"jobs[{i}]", exc) from None
    return requests


def _fail_request(job_id: str, lease_token: int, error: str | BaseException, retryable: bool,
                  retry_delay: float | None) -> pb.FailRequest:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    request = build(pb.FailRequest)(
        job_id=job_id, lease_token=lease_token, error=text, retryable=retryable)
    if retry_delay is not None:
        request.retry_delay.CopyFrom(duration(retry_delay, "retry_delay"))
    return request


def _fail_result(r: pb.FailResponse) -> FailResult:
    return FailResult(JobState.parse(r.state), r.next_run_time.ToNanoseconds() / 1e9
                      if r.HasField("next_run_time") else None, r.attempts)


def _claim_next(queues: Sequence[str], worker_id: str, max_jobs: int, lease: float
                ) -> pb.ClaimNext:
    return build(pb.ClaimNext)(
        queues=list(queues), worker_id=worker_id or default_worker_id(),
        max_jobs=max(1, min(max_jobs, MAX_CLAIM)),
        lease_duration=duration(lease, "lease_duration"))


_CODES = {code.value[0]: code for code in grpc.StatusCode}
Request = TypeVar("Request", bound=Message)
Answer = TypeVar("Answer", bound=Message)


def _item_error(item: pb.ItemError, address: str, field: str) -> MeshError:
    """A batch item's error as its own call would have raised it (its fields named
    as in that call's request: ``priority``, not ``jobs[3].priority``)."""
    violations = {name.split("].", 1)[1] if name.startswith(f"{field}[") and "]." in name
                  else name: why for name, why in item.field_violations.items()}
    return mesh_error(_CODES.get(item.code, grpc.StatusCode.UNKNOWN), item.message,
                      item.reason, item.metadata, violations, address)


def _renumbered(violations: Mapping[str, str], field: str, index: int) -> dict[str, str]:
    """A batch item's field names, counted in the caller's list rather than in the
    chunk that carried it (``jobs[3].priority`` -> ``jobs[1003].priority``)."""
    out = {}
    for name, description in violations.items():
        if name.startswith(f"{field}["):
            name = f"{field}[{index}]" + name[name.index("]") + 1:]
        out[name] = description
    return out


class SchedulerClient:
    """The job scheduler, spread over the mesh's nodes. Every call takes ``timeout=``
    (the call's deadline; a job's own time limit is ``job_timeout``)."""

    def __init__(self, mesh: Mesh, *, coalesce: bool = True) -> None:
        self._mesh = mesh
        self._turn = 0
        self.coalesce = coalesce
        """Send concurrent enqueues for one node as one EnqueueBatch, and completes
        as one CompleteBatch (``clients.coalesce``)."""
        # Safe to repeat: an enqueue's request id answers the job a lost try made,
        # and a repeated Complete finds its job completed.
        self._enqueue: CoalescedCall[pb.EnqueueRequest, pb.EnqueueResponse, pb.ItemError]
        self._enqueue = self._coalesced(
            "Enqueue", lambda r: r.queue, "EnqueueBatch",
            lambda rs: pb.EnqueueBatchRequest(jobs=rs), "jobs", "job")
        self._complete: CoalescedCall[pb.CompleteRequest, pb.CompleteResponse, pb.ItemError]
        self._complete = self._coalesced(
            "Complete", lambda r: r.job_id, "CompleteBatch",
            lambda rs: pb.CompleteBatchRequest(completes=rs), "completes", "completed",
            distinct=True, max_in_flight=COMPLETES_IN_FLIGHT)

    def _coalesced(self, method: str, key: Callable[[Request], str], batch_method: str,
                   batch: Callable[[list[Request]], Any], field: str, outcome: str,
                   distinct: bool = False, max_in_flight: int = MAX_IN_FLIGHT
                   ) -> CoalescedCall[Request, Answer, pb.ItemError]:
        """``method`` (routed by ``key``), coalesced into ``batch_method`` calls whose
        ``batch(requests)`` lists them in ``field`` and whose results carry each
        answer as ``outcome``; ``distinct``: two requests of one key never share a
        batch (a batch names a job once); ``max_in_flight``: calls open to a node."""

        async def alone(request: Request, timeout: float | None) -> Answer:
            answer: Answer = await self._call(key(request), method, request, timeout)
            return answer

        async def many(address: str, requests: list[Request], budget: float
                       ) -> list[Answer | pb.ItemError]:
            reply = await self._rpc(address, batch_method, batch(requests), budget)
            return [getattr(item, outcome) if item.HasField(outcome) else item.error
                    for item in reply.results]

        return CoalescedCall(
            owner=lambda r: self._owner(key(r)) if self.coalesce else None, alone=alone,
            many=many, refusal=pb.ItemError,
            error=lambda item, address: _item_error(item, address, field),
            timeout=lambda: self._mesh.timeout, max_batch=MAX_BATCH,
            key=key if distinct else None, max_in_flight=max_in_flight,
            size=in_batch, max_bytes=self._mesh.max_message_bytes - BATCH_BYTES)

    async def _rpc(self, address: str, method: str, request: Any, budget: float) -> Any:
        return await self._mesh.call(pb_grpc.SchedulerServiceStub, address, method, request,
                                     budget)

    async def _call(self, key: str, method: str, request: Any, timeout: float | None,
                    safe: bool = True) -> Any:
        """One unary call to the primary of ``key``'s slot (a queue or a job id)."""

        async def attempt(budget: float, address: str | None) -> Any:
            address = address or self._mesh.route(SERVICE, key).address
            return await self._rpc(address, method, request, budget)

        return await with_retries(self._mesh, attempt, timeout=timeout, safe=safe)

    # -- producing -------------------------------------------------------------

    async def enqueue(
        self, queue: str, type: str, payload: Payload = b"", *, priority: int = 0,
        run_at: float | dt.datetime | None = None, delay: float | None = None,
        max_attempts: int = 0, backoff: JobBackoff | None = None,
        job_timeout: float | None = None, unique_key: str = "",
        unique_ttl: float | None = None, strict_unique: bool = False,
        retention: float | None = None, request_id: str = "", timeout: float | None = None,
    ) -> str:
        """Add a job to ``queue``; returns its id (the holder's id when ``unique_key``
        was held and nothing was enqueued, the first job's when ``request_id`` was
        seen). See ``enqueue_result`` for the arguments."""
        result = await self.enqueue_result(
            queue, type, payload, priority=priority, run_at=run_at, delay=delay,
            max_attempts=max_attempts, backoff=backoff, job_timeout=job_timeout,
            unique_key=unique_key, unique_ttl=unique_ttl, strict_unique=strict_unique,
            retention=retention, request_id=request_id, timeout=timeout)
        return result.job_id

    async def enqueue_result(
        self, queue: str, type: str, payload: Payload = b"", *, priority: int = 0,
        run_at: float | dt.datetime | None = None, delay: float | None = None,
        max_attempts: int = 0, backoff: JobBackoff | None = None,
        job_timeout: float | None = None, unique_key: str = "",
        unique_ttl: float | None = None, strict_unique: bool = False,
        retention: float | None = None, request_id: str = "", timeout: float | None = None,
    ) -> EnqueueResult:
        """Add a job of ``type`` (naming its handler) to ``queue``.

        ``payload``: bytes, str (UTF-8), or a mapping/list (JSON). ``priority`` 0
        (lowest) to 9. ``run_at`` (Unix seconds or an aware datetime) or ``delay``
        (seconds) postpone it. ``max_attempts`` (0: node default, 3), ``backoff``
        and ``job_timeout`` (seconds one attempt may run) govern retries.
        ``unique_key`` deduplicates within the queue while its job is unfinished
        (or for ``unique_ttl`` seconds): a held key returns the holder with
        ``duplicate`` set, or with ``strict_unique`` raises DuplicateJobError
        (``job_id``). ``retention``: seconds a finished job stays readable.
        ``request_id`` (at most 128 bytes; default: a new UUID for this call, reused
        by its retries) makes the call idempotent: another enqueue into ``queue``
        with the same id, within the node's request retention, enqueues nothing
        and returns the first job with ``replayed`` set. Pass your own to make
        retries across processes (e.g. a saga step) safe.
        Raises InvalidArgumentError, QueueFullError.
        """
        request = NewJob(queue, type, payload, priority, run_at, delay, max_attempts, backoff,
                         job_timeout, unique_key, unique_ttl, strict_unique, retention,
                         request_id).to_proto()
        return _enqueue_result(await self._enqueue(request, timeout))

    def _owner(self, key: str) -> str | None:
        """The address of ``key``'s primary if the map names one, else None: such a
        call goes alone, through the path that waits for the cluster."""
        try:
            target = self._mesh.route(SERVICE, key)
        except NoNodesError:
            return None
        return target.address if target.owner else None

    async def enqueue_many(self, jobs: Iterable[NewJob], *, timeout: float | None = None
                           ) -> list[EnqueueResult | MeshError]:
        """Enqueue many jobs with few calls: one EnqueueBatch (up to 1000 jobs) per
        node leading some of their queues, sent at once. Returns, in order, each
        job's result or its own error (an InvalidArgumentError names the field as
        ``jobs[i].priority``, ``i`` counting in ``jobs``). Not atomic: some jobs
        may be enqueued while others are refused.

        Every job carries a request id (its own, or a fresh UUID), so jobs whose
        answer was lost, or that the node could not take yet (its map moved, a
        failover), are sent again until ``timeout``, and never enqueued twice.
        """
        requests = _enqueue_requests(jobs)
        out: list[EnqueueResult | MeshError | None] = [None] * len(requests)

        async def chunk(address: str | None, indexes: list[int], budget: float
                        ) -> list[tuple[int, Any]]:
            batch = pb.EnqueueBatchRequest(jobs=[requests[i] for i in indexes])

            async def attempt(left: float, hint: str | None) -> pb.EnqueueBatchResponse:
                target = hint or address or self._mesh.route(
                    SERVICE, requests[indexes[0]].queue).address
                reply: pb.EnqueueBatchResponse = await self._rpc(
                    target, "EnqueueBatch", batch, left)
                return reply

            reply = await with_retries(self._mesh, attempt, timeout=budget, safe=True)
            return [(i, r.job if r.HasField("job") else r.error)
                    for i, r in zip(indexes, reply.results, strict=True)]

        await self._per_owner([r.queue for r in requests], chunk, timeout, "jobs", out,
                              _enqueue_result, [in_batch(r) for r in requests])
        return [r for r in out if r is not None]

    async def _per_owner(self, keys: list[str], send: Any, timeout: float | None,
                         field: str, out: list[Any], parse: Any,
                         sizes: Sequence[int]) -> None:
        """Items by the node leading their key, one batch call per node and chunk
        (of at most MAX_BATCH items and a message's bytes: ``sizes``), all at
        once; items the node could not take (UNAVAILABLE, WRONG_OWNER) go again,
        re-routed, until ``timeout``. Fills ``out[i]`` with ``parse(answer)`` or
        the item's MeshError (a whole call that failed: its error, for each of
        its items)."""
        budget = self._mesh.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        give_up = loop.time() + budget
        todo = list(range(len(keys)))
        tries = 0
        while todo:
            groups: dict[str | None, list[int]] = {}
            for i in todo:
                target = self._mesh.route(SERVICE, keys[i])
                groups.setdefault(target.address if target.owner else None, []).append(i)
            limit = self._mesh.max_message_bytes - BATCH_BYTES
            cut = {address: chunks(indexes, MAX_BATCH, sizes, limit)
                   for address, indexes in groups.items()}
            batches = [batch for address in cut for batch in cut[address]]
            addresses = [address for address in cut for _ in cut[address]]
            left = max(0.01, give_up - loop.time())
            answers = await asyncio.gather(
                *(send(a, c, left) for a, c in zip(addresses, batches, strict=True)),
                return_exceptions=True)
            todo, moved = [], False
            for indexes, answer in zip(batches, answers, strict=True):
                if isinstance(answer, MeshError):
                    for i in indexes:
                        out[i] = answer
                    continue
                if isinstance(answer, BaseException):
                    raise answer
                for i, item in answer:
                    if not isinstance(item, pb.ItemError):
                        out[i] = parse(item)
                        continue
                    error = mesh_error(_CODES.get(item.code, grpc.StatusCode.UNKNOWN),
                                       item.message, item.reason, item.metadata,
                                       _renumbered(item.field_violations, field, i))
                    out[i] = error
                    if error.reason == "WRONG_OWNER" or isinstance(error, UnavailableError):
                        moved |= error.reason == "WRONG_OWNER"
                        todo.append(i)
            if not todo or loop.time() >= give_up:
                return
            tries += 1
            if moved:
                await self._mesh.refresh(max(0.0, give_up - loop.time()))
            await asyncio.sleep(min(_BACKOFF.delay(tries), max(0.0, give_up - loop.time())))

    # -- consuming -------------------------------------------------------------

    def owners(self, queues: Iterable[str]) -> list[list[str]]:
        """``queues`` grouped by the node that leads them on our map, in first-seen
        order. Without a map (fixed addresses) every queue is its own group: any
        node forwards a one-queue Claim to its owner."""
        groups: dict[str, list[str]] = {}
        for queue in dict.fromkeys(queues):
            target = self._mesh.route(SERVICE, queue)
            key = target.address if target.owner else f"queue:{queue}"
            groups.setdefault(key, []).append(queue)
        return list(groups.values())

    async def claim(
        self, queues: str | Sequence[str], *, worker_id: str = "", max_jobs: int = 1,
        lease: float = 30.0, wait: float = 0.0, timeout: float | None = None,
    ) -> list[ClaimedJob]:
        """Lease up to ``max_jobs`` ready jobs (higher priority first) for ``lease``
        seconds, waiting up to ``wait`` seconds for one if none is ready.

        Queues led by several nodes are claimed from every owner at once (the
        jobs shared out among them); the first answer with jobs ends the wait and
        the other calls are cancelled, which puts back anything they leased.
        ``timeout`` bounds each call apart from its waiting.
        """
        names = [queues] if isinstance(queues, str) else list(queues)
        if not names:
            raise InvalidArgumentError("claim: no queue given",
                                       field_violations={"queues": "empty"})
        worker_id = worker_id or default_worker_id()
        max_jobs = max(1, min(max_jobs, MAX_CLAIM))
        budget = self._mesh.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait + budget
        while True:
            groups = self.owners(names)
            self._turn += 1
            asks = [(g, n) for g, n in zip(groups, shares(max_jobs, len(groups), self._turn),
                                           strict=True) if n]
            try:
                return await self._claim_groups(asks, worker_id, lease, wait, budget)
            except Regroup as exc:
                if loop.time() >= give_up:
                    raise UnavailableError(f"claim: {exc}", code=grpc.StatusCode.UNAVAILABLE,
                                           reason="WRONG_OWNER") from None
                wait = max(0.0, wait - 0.05)
                await asyncio.sleep(0.05)

    async def _claim_groups(self, asks: list[tuple[list[str], int]], worker_id: str,
                            lease: float, wait: float, budget: float) -> list[ClaimedJob]:
        if len(asks) == 1:
            return await self.claim_at(asks[0][0], worker_id=worker_id, max_jobs=asks[0][1],
                                       lease=lease, wait=wait, timeout=budget)
        calls = [asyncio.ensure_future(self.claim_at(
            group, worker_id=worker_id, max_jobs=n, lease=lease, wait=wait, timeout=budget))
            for group, n in asks]
        pending: set[asyncio.Future[list[ClaimedJob]]] = set(calls)
        try:
            # Until one answers with jobs (or fails): the rest are then cancelled,
            # which makes their nodes put back whatever they had leased meanwhile.
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(c.exception() is not None or c.result() for c in done):
                    break
        finally:
            for call in pending:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        jobs: list[ClaimedJob] = []
        errors: list[BaseException] = []
        for call in calls:  # some may have answered while being cancelled: keep their jobs
            if call.cancelled():
                continue
            error = call.exception()
            if error is None:
                jobs.extend(call.result())
            else:
                errors.append(error)
        if errors and not jobs:
            raise errors[0]
        return sorted(jobs, key=lambda j: -j.priority)

    async def claim_at(
        self, queues: Sequence[str], *, worker_id: str, max_jobs: int = 1,
        lease: float = 30.0, wait: float = 0.0, timeout: float | None = None,
    ) -> list[ClaimedJob]:
        """One Claim for ``queues``, which must be led by one node (a group from
        ``owners``). Raises Regroup when our map says they no longer are."""
        names = list(queues)
        request = build(pb.ClaimRequest)(
            queues=names, worker_id=worker_id, max_jobs=max_jobs,
            lease_duration=duration(lease, "lease_duration"))
        if wait > 0:
            request.wait.CopyFrom(duration(wait, "wait"))
        budget = self._mesh.timeout if timeout is None else timeout

        async def attempt(left: float, address: str | None) -> pb.ClaimResponse:
            if address is None:
                targets = {self._mesh.route(SERVICE, q) for q in names}
                addresses = {t.address for t in targets if t.owner}
                if len(addresses) > 1:
                    raise Regroup(f"queues {names} are now led by {len(addresses)} nodes")
                # An owner the map names, else any node (it forwards).
                address = next(iter(addresses)) if addresses else next(iter(targets)).address
            response: pb.ClaimResponse = await self._rpc(address, "Claim", request, left)
            return response

        # The deadline stays `budget` past the wait: the node answers at its end.
        r = await with_retries(self._mesh, attempt, timeout=wait + budget, safe=False,
                               follow_hints=len(names) == 1)
        return [ClaimedJob.from_proto(j, lease) for j in r.jobs]

    async def heartbeat_many(self, leases: Sequence[tuple[str, int]], *,
                             extend: float | None = None, timeout: float | None = None
                             ) -> list[float | MeshError | None]:
        """Extend many leases (``(job_id, lease_token)`` pairs) with one
        HeartbeatBatch per node leading them; returns, in order, each new expiry
        (primary's clock) or that job's error (LeaseLostError: that job alone is
        no longer ours)."""
        requests = []
        for job_id, token in leases:
            request = build(pb.HeartbeatRequest)(job_id=job_id, lease_token=token)
            if extend:
                request.extend.CopyFrom(duration(extend, "extend"))
            requests.append(request)
        out: list[float | MeshError | None] = [None] * len(requests)

        async def chunk(address: str | None, indexes: list[int], budget: float
                        ) -> list[tuple[int, Any]]:
            batch = pb.HeartbeatBatchRequest(leases=[requests[i] for i in indexes])

            async def attempt(left: float, hint: str | None) -> pb.HeartbeatBatchResponse:
                target = hint or address or self._mesh.route(
                    SERVICE, requests[indexes[0]].job_id).address
                reply: pb.HeartbeatBatchResponse = await self._rpc(
                    target, "HeartbeatBatch", batch, left)
                return reply

            reply = await with_retries(self._mesh, attempt, timeout=budget, safe=True)
            return [(i, r.lease if r.HasField("lease") else r.error)
                    for i, r in zip(indexes, reply.results, strict=True)]

        await self._per_owner([r.job_id for r in requests], chunk, timeout, "leases", out,
                              _expiry, [in_batch(r) for r in requests])
        return out

    async def heartbeat(self, job_id: str, lease_token: int, *, extend: float | None = None,
                        timeout: float | None = None) -> float | None:
        """Extend a running job's lease by ``extend`` seconds from now (None: by its
        current length); returns the new expiry (primary's clock). Raises
        LeaseLostError if the lease is no longer ours."""
        request = build(pb.HeartbeatRequest)(job_id=job_id, lease_token=lease_token)
        if extend:
            request.extend.CopyFrom(duration(extend, "extend"))
        r = await self._call(job_id, "Heartbeat", request, timeout)
        return r.lease_expire_time.ToNanoseconds() / 1e9 if r.HasField(
            "lease_expire_time") else None

    async def complete(self, job_id: str, lease_token: int, result: Payload | None = None, *,
                       timeout: float | None = None) -> float | None:
        """Finish a job successfully, keeping ``result`` with it; returns the finish
        time. Raises LeaseLostError if the lease is no longer ours."""
        request = build(pb.CompleteRequest)(
            job_id=job_id, lease_token=lease_token, result=encode(result))
        r = await self._complete(request, timeout)
        return r.finish_time.ToNanoseconds() / 1e9 if r.HasField("finish_time") else None

    async def complete_and_claim(
        self, job_id: str, lease_token: int, result: Payload | None = None, *,
        queues: Sequence[str], worker_id: str, max_jobs: int = 1, lease: float = 30.0,
        timeout: float | None = None,
    ) -> tuple[float | None, list[ClaimedJob]]:
        """Complete a job and, in the same call, lease up to ``max_jobs`` jobs ready
        now in those of ``queues`` that its node leads (no wait). Returns the
        finish time and the new jobs. A retried call claims again: jobs leased
        for a try whose answer was lost come back when their lease expires."""
        request = build(pb.CompleteRequest)(
            job_id=job_id, lease_token=lease_token, result=encode(result),
            next=_claim_next(queues, worker_id, max_jobs, lease))
        r = await self._complete(request, timeout)
        finish = r.finish_time.ToNanoseconds() / 1e9 if r.HasField("finish_time") else None
        return finish, [ClaimedJob.from_proto(j, lease) for j in r.next_jobs]


    async def fail_and_claim(
        self, job_id: str, lease_token: int, error: str | BaseException, *,
        queues: Sequence[str], worker_id: str, max_jobs: int = 1, lease: float = 30.0,
        retryable: bool = True, retry_delay: float | None = None,
        timeout: float | None = None,
    ) -> tuple[FailResult, list[ClaimedJob]]:
        """``fail``, and lease the next jobs in the same call (see
        ``complete_and_claim``)."""
        request = _fail_request(job_id, lease_token, error, retryable, retry_delay)
        request.next.CopyFrom(_claim_next(queues, worker_id, max_jobs, lease))
        r = await self._call(job_id, "Fail", request, timeout)
        return _fail_result(r), [ClaimedJob.from_proto(j, lease) for j in r.next_jobs]

    async def fail(self, job_id: str, lease_token: int, error: str | BaseException, *,
                   retryable: bool = True, retry_delay: float | None = None,
                   timeout: float | None = None) -> FailResult:
        """Report a failed attempt: retried after its backoff (or ``retry_delay``),
        or dead when not ``retryable`` or out of attempts. Raises LeaseLostError if
        the lease is no longer ours."""
        request = _fail_request(job_id, lease_token, error, retryable, retry_delay)
        return _fail_result(await self._call(job_id, "Fail", request, timeout))

    def worker(self, queues: str | Sequence[str], handlers: Mapping[str, Handler],
               **options: Any) -> Worker:
        """A ``Worker`` pool on this mesh; see ``clients.worker.Worker`` for options."""
        from clients.worker import Worker

        return Worker(self._mesh, queues, handlers, **options)

    # -- jobs ------------------------------------------------------------------

    async def cancel(self, job_id: str, *, timeout: float | None = None) -> CancelResult:
        """Stop a job that has not finished (a running one loses its lease). After
        a retried call ``cancelled`` may be False though this call cancelled it."""
        r = await self._call(job_id, "Cancel", pb.CancelRequest(job_id=job_id), timeout)
        return CancelResult(r.cancelled, JobState.parse(r.state))

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        """The job with its attempt history; raises JobNotFoundError."""
        r = await self._call(job_id, "GetJob", pb.GetJobRequest(job_id=job_id), timeout)
        return Job.from_proto(r.job)

    async def stats(self, queue: str, *, timeout: float | None = None) -> QueueStats:
        """``queue``'s jobs by state (all zero for an unknown queue)."""
        r = await self._call(queue, "Stats", pb.StatsRequest(queue=queue), timeout)
        return QueueStats.from_proto(queue, r)

    # -- dead letters ----------------------------------------------------------

    async def list_dead_letters(self, queue: str, *, page_size: int = 0, page_token: str = "",
                                timeout: float | None = None) -> DeadLetterPage:
        """One page of ``queue``'s dead jobs, oldest death first (0: 50 per page)."""
        request = build(pb.ListDeadLettersRequest)(
            queue=queue, page_size=page_size, page_token=page_token)
        r = await self._call(queue, "ListDeadLetters", request, timeout)
        return DeadLetterPage([Job.from_proto(j) for j in r.jobs], r.next_page_token, r.total)

    async def dead_letters(self, queue: str, *, page_size: int = 0,
                           timeout: float | None = None) -> AsyncIterator[Job]:
        """Every dead job of ``queue``, page by page."""
        token = ""
        while True:
            page = await self.list_dead_letters(queue, page_size=page_size, page_token=token,
                                                timeout=timeout)
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def requeue_dead_letters(self, queue: str, job_ids: Iterable[str] | None = None, *,
                                   timeout: float | None = None) -> RequeueResult:
        """Make dead jobs ready again with a fresh attempt budget: ``job_ids`` (others
        are skipped), or with None all of them, oldest first, up to 10000 per call."""
        request = pb.RequeueDeadLettersRequest(queue=queue, job_ids=list(job_ids or ()))
        r = await self._call(queue, "RequeueDeadLetters", request, timeout)
        return RequeueResult(r.requeued, r.remaining)

    async def purge_dead_letters(self, queue: str, job_ids: Iterable[str] | None = None, *,
                                 all: bool = False,
                                 timeout: float | None = None) -> PurgeResult:
        """Delete dead jobs for good: ``job_ids``, or every one with ``all=True`` (up
        to 10000 per call). Neither given deletes nothing."""
        ids = list(job_ids or ())
        if all and ids:
            raise InvalidArgumentError("give job_ids or all=True, not both",
                                       field_violations={"all": "job_ids given too"})
        request = pb.PurgeDeadLettersRequest(queue=queue, job_ids=ids, all=all)
        r = await self._call(queue, "PurgeDeadLetters", request, timeout)
        return PurgeResult(r.purged, r.remaining)

    # -- cron schedules --------------------------------------------------------

    async def create_schedule(
        self, queue: str, schedule_id: str, cron: str, template: JobTemplate, *,
        timezone: str = "", replace: bool = False, timeout: float | None = None,
    ) -> Schedule:
        """Enqueue ``template`` into ``queue`` at every firing of ``cron`` (5 or 6
        fields, or @daily...) read in ``timezone`` (IANA, empty: UTC). Raises
        ScheduleExistsError unless ``replace``."""
        request = pb.CreateScheduleRequest(queue=queue, schedule_id=schedule_id, cron=cron,
                                           timezone=timezone, template=template.to_proto(),
                                           replace=replace)
        r = await self._call(queue, "CreateSchedule", request, timeout, safe=replace)
        return Schedule.from_proto(r.schedule)

    async def delete_schedule(self, queue: str, schedule_id: str, *,
                              timeout: float | None = None) -> bool:
        """Remove a schedule (jobs it enqueued stay); False if there was none."""
        request = pb.DeleteScheduleRequest(queue=queue, schedule_id=schedule_id)
        r = await self._call(queue, "DeleteSchedule", request, timeout)
        return bool(r.deleted)

    async def list_schedules(self, queue: str, *, page_size: int = 0, page_token: str = "",
                             timeout: float | None = None) -> SchedulePage:
        """One page of ``queue``'s schedules, by id."""
        request = build(pb.ListSchedulesRequest)(
            queue=queue, page_size=page_size, page_token=page_token)
        r = await self._call(queue, "ListSchedules", request, timeout)
        return SchedulePage([Schedule.from_proto(s) for s in r.schedules], r.next_page_token)

    async def schedules(self, queue: str, *, timeout: float | None = None
                        ) -> AsyncIterator[Schedule]:
        """Every schedule of ``queue``."""
        token = ""
        while True:
            page = await self.list_schedules(queue, page_token=token, timeout=timeout)
            for schedule in page.schedules:
                yield schedule
            token = page.next_page_token
            if not token:
                return

