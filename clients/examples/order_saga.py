"""Orders as a saga: reserve inventory, charge the payment, ship; undo on failure.

The seeds' example of orchestration. Each step is a scheduler job run by a
worker pool; the saga (`mesh.saga.v1`) decides what runs next, and when a step
fails it runs the compensations of the steps that took effect, last first: a
declined payment releases the reserved stock; a charge that cannot be shipped
is refunded and its stock released.

The "external systems" here are an inventory and a payment ledger kept in
memory. Like real ones, they take an idempotency key with every change, so a
step that runs twice (its worker died after doing the work) changes nothing
the second time, and an undo that arrives for a change that never happened
does nothing.

    python -m clients.examples.order_saga --etcd 127.0.0.1:2379 --cluster mesh \\
        --orders 5 --fail-order 3
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from clients import Mesh
from clients.job_runtime import PermanentJobError
from clients.saga import Saga, SagaType, StepContext

__all__ = ["Ledger", "Shop", "order_saga", "run_orders"]


@dataclass
class Ledger:
    """An external system that remembers every change by its idempotency key."""

    applied: dict[str, Any] = field(default_factory=dict)
    undone: set[str] = field(default_factory=set)

    def apply(self, key: str, change: Any) -> bool:
        """Apply ``change`` once; False if ``key`` was applied (or undone) already."""
        if key in self.applied or key in self.undone:
            return False
        self.applied[key] = change
        return True

    def undo(self, key: str) -> Any:
        """Undo the change made under ``key`` (None if there was none): once."""
        self.undone.add(key)
        return self.applied.pop(key, None)


@dataclass
class Shop:
    """The inventory and the payments the saga's steps change."""

    stock: int = 100
    inventory: Ledger = field(default_factory=Ledger)
    payments: Ledger = field(default_factory=Ledger)
    shipped: list[str] = field(default_factory=list)
    declined: set[str] = field(default_factory=set)
    """Orders whose payment is declined."""

    def reserve(self, key: str, items: int) -> None:
        if items > self.stock:
            raise PermanentJobError(f"only {self.stock} items in stock")
        if self.inventory.apply(key, items):
            self.stock -= items

    def release(self, key: str) -> None:
        items = self.inventory.undo(key)
        if items:
            self.stock += items

    def charge(self, key: str, order: str, amount: int) -> None:
        if order in self.declined:
            raise PermanentJobError(f"card declined for order {order}")
        self.payments.apply(key, amount)

    def refund(self, key: str) -> None:
        self.payments.undo(key)


def order_saga(shop: Shop, queue: str = "orders") -> SagaType:
    """The order saga's type, its handlers working on ``shop``."""
    saga = SagaType("order", queue=queue)

    @saga.step("reserve")
    async def reserve(step: StepContext) -> dict[str, int]:
        shop.reserve(step.idempotency_key, step.input["items"])
        return {"items": step.input["items"]}

    @saga.compensate("reserve")
    async def release(step: StepContext) -> None:
        shop.release(step.action_key)  # whatever reserve did under its key

    @saga.step("charge", timeout=30)
    async def charge(step: StepContext) -> dict[str, int]:
        shop.charge(step.idempotency_key, step.input["order"], step.input["amount"])
        return {"charged": step.input["amount"]}

    @saga.compensate("charge")
    async def refund(step: StepContext) -> None:
        shop.refund(step.action_key)

    @saga.step("ship")
    async def ship(step: StepContext) -> str:
        shop.shipped.append(step.input["order"])
        return f"parcel for {step.input['order']}"

    return saga


async def run_orders(mesh: Mesh, shop: Shop, orders: list[str],
                     queue: str = "orders") -> list[Saga]:
    """Run one saga per order with a worker pool; the sagas once they ended."""
    saga = order_saga(shop, queue)
    await mesh.sagas.register(saga)
    async with mesh.sagas.worker(saga, concurrency=8, poll=1):
        for order in orders:
            await mesh.sagas.start(saga, f"order-{order}",
                                   {"order": order, "items": 2, "amount": 30})
        return [await mesh.sagas.result(f"order-{order}", timeout=60) for order in orders]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", help="etcd endpoints (default $MESH_ETCD_ENDPOINTS)")
    parser.add_argument("--cluster", help="cluster name (default $MESH_CLUSTER or mesh)")
    parser.add_argument("--orders", type=int, default=5, help="orders to place")
    parser.add_argument("--fail-order", type=int, action="append", default=[],
                        help="an order (1, 2, ...) whose payment is declined; repeatable")
    args = parser.parse_args(argv)
    run_id = uuid.uuid4().hex[:6]
    orders = [f"{run_id}-{n}" for n in range(1, args.orders + 1)]
    shop = Shop(declined={f"{run_id}-{n}" for n in args.fail_order})

    async def go() -> None:
        options: dict[str, Any] = {}
        if args.etcd:
            options["etcd"] = args.etcd
        if args.cluster:
            options["cluster"] = args.cluster
        async with Mesh(**options) as mesh:
            sagas = await run_orders(mesh, shop, orders, queue=f"orders-{run_id}")
        for saga in sagas:
            print(f"{saga.saga_id}: {saga.state}" + (f" ({saga.error})" if saga.error else ""))
            print("   " + " -> ".join(kind + (f" {step}" if step else "")
                                      for kind, step, _ in saga.history))
        print(f"stock left {shop.stock} (of 100), charged "
              f"{sum(shop.payments.applied.values())}, shipped {len(shop.shipped)}")

    asyncio.run(go())


if __name__ == "__main__":
    main()
