"""``meshctl saga``: look at sagas, and stop one.

    meshctl saga get ID                     state, steps and history
    meshctl saga list [--state S] [--type T] [--limit N]
    meshctl saga cancel ID [--reason TEXT]  compensate what ran
"""

from __future__ import annotations

import click

from clients.saga import Saga
from meshctl import output
from meshctl.context import run, settings

STATES = ("RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "NEEDS_ATTENTION")


def describe(saga: Saga) -> list[str]:
    """The saga as lines of text: header, one line per step, its history."""
    lines = [f"saga {saga.saga_id}: {saga.state} (type {saga.type} v{saga.version})"]
    if saga.error:
        lines.append(f"  why: {saga.error}")
    lines.append("  steps (stage: name, action, compensation):")
    for s in saga.steps:
        lines.append(f"    {s.stage}: {s.name:20} {s.action:12} {s.compensation:12}"
                     + (f" {s.error}" if s.error else ""))
    lines.append("  history:")
    for kind, step, detail in saga.history:
        lines.append(f"    {kind}" + (f" {step}" if step else "") + (f": {detail}" if detail
                                                                          else ""))
    return lines


def _json(saga: Saga) -> dict[str, object]:
    found: dict[str, object] = output.to_jsonable(saga)
    return found


@click.group("saga")
def saga_group() -> None:
    """Sagas: get, list, cancel."""


@saga_group.command("get")
@click.argument("saga_id")
def get(saga_id: str) -> int:
    """A saga's state, steps and history."""
    async def go() -> int:
        async with settings().mesh() as mesh:
            saga = await mesh.sagas.get(saga_id)
        if settings().json:
            output.emit(_json(saga))
        else:
            print("\n".join(describe(saga)))
        return output.OK

    return run(go())


@saga_group.command("list")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only in this state.")
@click.option("--type", "saga_type", default="", help="Only of this saga type.")
@click.option("--limit", type=int, default=100, show_default=True,
              help="At most this many (0: all).")
def list_(state: str | None, saga_type: str, limit: int) -> int:
    """Sagas by id (every node's), without their history."""
    async def go() -> int:
        found: list[Saga] = []
        async with settings().mesh() as mesh:
            async for saga in mesh.sagas.list_sagas(state=state, saga_type=saga_type,
                                                    page_size=min(limit or 1000, 1000)):
                found.append(saga)
                if limit and len(found) >= limit:
                    break
        if settings().json:
            output.emit({"sagas": [_json(s) | {"history": []} for s in found]})
            return output.OK
        print(f"{len(found)} saga(s)")
        for s in found:
            done = sum(1 for step in s.steps if step.action == "SUCCEEDED")
            print(f"  {s.saga_id:32} {s.state:16} {s.type:20} {done}/{len(s.steps)} steps"
                  + (f"  {s.error}" if s.error else ""))
        return output.OK

    return run(go())


@saga_group.command("cancel")
@click.argument("saga_id")
@click.option("--reason", default="", help="Why (kept in the saga's history).")
def cancel(saga_id: str, reason: str) -> int:
    """Stop a running saga: what took effect is compensated."""
    async def go() -> int:
        async with settings().mesh() as mesh:
            saga = await mesh.sagas.cancel(saga_id, reason or "cancelled with meshctl")
        if settings().json:
            output.emit(_json(saga))
        else:
            print(f"saga {saga.saga_id}: {saga.state}, compensating what ran")
        return output.OK

    return run(go())
