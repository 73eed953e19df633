"""Turning measurements into the Markdown table (stdout) and results.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import replication_counts
from bench.timing import Measurement

GOALS = {
    "get.c64": 2.0,
    "lock.r1.seq": 1.0,
    "lock.r1.c16": 1.5,
    "set.r1sync.c64": 0.85,
    "events.append.client.c16": 0.6,
    "scheduler.enqueue.client.c16": 1.5,
    "scheduler.e2e.client.c16": 1.5,
}
"""The performance issue's goals: comparison -> the ratio it should reach at least.
Appends, enqueues and end-to-end jobs are judged through the typed client (as a
user calls them, coalesced), as Celery's rows go through its apply_async; the
raw single-call rows are shown next to them."""


@dataclass(frozen=True)
class Comparison:
    """Mesh against one baseline, in calls/s or keys/s."""

    key: str
    label: str
    unit: str
    mesh: str
    baseline: str
    baseline_label: str


COMPARISONS = [
    Comparison("get.seq", "cache GET, sequential", "calls/s",
               "mesh.get.seq", "echo.get.seq", "raw gRPC echo"),
    Comparison("get.c64", "cache GET, 64 in flight", "calls/s",
               "mesh.get.c64", "echo.get.c64", "raw gRPC echo"),
    Comparison("mget100.seq", "MGet 100 keys, sequential", "keys/s",
               "mesh.mget100.seq", "redis.pipeline100.seq", "redis-py pipeline of 100 GETs"),
    Comparison("mget100.c16", "MGet 100 keys, 16 in flight", "keys/s",
               "mesh.mget100.c16", "redis.pipeline100.c16", "redis-py pipeline of 100 GETs"),
    Comparison("get.seq.redis", "cache GET, sequential", "calls/s",
               "mesh.get.seq", "redis.get.seq", "redis-py GET"),
    Comparison("set.r1sync.seq", "Set on 3 nodes, R=1 sync, sequential", "calls/s",
               "cluster.set.r1sync.seq", "cluster.set.r0.seq", "3 nodes, R=0 (unreplicated)"),
    Comparison("set.r1sync.c64", "Set on 3 nodes, R=1 sync, 64 in flight", "calls/s",
               "cluster.set.r1sync.c64", "cluster.set.r0.c64", "3 nodes, R=0 (unreplicated)"),
    Comparison("set.r1async.seq", "Set on 3 nodes, R=1 async, sequential", "calls/s",
               "cluster.set.r1async.seq", "cluster.set.r0.seq", "3 nodes, R=0 (unreplicated)"),
    Comparison("set.r1async.c64", "Set on 3 nodes, R=1 async, 64 in flight", "calls/s",
               "cluster.set.r1async.c64", "cluster.set.r0.c64", "3 nodes, R=0 (unreplicated)"),
    Comparison("set.r1sync.peerauth.seq",
               "Set on 3 nodes, R=1 sync, peer-authenticated internal plane, sequential",
               "calls/s", "cluster.set.r1sync.seq", "cluster.set.r1open.seq",
               "the same, internal plane open"),
    Comparison("set.r1sync.peerauth.c64",
               "Set on 3 nodes, R=1 sync, peer-authenticated internal plane, 64 in flight",
               "calls/s", "cluster.set.r1sync.c64", "cluster.set.r1open.c64",
               "the same, internal plane open"),
    Comparison("get.linearizable.seq",
               "cache GET on 3 nodes, R=1 sync, linearizable, sequential", "calls/s",
               "cluster.get.r1sync.linearizable.seq", "cluster.get.r1sync.default.seq",
               "the same, default reads"),
    Comparison("get.linearizable.c64",
               "cache GET on 3 nodes, R=1 sync, linearizable, 64 in flight", "calls/s",
               "cluster.get.r1sync.linearizable.c64", "cluster.get.r1sync.default.c64",
               "the same, default reads"),
]
LOCK_COMPARISONS = [
    Comparison("lock.r1.seq", "Lock acquire+release on 3 nodes, R=1, sequential",
               "cycles/s", "cluster.lock.r1.seq", "etcd.lock.seq", "etcd lock (aetcd)"),
    Comparison("lock.r1.c16", "Lock acquire+release on 3 nodes, R=1, 16 locks in parallel",
               "cycles/s", "cluster.lock.r1.c16", "etcd.lock.c16", "etcd lock (aetcd)"),
    Comparison("lock.r0.seq", "Lock acquire+release on 3 nodes, R=0, sequential",
               "cycles/s", "cluster.lock.r0.seq", "etcd.lock.seq", "etcd lock (aetcd)"),
    Comparison("lock.r0.c16", "Lock acquire+release on 3 nodes, R=0, 16 locks in parallel",
               "cycles/s", "cluster.lock.r0.c16", "etcd.lock.c16", "etcd lock (aetcd)"),
]
EVENTS_SETUP = "3 nodes, R=1 durable"
"""The event rows' cluster: sync replication, every copy fsynced (``bench.events``)."""
ECHO = "raw gRPC echo"
EVENT_COMPARISONS = [
    Comparison("events.append.seq", f"Event Append of 1 event, {EVENTS_SETUP}, sequential",
               "appends/s", "cluster.events.append.seq", "echo.events.seq", ECHO),
    Comparison("events.append.c16",
               f"Event Append of 1 event, {EVENTS_SETUP}, 16 in flight on 16 streams",
               "appends/s", "cluster.events.append.c16", "echo.events.c16", ECHO),
    Comparison("events.append.client.c16",
               f"Event append of 1 event through the typed client (coalesced), "
               f"{EVENTS_SETUP}, 16 in flight on 16 streams",
               "appends/s", "cluster.events.append.client.c16", "echo.events.c16", ECHO),
    Comparison("events.append100.seq",
               f"Event Append of 100 events, {EVENTS_SETUP}, sequential",
               "events/s", "cluster.events.append100.seq", "echo.events.seq", ECHO),
    Comparison("events.read100.seq", f"Event Read of a 100-event page, {EVENTS_SETUP}, "
               "sequential", "reads/s", "cluster.events.read100.seq", "echo.events.seq", ECHO),
    Comparison("events.read100.c16", f"Event Read of a 100-event page, {EVENTS_SETUP}, "
               "16 in flight", "reads/s", "cluster.events.read100.c16", "echo.events.c16", ECHO),
    Comparison("events.subscribe.live", f"Live stream subscription, {EVENTS_SETUP}, "
               "4 writers of 100-event batches, delivered", "events/s",
               "cluster.events.subscribe.live", "echo.events.seq", ECHO),
    Comparison("events.subscribe.catchup", "Catch-up stream subscriptions to a 500-event "
               f"stream, {EVENTS_SETUP}, one at a time, delivered", "events/s",
               "cluster.events.subscribe.catchup", "echo.events.seq", ECHO),
]
"""Event rows against the echo server timed with them, at the same calls in flight."""
SCHEDULER_SETUP = "3 nodes, R=1 durable"
"""The scheduler rows' cluster: sync replication, every copy fsynced (``bench.scheduler``)."""
CELERY = "Celery, Redis broker"
SCHEDULER_COMPARISONS = [
    Comparison("scheduler.enqueue.seq", f"Job Enqueue, {SCHEDULER_SETUP}, sequential",
               "enqueues/s", "cluster.scheduler.enqueue.seq", "celery.scheduler.enqueue.seq",
               f"{CELERY} (apply_async)"),
    Comparison("scheduler.enqueue.c16", f"Job Enqueue, {SCHEDULER_SETUP}, 16 in flight",
               "enqueues/s", "cluster.scheduler.enqueue.c16", "celery.scheduler.enqueue.c16",
               f"{CELERY} (apply_async, 16 threads)"),
    Comparison("scheduler.e2e.c16", f"Jobs end to end (enqueue -> claim -> complete, no-op), "
               f"{SCHEDULER_SETUP}, 16 producers, worker pool of 16", "jobs/s",
               "cluster.scheduler.e2e.c16", "celery.scheduler.e2e.c16",
               f"{CELERY} (worker, 16 threads)"),
]
"""Scheduler rows against Celery timed with them, at the same concurrency (the goal's)."""
SCHEDULER_BATCH_COMPARISONS = [
    Comparison("scheduler.enqueue.client.c16",
               f"Job enqueue through the typed client (coalesced), {SCHEDULER_SETUP}, "
               "16 in flight", "enqueues/s", "cluster.scheduler.enqueue.client.c16",
               "celery.scheduler.enqueue.c16", f"{CELERY} (apply_async, 16 threads)"),
    Comparison("scheduler.enqueue.batch100.c16",
               f"Job EnqueueBatch of 100, {SCHEDULER_SETUP}, 16 in flight", "jobs/s",
               "cluster.scheduler.enqueue.batch100.c16", "celery.scheduler.enqueue.c16",
               f"{CELERY} (apply_async, 16 threads)"),
    Comparison("scheduler.e2e.nochain.c16", "Jobs end to end, pool completing then claiming "
               f"(no ClaimNext), {SCHEDULER_SETUP}, 16 producers, worker pool of 16", "jobs/s",
               "cluster.scheduler.e2e.nochain.c16", "celery.scheduler.e2e.c16",
               f"{CELERY} (worker, 16 threads)"),
    Comparison("scheduler.e2e.batch.c16", "Jobs end to end, producers sending EnqueueBatch "
               f"of up to 100, {SCHEDULER_SETUP}, 16 producers, worker pool of 16", "jobs/s",
               "cluster.scheduler.e2e.batch.c16", "celery.scheduler.e2e.c16",
               f"{CELERY} (worker, 16 threads)"),
    Comparison("scheduler.e2e.client.c16", "Jobs end to end, producers calling the typed "
               f"client's enqueue (coalesced), {SCHEDULER_SETUP}, 16 producers, worker pool "
               "of 16", "jobs/s", "cluster.scheduler.e2e.client.c16",
               "celery.scheduler.e2e.c16", f"{CELERY} (worker, 16 threads)"),
]
"""The scheduler's batch paths (and the pool without ClaimNext) against the same Celery rows."""
STACK = "auth + rate limit + tracing + /metrics"
"""What the full-stack node has on (``bench.stack``)."""
BARE = "bare node (no auth, rate limit, tracing or /metrics)"
STACK_COMPARISONS = [
    Comparison("stack.get.seq", f"cache GET, 1 node, {STACK}, sequential", "calls/s",
               "cluster.stack.full.get.seq", "cluster.stack.bare.get.seq", BARE),
    Comparison("stack.get.c64", f"cache GET, 1 node, {STACK}, 64 in flight", "calls/s",
               "cluster.stack.full.get.c64", "cluster.stack.bare.get.c64", BARE),
]
"""The full interceptor stack against a bare node timed with it, at the same calls in flight."""
COMPARISONS += STACK_COMPARISONS + LOCK_COMPARISONS + EVENT_COMPARISONS + SCHEDULER_COMPARISONS \
    + SCHEDULER_BATCH_COMPARISONS
