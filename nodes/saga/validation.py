"""Request validation for sagas: every failure names the offending field."""

from __future__ import annotations

from common.bounds import NS_PER_SECOND, duration_ns
from common.errors import invalid_argument
from mesh.saga.v1 import saga_pb2 as pb
from nodes.scheduler.validation import check_name

__all__ = ["MAX_INPUT_BYTES", "MAX_REASON_BYTES", "MAX_STEPS", "check_definition",
           "check_id", "check_input", "page_size", "reason_text", "wait_ns"]

MAX_STEPS = 32
MAX_INPUT_BYTES = 64 << 10
MAX_REASON_BYTES = 1024
MAX_WAIT_NS = 60 * NS_PER_SECOND
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_PRIORITY = 9
MAX_ATTEMPTS = 1000


def check_id(value: str, field: str) -> None:
    """A saga id, type or step name: 1-256 bytes of A-Z a-z 0-9 _ - . : / @ # = + { }
    (the scheduler's rule for queue names: a saga id is part of a job's request id
    and of its event stream's name)."""
    check_name(value, field)


def check_input(data: bytes) -> None:
    if len(data) > MAX_INPUT_BYTES:
        raise invalid_argument("input", f"is {len(data)} bytes; the limit is {MAX_INPUT_BYTES}")


def _check_job(spec: pb.JobSpec, field: str) -> None:
    check_name(spec.queue, f"{field}.queue")
    check_name(spec.type, f"{field}.type")
    if spec.max_attempts > MAX_ATTEMPTS:
        raise invalid_argument(f"{field}.max_attempts", f"must be at most {MAX_ATTEMPTS}")
    if spec.priority > MAX_PRIORITY:
        raise invalid_argument(f"{field}.priority", f"must be at most {MAX_PRIORITY}")
    duration_ns(f"{field}.attempt_timeout", spec.attempt_timeout)


def check_definition(definition: pb.SagaDefinition, field: str = "definition") -> None:
    """A complete, bounded definition: named, at least one non-empty stage, at
    most MAX_STEPS steps with distinct names, each with a valid action."""
    check_id(definition.name, f"{field}.name")
    if not definition.stages:
        raise invalid_argument(f"{field}.stages", "must hold at least one stage")
    names: set[str] = set()
    for i, stage in enumerate(definition.stages):
        if not stage.steps:
            raise invalid_argument(f"{field}.stages[{i}].steps", "must hold at least one step")
        for j, step in enumerate(stage.steps):
            where = f"{field}.stages[{i}].steps[{j}]"
            check_id(step.name, f"{where}.name")
            if step.name in names:
                raise invalid_argument(f"{where}.name", "is used by another step")
            names.add(step.name)
            if len(names) > MAX_STEPS:
                raise invalid_argument(f"{field}.stages", f"must hold at most {MAX_STEPS} steps")
            if not step.HasField("action"):
                raise invalid_argument(f"{where}.action", "must be set")
            _check_job(step.action, f"{where}.action")
            if step.HasField("compensation"):
                _check_job(step.compensation, f"{where}.compensation")
            duration_ns(f"{where}.timeout", step.timeout)


def page_size(value: int) -> int:
    if value > MAX_PAGE:
        raise invalid_argument("page_size", f"must be at most {MAX_PAGE}")
    return value or DEFAULT_PAGE


def wait_ns(request: pb.GetSagaRequest) -> int:
    ns = duration_ns("wait", request.wait)
    if ns > MAX_WAIT_NS:
        raise invalid_argument("wait", "must be at most 60 s")
    return ns


def reason_text(reason: str) -> str:
    """The cancel reason, cut to MAX_REASON_BYTES of UTF-8."""
    return reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
