"""The Mesh benchmark: ``make bench`` (``python -m bench``).

One run measures, on this machine and under the same load, the cache through the
typed client and the baselines it is judged against:

* cache GET through ``mesh.cache.get`` vs. a raw grpc.aio echo server that answers
  the same method with the same messages (one Python gRPC unary call; the typed
  client sends its calls as messages of a session stream, which cost less);
* MGet of 100 keys through ``mesh.cache.mget`` vs. redis-py pipelines of 100 GETs;
* redis-py GET, for orientation;
* Set on 3-node clusters with R=1 (sync, async) vs. R=0, the cost of replication;
* cache GET on a node with the full interceptor stack (bearer-token auth, a
  per-tenant rate limit that never refuses, tracing exported to a file, /metrics)
  vs. a bare node, 1 and 64 in flight, the cost of the stack (``stack``);
* lock acquire+release cycles vs. etcd's own lock through aetcd (``locks``);
* the event store: durable appends of 1 and 100 events, reads, live and catch-up
  subscriptions, vs. the echo server in the same rounds (``events``);
* the job scheduler: durable enqueues and end-to-end jobs (enqueue, claim by a
  worker pool, complete) vs. Celery with a Redis broker in the same rounds
  (``scheduler``; ``celery_app`` is Celery's side, ``mesh_worker`` Mesh's worker
  process, ``counter`` how both count the jobs they ran);
* the floor of each goal row (``floor``): the same messages (a coalesced call as
  a message of a session stream, one replication message to a peer and its ack;
  for appends, sqlite commits on both sides) sent by three bare grpc.aio
  processes (``relay_server``), each relaying a write to one of the other two,
  with nothing of Mesh behind them, in the same rounds as the rows they price;
* failover time after SIGKILL of a primary, and rebalance time when a 4th node
  joins 3 that hold 100k keys (with checks that no acknowledged write is lost).

Modules: ``services`` starts the single-node rows' child processes (``echo_server``
is one of them), ``workloads`` defines their calls, ``timing`` times them,
``progress`` draws the bar on stderr, ``report`` prints the Markdown tables and
writes ``results.json``. ``cluster`` runs the cluster rows: ``clusters`` starts
whole clusters, ``maps`` waits for their maps, ``replicated``, ``failover`` and
``rebalance`` are the scenarios, ``stack``, ``locks``, ``events`` and ``scheduler``
the service rows.
"""

import os

from common import grpc_engine

# Before any bench module imports grpc: this process and every process it starts
# (nodes, the echo and relay servers, the worker pools) run gRPC on the engine
# Mesh's own processes run on, so Mesh and its gRPC baselines are measured alike.
os.environ.update(grpc_engine.environment(os.environ))