RELAYED = "raw gRPC calls (messages of one stream) relayed to one of two peers (nothing of Mesh)"
FLOOR_COMPARISONS = [
    Comparison("floor.lock.seq", f"Floor of a replicated lock cycle: two {RELAYED}, "
               "sequential", "cycles/s", "floor.lock.seq", "etcd.lock.seq", "etcd lock (aetcd)"),
    Comparison("floor.lock.c16", f"Floor of a replicated lock cycle: two {RELAYED}, "
               "16 loops", "cycles/s", "floor.lock.c16", "etcd.lock.c16", "etcd lock (aetcd)"),
    Comparison("floor.set.c64", f"Floor of a replicated write: {RELAYED}, 64 in flight",
               "calls/s", "floor.set.replicated.c64", "floor.set.unreplicated.c64",
               "raw gRPC calls (messages of one stream) answered at once"),
    Comparison("floor.append.c16", f"Floor of a durable replicated append: {RELAYED}, "
               "both sides committing to sqlite, 16 in flight", "appends/s",
               "floor.append.durable.c16", "echo.events.c16", ECHO),
]
"""Each goal row's messages sent by raw gRPC with nothing of Mesh (``bench.floor``),
against the goal row's baseline (the Set floor: against the same calls unreplicated)."""
FLOORS = {
    "lock.r1.seq": "floor.lock.seq",
    "lock.r1.c16": "floor.lock.c16",
    "set.r1sync.c64": "floor.set.c64",
    "events.append.client.c16": "floor.append.c16",
}
"""A goal -> its floor comparison: the ratio the same messages reach in raw gRPC."""


