"""A toy service, a replicated counter, plugged in through the seam alone
(`nodes.plugin.Service`): nodes load it with ``--plugins
tests.toy_counter:CounterService``. Its gRPC service is described at run time,
so it needs no generated code either."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, ClassVar, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from common.clock import SYSTEM_CLOCK, Clock
from common.metrics import Snapshot
from common.slots import slot_for
from common.tenancy import scoped
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.config import NodeConfig
from nodes.forwarding import Forwarder
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.machine import Applied, Persist, ServiceKind
from nodes.replication.manager import Replication
from nodes.routing import Routed, routed

KIND = cast(ServiceKind, 100)  # any number no other service uses


def _describe() -> Any:
    proto = descriptor_pb2.FileDescriptorProto(name="toy/v1/counter.proto",
                                               package="mesh.toy.v1", syntax="proto3")
    for name, fields in (("IncrRequest", [("key", 9), ("delta", 3)]),
                         ("GetRequest", [("key", 9)]), ("CountResponse", [("value", 3)])):
        message = proto.message_type.add(name=name)
        for number, (field, kind) in enumerate(fields, 1):
            message.field.add(name=field, number=number, type=kind, label=1)
    service = proto.service.add(name="CounterService")
    for method, request in (("Incr", "IncrRequest"), ("Get", "GetRequest")):
        service.method.add(name=method, input_type=f".mesh.toy.v1.{request}",
                           output_type=".mesh.toy.v1.CountResponse")
    pool = descriptor_pool.Default()
    pool.Add(proto)
    return pool.FindServiceByName("mesh.toy.v1.CounterService")


def _message(name: str) -> Any:
    """A message class built at run time: typed ``Any``, as no stub describes it."""
    return message_factory.GetMessageClass(SERVICE.file.message_types_by_name[name])


SERVICE = _describe()
IncrRequest = _message("IncrRequest")
GetRequest = _message("GetRequest")
CountResponse = _message("CountResponse")


class CounterMachine:
    """Counts by key; a command is ``[key, delta]``."""

    service = KIND
    durable = False
    additive_restore = False

    def __init__(self, group: Group) -> None:
        self.counts: dict[str, int] = {}

    def apply(self, command: rpb.Command) -> Applied:
        """The result: the key's new count."""
        key, delta = json.loads(command.payload)
        value = self.counts[key] = self.counts.get(key, 0) + delta
        return Applied(value)

    def snapshot(self) -> list[tuple[int, bytes]]:
        return [(0, json.dumps(self.counts).encode())]

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> list[Persist]:
        for _, data in chunks:
            self.counts.update(json.loads(data))
        return []

    def role_changed(self) -> None:
        pass

    def close(self) -> None:
        pass


class CounterService(Routed):
    name: ClassVar[str] = "counter"
    kind: ClassVar[ServiceKind] = KIND
    durable: ClassVar[bool] = False
    descriptor = SERVICE
    tick_interval_ns = 0  # no periodic work

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> CounterService:
        return cls()  # a counter needs no clock

    def machine(self, group: Group) -> CounterMachine:
        return CounterMachine(group)

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        self.start_routing(forwarder)

    async def close(self) -> None:
        pass

    def tick(self, group: Group, now_ns: int) -> int | None:
        return None

    def metrics(self, replication: Replication) -> Snapshot:
        return Snapshot()

    @routed("key")
    async def Incr(self, request: Any, context: grpc.aio.ServicerContext, group: Group) -> Any:
        key = scoped(request.key)
        proposal = group.propose(slot_for(request.key), KIND,
                                 json.dumps([key, request.delta]).encode())
        return CountResponse(value=await proposal.committed())

    @routed("key")
    async def Get(self, request: Any, context: grpc.aio.ServicerContext, group: Group) -> Any:
        await group.wait_committed(group.log.last_seq)
        counts = cast(CounterMachine, group.machines[KIND]).counts
        return CountResponse(value=counts.get(scoped(request.key), 0))
