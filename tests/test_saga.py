"""Sagas on real processes: three nodes (R = 1), workers in this process.

A saga whose steps all succeed completes with every result; one whose step
fails compensates the steps before it, in reverse order, and not the step that
failed; a parallel stage runs its steps together and is undone together; a
step past its timeout is cancelled and, its outcome unknown, compensated; a
compensation that keeps failing parks the saga in NEEDS_ATTENTION; CancelSaga
compensates what ran; every transition is in the saga's event stream; bad
input gets INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import jwt
import pytest

from clients import Mesh
from clients.errors import (
    InvalidArgumentError,
    SagaExistsError,
    SagaFinishedError,
    SagaNotFoundError,
    SagaTypeNotFoundError,
)
from clients.job_runtime import PermanentJobError
from clients.saga import SagaType, StepContext
from common.localmesh import Etcd, LocalMesh
from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_pb2_grpc as pb_grpc
from tests.cluster import TOKEN, auth_flags, error_details
from tests.conftest import module_cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def trio(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    yield from module_cluster(etcd, tmp_path_factory, "saga", 3,
                              lambda _dir: ["--saga-check-interval", "1"])


@pytest.fixture
async def mesh(trio: LocalMesh) -> AsyncIterator[Mesh]:
    async with Mesh(etcd=trio.etcd_endpoint, cluster=trio.cluster, timeout=10) as client:
        yield client


class Effects:
    """What the handlers did, keyed like an external system keyed by idempotency key."""

    def __init__(self) -> None:
        self.done: dict[str, list[str]] = {}
        self.order: list[str] = []

    def record(self, step: StepContext, what: str) -> None:
        self.done.setdefault(step.saga_id, []).append(what)
        self.order.append(f"{step.saga_id}:{what}")


def order_type(name: str, effects: Effects, *, fail_on: str = "",
               slow: float = 0.0, timeout: float | None = None,
               broken_undo: str = "") -> SagaType:
    """reserve -> (charge || points) -> ship; ``fail_on``: the step that fails."""
    t = SagaType(name, queue=f"{name}-q")

    def act(step_name: str):  # type: ignore[no-untyped-def]
        async def run(step: StepContext) -> Any:
            if step_name == fail_on:
                raise PermanentJobError(f"{step_name} declined")
            if step_name == "ship" and slow:
                await asyncio.sleep(slow)
            effects.record(step, step_name)
            return {"step": step_name, "key": step.idempotency_key}
        return run

    def undo(step_name: str):  # type: ignore[no-untyped-def]
        async def run(step: StepContext) -> None:
            if step_name == broken_undo:
                raise PermanentJobError(f"cannot undo {step_name}")
            effects.record(step, f"undo-{step_name}")
        return run

    t.step("reserve")(act("reserve"))
    t.compensate("reserve")(undo("reserve"))
    t.step("charge")(act("charge"))
    t.compensate("charge")(undo("charge"))
    t.step("points", parallel=True)(act("points"))
    t.compensate("points")(undo("points"))
    t.step("ship", timeout=timeout, max_attempts=1)(act("ship"))
    t.compensate("ship")(undo("ship"))
    return t


async def _run(mesh: Mesh, t: SagaType, ids: list[str], data: Any = None,
               wait: float = 60.0) -> list[Any]:
    await mesh.sagas.register(t)
    async with mesh.sagas.worker(t, concurrency=8, lease=5, poll=1):
        for saga_id in ids:
            await mesh.sagas.start(t, saga_id, data if data is not None else {"id": saga_id})
        return [await mesh.sagas.result(saga_id, timeout=wait) for saga_id in ids]


async def test_a_saga_completes_with_every_result(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("happy", effects)
    [saga] = await _run(mesh, t, ["h-1"])
    assert saga.state == "COMPLETED", saga
    assert effects.done["h-1"][0] == "reserve"
    assert sorted(effects.done["h-1"][1:3]) == ["charge", "points"]
    assert effects.done["h-1"][3] == "ship"
    assert saga.result("ship") == {"step": "ship", "key": "h-1/ship/action"}
    assert [s.compensation for s in saga.steps] == ["WAITING"] * 4
    kinds = [h[0] for h in saga.history]
    assert kinds[0] == "started" and kinds[-1] == "completed"
    assert kinds.count("step_succeeded") == 4


async def test_a_failed_step_compensates_the_steps_before_it_in_reverse(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("failing", effects, fail_on="ship")
    [saga] = await _run(mesh, t, ["f-1"])
    assert saga.state == "COMPENSATED", saga
    done = effects.done["f-1"]
    assert done[0] == "reserve" and sorted(done[1:3]) == ["charge", "points"]
    # The parallel stage is undone together, before the first stage.
    assert sorted(done[3:5]) == ["undo-charge", "undo-points"]
    assert done[5:] == ["undo-reserve"]
    ship = next(s for s in saga.steps if s.name == "ship")
    assert (ship.action, ship.compensation) == ("FAILED", "SKIPPED")
    assert "ship declined" in saga.error


async def test_a_failure_in_a_parallel_stage_waits_for_its_sibling(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("sibling", effects, fail_on="points")
    [saga] = await _run(mesh, t, ["s-1"])
    assert saga.state == "COMPENSATED", saga
    done = effects.done["s-1"]
    assert done == ["reserve", "charge", "undo-charge", "undo-reserve"], done
    states = {s.name: (s.action, s.compensation) for s in saga.steps}
    assert states == {"reserve": ("SUCCEEDED", "SUCCEEDED"),
                      "charge": ("SUCCEEDED", "SUCCEEDED"),
                      "points": ("FAILED", "SKIPPED"), "ship": ("WAITING", "SKIPPED")}


async def test_a_step_past_its_timeout_is_compensated_as_unknown(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("slow", effects, slow=30.0, timeout=2.0)
    [saga] = await _run(mesh, t, ["t-1"])
    assert saga.state == "COMPENSATED", saga
    ship = next(s for s in saga.steps if s.name == "ship")
    assert ship.action == "UNKNOWN" and ship.compensation == "SUCCEEDED"
    assert "timed out" in saga.error
    assert effects.done["t-1"][-1] == "undo-reserve"
    assert "undo-ship" in effects.done["t-1"]


async def test_a_compensation_that_fails_needs_attention(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("stuck", effects, fail_on="ship", broken_undo="charge")
    [saga] = await _run(mesh, t, ["n-1"])
    assert saga.state == "NEEDS_ATTENTION", saga
    assert "cannot undo charge" in saga.error
    # The stage's other compensation ran; the earlier stage was not undone.
    assert "undo-points" in effects.done["n-1"]
    assert "undo-reserve" not in effects.done["n-1"]


async def test_cancel_compensates_what_ran(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("cancelled", effects, slow=30.0)
    await mesh.sagas.register(t)
    async with mesh.sagas.worker(t, concurrency=8, lease=5, poll=1):
        await mesh.sagas.start(t, "c-1", {"id": 1})
        for _ in range(200):
            saga = await mesh.sagas.get("c-1")
            if any(s.name == "ship" and s.action == "RUNNING" for s in saga.steps):
                break
            await asyncio.sleep(0.05)
        cancelled = await mesh.sagas.cancel("c-1", "customer changed their mind")
        assert cancelled.cancel_requested and cancelled.state == "COMPENSATING"
        saga = await mesh.sagas.result("c-1", timeout=60)
    assert saga.state == "COMPENSATED"
    assert saga.error == "cancelled: customer changed their mind"
    assert effects.done["c-1"][-1] == "undo-reserve"
    with pytest.raises(SagaFinishedError):
        await mesh.sagas.cancel("c-1")


async def test_start_is_idempotent_and_types_are_versioned(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("versioned", effects)
    v1 = await mesh.sagas.register(t)
    assert await mesh.sagas.register(t) == v1
    first = await mesh.sagas.start(t, "v-1", {"n": 1})
    again = await mesh.sagas.start(t, "v-1", {"n": 1})
    assert again.saga_id == first.saga_id and again.version == v1
    with pytest.raises(SagaExistsError):
        await mesh.sagas.start(t, "v-1", {"n": 2})
    t.step("extra")(lambda step: None)
    v2 = await mesh.sagas.register(t)
    assert v2 == v1 + 1
    # The running saga keeps the version it started with.
    assert (await mesh.sagas.get("v-1")).version == v1
    with pytest.raises(SagaTypeNotFoundError):
        await mesh.sagas.start("no-such-type", "v-2")
    with pytest.raises(SagaNotFoundError):
        await mesh.sagas.get("never-started")
    async with mesh.sagas.worker(t, concurrency=4, lease=5, poll=1):
        saga = await mesh.sagas.result("v-1", timeout=60)
    assert saga.state == "COMPLETED" and len(saga.steps) == 4


async def test_every_transition_is_an_event_and_sagas_are_listed(mesh: Mesh) -> None:
    effects = Effects()
    t = order_type("listed", effects, fail_on="charge")
    ids = [f"l-{i}" for i in range(3)]
    sagas = await _run(mesh, t, ids)
    assert {s.state for s in sagas} == {"COMPENSATED"}
    for saga in sagas:
        for _ in range(100):
            events = [e async for e in mesh.events.read_stream(f"saga-{saga.saga_id}")]
            if len(events) == len(saga.history):
                break
            await asyncio.sleep(0.1)
        assert [e.type for e in events] == [f"saga.{h[0]}" for h in saga.history]
        assert [pb.HistoryEntry.FromString(e.data).kind for e in events] == \
            [h[0] for h in saga.history]
    listed = [s async for s in mesh.sagas.list_sagas(saga_type="listed", page_size=2)]
    assert [s.saga_id for s in listed] == ids
    compensated = [s.saga_id async for s in mesh.sagas.list_sagas(state="COMPENSATED")]
    assert set(ids) <= set(compensated)
    assert not [s async for s in mesh.sagas.list_sagas(state="RUNNING", saga_type="listed")]


async def test_a_running_sagas_history_reaches_its_stream_before_it_ends(mesh: Mesh) -> None:
    """History is appended on the driver's periodic pass, not only at the end: a
    saga whose step is still running shows its start and dispatch in its stream."""
    release = asyncio.Event()
    t = SagaType("lingering", queue="lingering-q")

    @t.step("wait")
    async def wait(step: StepContext) -> None:
        await release.wait()

    await mesh.sagas.register(t)
    async with mesh.sagas.worker(t, concurrency=2, lease=5, poll=1):
        await mesh.sagas.start(t, "linger-1", {})
        kinds: list[str] = []
        for _ in range(200):
            events = [e async for e in mesh.events.read_stream("saga-linger-1")]
            kinds = [pb.HistoryEntry.FromString(e.data).kind for e in events]
            if "step_dispatched" in kinds:
                break
            await asyncio.sleep(0.05)
        assert kinds[:2] == ["started", "step_dispatched"], kinds
        assert (await mesh.sagas.get("linger-1")).state == "RUNNING"
        release.set()
        saga = await mesh.sagas.result("linger-1", timeout=60)
    assert saga.state == "COMPLETED"
    for _ in range(100):  # the rest at once when it ended
        events = [e async for e in mesh.events.read_stream("saga-linger-1")]
        if len(events) == len(saga.history):
            break
        await asyncio.sleep(0.1)
    assert [e.type for e in events] == [f"saga.{h[0]}" for h in saga.history]


async def test_bad_input_names_the_field(trio: LocalMesh) -> None:
    async with grpc.aio.insecure_channel(trio.nodes[0].address) as channel:
        stub = pb_grpc.SagaServiceStub(channel)
        cases: list[tuple[Any, Any, str]] = [
            (stub.StartSaga, pb.StartSagaRequest(saga_id="", type="x"), "saga_id"),
            (stub.StartSaga, pb.StartSagaRequest(saga_id="a b", type="x"), "saga_id"),
            (stub.StartSaga, pb.StartSagaRequest(saga_id="a", type="x", input=b"x" * 70000),
             "input"),
            (stub.RegisterSagaType, pb.RegisterSagaTypeRequest(
                definition=pb.SagaDefinition(name="t")), "definition.stages"),
            (stub.RegisterSagaType, pb.RegisterSagaTypeRequest(definition=pb.SagaDefinition(
                name="t", stages=[pb.Stage(steps=[pb.StepDefinition(name="s")])])),
             "definition.stages[0].steps[0].action"),
            (stub.RegisterSagaType, pb.RegisterSagaTypeRequest(definition=pb.SagaDefinition(
                name="t", stages=[pb.Stage(steps=[pb.StepDefinition(
                    name="s", action=pb.JobSpec(queue="q", type=""))])])),
             "definition.stages[0].steps[0].action.type"),
            (stub.GetSaga, pb.GetSagaRequest(saga_id="x" * 300), "saga_id"),
            (stub.ListSagas, pb.ListSagasRequest(page_token="garbage"), "page_token"),
        ]
        for method, request, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await method(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert field in error_details(info.value)[2], (field, error_details(info.value))


async def test_the_client_refuses_an_unknown_state(mesh: Mesh) -> None:
    with pytest.raises(InvalidArgumentError):
        [s async for s in mesh.sagas.list_sagas(state="SLEEPING")]
    assert uuid  # (imported for ids in other tests)


# -- with authentication on ------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    yield from module_cluster(etcd, tmp_path_factory, "sagasec", 2,
                              lambda workdir: [*auth_flags(workdir),
                                               "--saga-check-interval", "1"])


async def test_a_tenants_sagas_run_its_jobs_and_stay_its_own(secured: LocalMesh) -> None:
    """The saga's primary enqueues the steps' jobs for the saga's tenant (as a
    member, on the peer port): the tenant's workers run them, another tenant
    sees neither the saga nor its type."""
    effects = Effects()
    t = order_type("tenanted", effects)
    other_token = _token(secured, "globex")
    async with Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=TOKEN,
                    timeout=10) as acme, \
            Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=other_token,
                 timeout=10) as globex:
        [saga] = await _run(acme, t, ["ten-1"])
        assert saga.state == "COMPLETED"
        assert effects.done["ten-1"][-1] == "ship"
        with pytest.raises(SagaNotFoundError):
            await globex.sagas.get("ten-1")
        with pytest.raises(SagaTypeNotFoundError):
            await globex.sagas.start("tenanted", "ten-1")
        assert not [s async for s in globex.sagas.list_sagas()]
        assert [s.saga_id async for s in acme.sagas.list_sagas(saga_type="tenanted")] == \
            ["ten-1"]
        for _ in range(100):  # the history reaches the event store after the fact
            events = [e async for e in acme.events.read_stream("saga-ten-1")]
            if len(events) == len(saga.history):
                break
            await asyncio.sleep(0.1)
        assert [e.type for e in events] == [f"saga.{h[0]}" for h in saga.history]
        assert not [e async for e in globex.events.read_stream("saga-ten-1")]


def _token(local: LocalMesh, tenant: str) -> str:
    secret = (local.workdir / "jwt-secret").read_bytes()
    return jwt.encode({"tenant": tenant, "exp": int(time.time()) + 600}, secret,
                      algorithm="HS256")


async def test_pages_of_sagas_stop_at_3_mib_and_none_is_skipped(trio: LocalMesh,
                                                                 mesh: Mesh) -> None:
    # 80 sagas with inputs of ~60 kB: 4.8 MB, more than the 4 MiB a plain gRPC
    # client takes. Pages stop at 3 MiB, and merging the nodes' pages skips none.
    t = order_type("big-inputs", Effects())
    await mesh.sagas.register(t)  # no worker: the sagas stay running
    ids = sorted(f"big-{i:02}" for i in range(80))
    for saga_id in ids:
        await mesh.sagas.start(t, saga_id, {"blob": "x" * 60_000})
    async with grpc.aio.insecure_channel(trio.nodes[0].address) as channel:
        stub = pb_grpc.SagaServiceStub(channel)
        page = await stub.ListSagas(pb.ListSagasRequest(type="big-inputs", page_size=1000))
        assert 0 < len(page.sagas) < 80 and page.next_page_token
        listed = [s.saga_id for s in page.sagas]
        while page.next_page_token:
            page = await stub.ListSagas(pb.ListSagasRequest(
                type="big-inputs", page_size=1000, page_token=page.next_page_token))
            listed += [s.saga_id for s in page.sagas]
    assert listed == ids
    paged = [s.saga_id async for s in mesh.sagas.list_sagas(saga_type="big-inputs",
                                                            page_size=7)]
    assert paged == ids


async def test_a_task_whose_job_would_pass_the_payload_limit_fails_loudly(mesh: Mesh) -> None:
    """A task's job carries the saga's input and every result so far. Once they
    pass the scheduler's payload limit (1 MiB here) the scheduler refuses the
    job, every time: the task fails, naming the limit, instead of the saga
    waiting for ever for a job that can never exist. Here step c's action is
    refused, and so is the compensation of b (it carries the same results),
    which parks the saga in NEEDS_ATTENTION, as any compensation that cannot
    run does."""
    effects = Effects()
    t = SagaType("heavy", queue="heavy-q")

    def act(step_name: str):  # type: ignore[no-untyped-def]
        async def run(step: StepContext) -> Any:
            effects.record(step, step_name)
            return "x" * 600_000
        return run

    def undo(step_name: str):  # type: ignore[no-untyped-def]
        async def run(step: StepContext) -> None:
            effects.record(step, f"undo-{step_name}")
        return run

    for name in ("a", "b", "c"):
        t.step(name)(act(name))
        t.compensate(name)(undo(name))
    [saga] = await _run(mesh, t, ["heavy-1"], wait=30)
    assert saga.state == "NEEDS_ATTENTION", saga
    assert effects.done["heavy-1"] == ["a", "b"]
    assert [(s.name, s.action, s.compensation) for s in saga.steps] == [
        ("a", "SUCCEEDED", "WAITING"), ("b", "SUCCEEDED", "FAILED"), ("c", "FAILED", "SKIPPED")]
    refused = [(kind, step) for kind, step, detail in saga.history
               if "the scheduler refused its job: payload: is" in detail
               and "the limit is 1048576" in detail]
    assert ("step_failed", "c") in refused and ("compensation_failed", "b") in refused
    assert "compensation of step 'b' failed" in saga.error