SEQ_SPLIT = {
    "typed": "cluster.lock.r1.seq", "stub": "stub.lock.r1.seq",
    "stub_unreplicated": "stub.lock.r0.seq",
    "floor": "floor.lock.seq", "floor_echo": "floor.echo.seq",
}
"""The workloads `lock_seq_split` reads (``bench.locks``)."""


def lock_seq_split(by_name: dict[str, Measurement]) -> dict[str, float] | None:
    """Where a sequential R=1 lock call's time goes, in microseconds per call
    (half a cycle), by difference between workloads timed in the same rounds:

    - ``floor_us``: the floor's relayed call (its messages in raw gRPC);
    - ``node_us``: the node's handling of a call, apart from replication (the
      stub's unreplicated call against a raw echo);
    - ``replication_us``: a replicated write's hop beyond the floor's (the stub's
      replicated call less its unreplicated one, against the floor's relay less
      its echo);
    - ``client_us``: the typed client's own work (typed client against the stub,
      both over the session).

    They add up to ``mesh_us``, the typed client's call. None if any did not run.
    A difference of two rates carries both their noise: read parts of a few tens
    of microseconds as roughly that."""
    if not all(name in by_name for name in SEQ_SPLIT.values()):
        return None
    us = {key: 1e6 / (2 * by_name[name].ops_per_s) for key, name in SEQ_SPLIT.items()}
    return {
        "mesh_us": round(us["typed"], 1),
        "floor_us": round(us["floor"], 1),
        "node_us": round(us["stub_unreplicated"] - us["floor_echo"], 1),
        "replication_us": round((us["stub"] - us["stub_unreplicated"])
                                - (us["floor"] - us["floor_echo"]), 1),
        "client_us": round(us["typed"] - us["stub"], 1),
    }


