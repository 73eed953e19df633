"""Reading and writing the cluster map in etcd, fenced by leadership.

Every write is one Txn comparing ``create_revision(leader_key)`` with the
writer's term and ``mod_revision(map_key)`` with the revision it last read or
wrote. A deposed leader therefore cannot write (etcd refuses, whatever the
deposed process believes), and no two writers can interleave read-modify-write
cycles.
"""

from __future__ import annotations

import asyncio
import logging

import aetcd

from common.clustermap import leader_key, map_key
from mesh.admin.v1 import admin_pb2

log = logging.getLogger(__name__)

CALL_TIMEOUT = 2.0


class Deposed(Exception):
    """The leader key is no longer ours: this coordinator must stop leading."""


class MapConflict(Exception):
    """The map changed since we read it: read it again."""


class MapStore:
    """The map as the leader of one term sees and writes it."""

    def __init__(self, etcd: aetcd.Client, cluster: str, term_revision: int) -> None:
        self._etcd = etcd
        self._map_key = map_key(cluster)
        self._leader_key = leader_key(cluster)
        self._term = term_revision
        self.current: admin_pb2.ClusterMap | None = None
        self.revision = 0
        """mod_revision of the map key as last read or written; 0: no map yet."""

    async def load(self) -> admin_pb2.ClusterMap | None:
        """Read the map and its revision from etcd."""
        kv = await asyncio.wait_for(self._etcd.get(self._map_key), CALL_TIMEOUT)
        if kv is None:
            self.current, self.revision = None, 0
        else:
            cmap = admin_pb2.ClusterMap()
            cmap.ParseFromString(kv.value)
            self.current, self.revision = cmap, int(kv.mod_revision)
        return self.current

    async def write(self, cmap: admin_pb2.ClusterMap) -> None:
        """Store ``cmap`` if we still lead and nobody wrote since our last read.

        Raises Deposed or MapConflict when etcd refuses; on a timeout the write
        may or may not have happened, and the next one will tell (MapConflict).
        """
        if self.current is not None and cmap.epoch <= self.current.epoch:
            raise ValueError(f"map epoch must grow: {cmap.epoch} <= {self.current.epoch}")
        tx = self._etcd.transactions
        ok, responses = await asyncio.wait_for(self._etcd.transaction(
            compare=[tx.create(self._leader_key) == self._term,
                     tx.mod(self._map_key) == self.revision],
            success=[tx.put(self._map_key, cmap.SerializeToString())],
            failure=[tx.get(self._leader_key)],
        ), CALL_TIMEOUT)
        if ok:
            self.revision = int(responses[0].response_put.header.revision)
            self.current = cmap
            return
        holders = responses[0] if responses else []
        if not holders or holders[0][1].create_revision != self._term:
            raise Deposed(f"leader key no longer has create revision {self._term}")
        raise MapConflict(f"map key changed since revision {self.revision}")