def lock_seq_lines(split: dict[str, float] | None) -> list[str]:
    """The split as one line of text (none if it did not run)."""
    if split is None:
        return []
    return ["", f"Where a sequential R=1 lock call's time goes (us per call, by difference "
                f"between rows of this run): {split['mesh_us']:.0f} in all = the floor's "
                f"relayed call {split['floor_us']:.0f} + the node's handling "
                f"{split['node_us']:.0f} + replication beyond the floor's hop "
                f"{split['replication_us']:.0f} + the typed client {split['client_us']:.0f}."]


PER_ITEM = ("keys/s", "events/s", "jobs/s")
"""Units that count what each operation carries (``Workload.batch``), not operations."""


def _rate(m: Measurement, unit: str) -> float:
    return m.keys_per_s if unit in PER_ITEM else m.ops_per_s


def round_ratios(mesh: Measurement, baseline: Measurement, unit: str) -> list[float]:
    """Mesh's rate over the baseline's, round by round (the workloads take turns in
    each round, so a round's pair ran minutes apart at most); [] unless both ran
    the same two or more rounds. Their spread shows how far a ratio moves from one
    round to the next, so a goal row near its line reads as such."""
    if len(mesh.rounds) < 2 or len(mesh.rounds) != len(baseline.rounds):
        return []
    scale = mesh.workload.batch / baseline.workload.batch if unit in PER_ITEM else 1.0
    return [round(m / b * scale, 3) for m, b in zip(mesh.rounds, baseline.rounds, strict=True)
            if b > 0]


def build(measurements: list[Measurement], environment: dict[str, Any],
          scenarios: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable results: environment, every workload, every ratio, and
    the cluster scenarios (``failover``, ``rebalance``)."""
    by_name = {m.workload.name: m for m in measurements}
    workloads = {
        m.workload.name: {
            "description": m.workload.description,
            "in_flight": m.workload.concurrency,
            "keys_per_op": m.workload.batch,
            "ops": m.ops,
            "seconds": round(m.seconds, 4),
            "ops_per_s": round(m.ops_per_s, 1),
            "keys_per_s": round(m.keys_per_s, 1),
            "rounds_ops_per_s": [round(r, 1) for r in m.rounds],
            **_replication(m),
        }
        for m in measurements
    }
    comparisons = _compare(by_name, COMPARISONS)
    floors = _compare(by_name, _present(by_name, FLOOR_COMPARISONS))
    split = lock_seq_split(by_name)
    return {
        **environment,
        "workloads": workloads,
        "comparisons": comparisons,
        "floors": floors,
        "goals": goals(comparisons, floors),
        **({"lock_seq_split": split} if split is not None else {}),
        **scenarios,
    }


def _present(by_name: dict[str, Measurement], which: list[Comparison]) -> list[Comparison]:
    """The comparisons of ``which`` whose two workloads ran."""
    return [c for c in which if c.mesh in by_name and c.baseline in by_name]


def _replication(m: Measurement) -> dict[str, Any]:
    """A replicated workload's replication messages and commands over its windows
    (summed over its cluster's nodes), and commands per message; {} for the others."""
    per = replication_counts.per_message(m.counted)
    if per is None:
        return {}
    return {"replication_messages": int(m.counted[replication_counts.MESSAGES]),
            "replication_commands": int(m.counted[replication_counts.COMMANDS]),
            "commands_per_replication_message": round(per, 2)}


def _compare(by_name: dict[str, Measurement], which: list[Comparison]
             ) -> dict[str, dict[str, Any]]:
    comparisons: dict[str, dict[str, Any]] = {}
    for c in which:
        mesh, baseline = _rate(by_name[c.mesh], c.unit), _rate(by_name[c.baseline], c.unit)
        comparisons[c.key] = {
            "label": c.label, "unit": c.unit,
            "mesh": c.mesh, "mesh_rate": round(mesh, 1),
            "baseline": c.baseline, "baseline_label": c.baseline_label,
            "baseline_rate": round(baseline, 1),
            "ratio": round(mesh / baseline, 3),
        }
        rounds = round_ratios(by_name[c.mesh], by_name[c.baseline], c.unit)
        if rounds:
            comparisons[c.key]["round_ratios"] = rounds
        per = _replication(by_name[c.mesh]).get("commands_per_replication_message")
        if per is not None:
            comparisons[c.key]["mesh_commands_per_replication_message"] = per
    return comparisons


def goals(comparisons: dict[str, dict[str, Any]],
          floors: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Each goal of ``GOALS`` whose comparison ran: its ratio, goal and whether met,
    and, where its floor ran, the floor's ratio and Mesh's share of it."""
    floors = floors or {}
    judged: dict[str, dict[str, Any]] = {}
    for key, goal in GOALS.items():
        if key not in comparisons:
            continue
        ratio = comparisons[key]["ratio"]
        judged[key] = {"min_ratio": goal, "ratio": ratio, "met": ratio >= goal}
        rounds = comparisons[key].get("round_ratios")
        if rounds:
            judged[key]["rounds_met"] = sum(r >= goal for r in rounds)
            judged[key]["rounds"] = len(rounds)
        floor = floors.get(FLOORS.get(key, ""))
        if floor is not None:
            judged[key]["floor_ratio"] = floor["ratio"]
            judged[key]["of_floor"] = round(ratio / floor["ratio"], 3)
    return judged


def _n(value: float) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else "-"


def _loop(results: dict[str, Any]) -> str:
    """The servers' event loop, as 'servers on uvloop 0.23.0, ' (runs that did not
    record it ran everything on asyncio's)."""
    return f"servers on {results.get('server_event_loop', 'asyncio')}, "


def markdown(results: dict[str, Any]) -> str:
    """The summary table, the raw numbers, and the environment."""
    lines = [
        f"## Mesh benchmark: {results['cpu_count']} CPUs, Python {results['python']}, "
        f"grpcio {results['grpcio']}, {_loop(results)}redis-server {results['redis_server']}, "
        f"{results['window_s']:g} s per workload after {results['warmup_s']:g} s warmup, "
        f"in {results['rounds']} interleaved round(s) "
        f"(1-minute load average before the run: {results['loadavg_1m_before']:.2f})",
        "",
        *_comparison_table(results["comparisons"]),
        "",
        *goal_lines(results["comparisons"], results["goals"]),
        *_scheduler_setup(results.get("scheduler")),
        *_floor_table(results.get("floors", {})),
        *lock_seq_lines(results.get("lock_seq_split")),
        "",
        "Raw numbers:",
        "",
        "| workload | what | in flight | ops/s | keys/s | ops | seconds | ops/s by round |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, w in results["workloads"].items():
        by_round = " / ".join(_n(r) for r in w["rounds_ops_per_s"])
        lines.append(f"| {name} | {w['description']} | {w['in_flight']} | {_n(w['ops_per_s'])} "
                     f"| {_n(w['keys_per_s'])} | {w['ops']} | {w['seconds']:.2f} | {by_round} |")
    return "\n".join(lines + _scenario_lines(results))


def _comparison_table(comparisons: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| workload | Mesh | baseline | ratio | commands per replication message |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for c in comparisons.values():
        per = c.get("mesh_commands_per_replication_message")
        lines.append(f"| {c['label']} ({c['unit']}) vs {c['baseline_label']} "
                     f"| {_n(c['mesh_rate'])} | {_n(c['baseline_rate'])} | {c['ratio']:.2f}x "
                     f"| {'' if per is None else f'{per:.2f}'} |")
    return lines


def goal_lines(comparisons: dict[str, dict[str, Any]], goals: dict[str, dict[str, Any]]
               ) -> list[str]:
    """A line per goal: the row, its ratio, the goal, met or not, and its floor."""
    lines = []
    for key, g in goals.items():
        line = (f"Goal: {comparisons[key]['label']} >= {g['min_ratio']}x "
                f"{comparisons[key]['baseline_label']}: {g['ratio']:.2f}x, "
                f"{'met' if g['met'] else 'NOT met'}.")
        rounds = comparisons[key].get("round_ratios")
        if rounds:
            line += (f" Round by round {min(rounds):.2f}x-{max(rounds):.2f}x, "
                     f"{g['rounds_met']} of {g['rounds']} at or past the goal.")
        if "floor_ratio" in g:
            line += (f" Floor (the same messages in raw gRPC, nothing of Mesh): "
                     f"{g['floor_ratio']:.2f}x; Mesh / floor {g['of_floor']:.2f}.")
        lines.append(line)
    return lines


def _floor_table(floors: dict[str, dict[str, Any]]) -> list[str]:
    if not floors:
        return []
    lines = ["", "Floors (`bench.floor`: three raw grpc.aio processes, each relaying a "
             "write to one of the other two, as a node's groups have their replicas on "
             "both other nodes; calls sent as messages of one stream per process and "
             "coalesced, as the typed client sends them):", "",
             "| floor | raw gRPC | baseline | ratio |", "| --- | ---: | ---: | ---: |"]
    for c in floors.values():
        lines.append(f"| {c['label']} ({c['unit']}) vs {c['baseline_label']} "
                     f"| {_n(c['mesh_rate'])} | {_n(c['baseline_rate'])} | {c['ratio']:.2f}x |")
    return lines


def _standalone_table(measurements: list[Measurement], comparisons_wanted: list[Comparison],
                      unit: str) -> str:
    """A rows module's own table (``python -m bench.<rows>``): ratios, the goals of
    those rows, then each workload's rate by round."""
    by_name = {m.workload.name: m for m in measurements}
    comparisons = _compare(by_name, comparisons_wanted)
    floors = _compare(by_name, _present(by_name, FLOOR_COMPARISONS))
    lines = [*_comparison_table(comparisons), ""]
    reached = goal_lines(comparisons, goals(comparisons, floors))
    if reached:
        lines += [*reached, ""]
    if floors:
        lines += [*_floor_table(floors)[1:], ""]
    split = lock_seq_lines(lock_seq_split(by_name))
    if split:
        lines += [*split[1:], ""]
    for m in measurements:
        by_round = " / ".join(_n(r) for r in m.rounds)
        carried = f", {_n(m.keys_per_s)} events/s" if m.workload.batch > 1 else ""
        replicated = _replication(m)
        if replicated:
            carried += (f", {replicated['commands_per_replication_message']:.2f} commands "
                        f"per replication message")
        lines.append(f"- {m.workload.name}: {_n(m.ops_per_s)} {unit}{carried} "
                     f"({by_round} by round)")
    return "\n".join(lines)


def lock_markdown(measurements: list[Measurement]) -> str:
    """The lock rows alone (``python -m bench.locks``)."""
    return _standalone_table(measurements, LOCK_COMPARISONS, "cycles/s")


def events_markdown(measurements: list[Measurement]) -> str:
    """The event store rows alone (``python -m bench.events``)."""
    return _standalone_table(measurements, EVENT_COMPARISONS, "ops/s")


def stack_markdown(measurements: list[Measurement]) -> str:
    """The interceptor stack rows alone (``python -m bench.stack``)."""
    return _standalone_table(measurements, STACK_COMPARISONS, "calls/s")


def scheduler_markdown(measurements: list[Measurement]) -> str:
    """The scheduler rows alone (``python -m bench.scheduler``)."""
    return _standalone_table(measurements, SCHEDULER_COMPARISONS + SCHEDULER_BATCH_COMPARISONS,
                             "ops/s")


def _scheduler_setup(setup: dict[str, Any] | None) -> list[str]:
    if setup is None:
        return []
    return [f"Scheduler rows: {setup['setup']}; {setup['producers']} producers, workers "
            f"running {setup['worker_concurrency']} jobs at once (Celery's "
            f"{setup['celery_pool']} pool), {setup['payload_bytes']}-byte payloads."]


def _spread(values: dict[str, float] | None) -> str:
    if values is None:
        return "- | - | -"
    return f"{values['min']:.2f} | {values['median']:.2f} | {values['max']:.2f}"


def _scenario_lines(results: dict[str, Any]) -> list[str]:
    """The failover and rebalance times, then what they left behind."""
    f, r, g = results["failover"], results["rebalance"], results["growth"]
    runs = len(f["runs"])
    probe_errors = "; ".join(
        ", ".join(f"{n} x {e}" for e, n in run["probe_errors"].items()) or "none"
        for run in f["runs"])
    return [
        "",
        "Cluster scenarios (seconds):",
        "",
        "| scenario | min | median | max |",
        "| --- | ---: | ---: | ---: |",
        f"| failover: SIGKILL of a primary -> a Set of its key succeeds ({runs} run(s)) "
        f"| {_spread(f['recovered_s'])} |",
        f"| failover: SIGKILL of a primary -> map settled over the 2 survivors "
        f"| {_spread(f['resettled_s'])} |",
        f"| rebalance: 4th node launched -> map settled over 4 nodes ({r['keys']:,} keys) "
        f"| {r['settled_s']:.2f} | {r['settled_s']:.2f} | {r['settled_s']:.2f} |",
        "",
        f"- Failover ({f['setup']}): {f['lost_writes']} of {f['acked_writes']:,} acknowledged "
        f"writes lost; {f['writer_errors']} writer errors; probe errors by run: {probe_errors}.",
        f"- Rebalance ({r['setup']}): the new node leads {r['new_node_slot_share']:.1%} of the "
        f"slots ({r['new_node_groups']} of {r['groups']} groups); {r['keys_read_back']:,} of "
        f"{r['keys']:,} keys read back; node READY {r['node_ready_s']:.2f} s after launch; "
        f"load took {r['load_s']:.2f} s ({r['keys'] / r['load_s']:,.0f} keys/s).",
        *_growth_lines(g),
        *_scale_lines(results["scale"]),
        *_notify_lines(results["notify"]),
        *_gateway_lines(results.get("gateway")),
        *_saga_lines(results.get("saga")),
    ]


def _notify_lines(n: dict[str, Any]) -> list[str]:
    """Publish -> deliver latency and delivered messages/s, Mesh against Redis Pub/Sub."""
    lines = ["", f"Notification fan-out ({n['setup']}):", "",
             "| subscribers | side | p50 ms | p99 ms | delivered msgs/s | vs Redis |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    sides = (("mesh", "Mesh, channel with history (replicated)"),
             ("mesh_ephemeral", "Mesh, ephemeral channel"), ("redis", "Redis Pub/Sub"))
    for row in n["rows"]:
        redis = row["redis"]["delivered_per_s"]
        for key, label in sides:
            m = row[key]
            ratio = f"{m['delivered_per_s'] / redis:.2f}x" if key != "redis" else ""
            lines.append(f"| {row['subscribers']} | {label} | {m['p50_ms']:.2f} "
                         f"| {m['p99_ms']:.2f} | {_n(m['delivered_per_s'])} | {ratio} |")
    lines += ["", "- Redis Pub/Sub keeps nothing: a subscriber that blinks loses what was "
                  "published meanwhile; a Mesh subscription resumes from its offset."]
    return lines


def _saga_lines(s: dict[str, Any] | None) -> list[str]:
    """Sagas completed per second against the same jobs chained by hand."""
    if s is None:  # a results file from before the saga rows
        return []
    a, c = s["sagas"], s["chains"]
    return ["", f"Sagas ({s['setup']}):", "",
            "| side | completed/s | p50 ms | p99 ms | vs hand-chained |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| saga of 3 steps (mesh.saga.v1) | {_n(a['per_s'])} | {a['p50_ms']:.1f} "
            f"| {a['p99_ms']:.1f} | {s['ratio']:.2f}x |",
            f"| 3 jobs chained by hand (each handler enqueues the next) | {_n(c['per_s'])} "
            f"| {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | |",
            "", "- What a saga adds per step: a replicated decision, the enqueue from its "
                "primary, the worker's report, a committed read of the job and a replicated "
                "outcome; per saga its start and its history in the event store."]


def _gateway_lines(g: dict[str, Any] | None) -> list[str]:
    """A cache GET over HTTP/JSON against gRPC and the ASGI floor; WebSocket delivery."""
    if g is None:  # a results file from before the gateway rows
        return []
    r = g["requests"]
    lines = ["", f"Gateway ({g['setup']}):", "",
             "| cache GET, in flight | HTTP/JSON via the gateway (calls/s) | typed client, gRPC "
             "| vs gRPC | ASGI hello (the floor) | vs the floor |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in r["gateway"]:
        http, grpc, floor = r["gateway"][c], r["grpc"][c], r["floor"][c]
        lines.append(f"| {c} | {_n(http)} | {_n(grpc)} | {http / grpc:.2f}x | {_n(floor)} "
                     f"| {http / floor:.2f}x |")
    s = g["sockets"]
    lines += ["", f"- WebSocket delivery: {s['messages']} notifications published with 16 in "
                  f"flight reached all {s['sockets']} sockets subscribed to the channel at "
                  f"{_n(s['delivered_per_s'])} messages/s ({s['seconds']:.2f} s)."]
    return lines


def _scale_lines(s: dict[str, Any]) -> list[str]:
    """Placement balance and coordinator CPU by cluster size, and the map's fan-out."""
    lines = ["", f"Cost as the cluster grows ({s['setup']}):", "",
             "| groups | nodes | busiest node's primaries / mean | coordinator CPU for a join "
             "(s) | map bytes |", "| ---: | ---: | ---: | ---: | ---: |"]
    for row in s["placement"]:
        lines.append(f"| {row['groups']:,} | {row['nodes']} | {row['busiest_over_mean']:.3f} "
                     f"| {row['join']['cpu_s']:.3f} | {row['join']['map_bytes']:,} |")
    f = s["fanout"]
    lines += ["", f"- A new {f['groups']:,}-group map ({f['map_bytes']:,} bytes) reached "
                  f"{f['followers']} etcd watchers in {f['median_s'] * 1e3:.0f} ms (median; max "
                  f"{f['max_s'] * 1e3:.0f} ms); parsing it costs a node "
                  f"{f['parse_cpu_s'] * 1e3:.0f} ms of CPU."]
    return lines


def _growth_lines(g: dict[str, Any]) -> list[str]:
    """Memory per key against Redis, and the big group's catch-up."""
    before, during = g["get_before_ms"], g["get_during_ms"]
    met = "met" if g["ratio"] <= g["goal_ratio"] else "NOT met"
    return [
        "",
        f"Cost as data grows ({g['setup']}; {g['keys']:,} keys):",
        "",
        "| measure | Mesh | Redis | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| memory per key (bytes: node RSS growth vs used_memory growth) "
        f"| {g['node_bytes_per_key']:,.0f} | {g['redis_bytes_per_key']:,.0f} "
        f"| {g['ratio']:.2f}x |",
        f"| memory per key (bytes: RSS growth of each) | {g['node_bytes_per_key']:,.0f} "
        f"| {g['redis_rss_bytes_per_key']:,.0f} "
        f"| {g['node_bytes_per_key'] / max(g['redis_rss_bytes_per_key'], 1):.2f}x |",
        "",
        f"Goal: memory per key <= {g['goal_ratio']}x Redis's: {met}.",
        f"- A second node joined: in sync with the {g['keys']:,}-key group "
        f"{g['settled_s']:.2f} s after launch (READY after {g['node_ready_s']:.2f} s); "
        f"its RSS grew {g['replica_bytes_per_key']:,.0f} bytes per key.",
        f"- GET of one of its keys on the primary, ms (p50 / p99 / max): before "
        f"{before['p50']:.2f} / {before['p99']:.2f} / {before['max']:.2f} "
        f"({before['n']:,} reads); during the catch-up {during['p50']:.2f} / "
        f"{during['p99']:.2f} / {during['max']:.2f} ({during['n']:,} reads, "
        f"{g['get_errors_during']} errors).",
    ]


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
