"""Group placement: which node holds each group's primary and replicas.

Pure logic, no I/O. The coordinator calls `place` whenever the eligible node set
changes. Groups move whole (snapshot, then command stream), so moves are
expensive: `place` keeps every current role it can and otherwise prefers, in
order, promoting a replica, swapping a primary with one of its replicas (no
data moves), and only then copying a group to another node. Iteration is in
sorted order with ties broken by node and group id, so every coordinator
computes the same result from the same input, and placing a placement again
changes nothing.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where one group lives."""

    primary: str
    """Node id of the primary; "" when the group has none."""
    replicas: tuple[str, ...]
    """Node ids of the replicas: distinct, never the primary."""


def place(
    current: Mapping[int, Assignment], nodes: Iterable[str], replicas: int,
    held: Mapping[int, Iterable[str]] | None = None,
    avoid: Mapping[int, Collection[str]] | None = None,
) -> dict[int, Assignment]:
    """Where every group of ``current`` should live on ``nodes`` with ``replicas`` copies.

    Every group gets a primary and ``min(replicas, len(nodes) - 1)`` replicas, all on
    distinct eligible nodes; each node holds floor or ceil of its fair share of
    primaries and of roles in total, while keeping as many current roles as possible.
    ``held`` names, per group, nodes that hold a copy of it on disk without being a
    member (a node that restarted): placing the group there counts as cheap as
    keeping a member, since that copy catches up from the log. ``avoid`` names,
    per group, nodes not to seat in it (nodes its primary cannot reach, so they
    could never catch up): they lose their replica roles there, get one back only
    when no other node can take it (a group keeps its copies, whatever its
    availability), and are never made its primary; balance gives way.
    """
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    node_list = sorted({n for n in nodes if n})
    if not node_list:
        return {g: Assignment("", ()) for g in sorted(current)}
    return _Placer(current, node_list, min(replicas, len(node_list) - 1), held or {},
                   avoid or {}).run()


def _members(a: Assignment) -> set[str]:
    return {a.primary, *a.replicas} - {""}


def primary_moves(before: Mapping[int, Assignment], after: Mapping[int, Assignment]) -> list[int]:
    """Ids of the groups whose primary node differs between ``before`` and ``after``."""
    empty = Assignment("", ())
    return [
        g
        for g in sorted(before.keys() | after.keys())
        if before.get(g, empty).primary != after.get(g, empty).primary
    ]


def role_moves(before: Mapping[int, Assignment], after: Mapping[int, Assignment]) -> int:
    """How many (group, node) roles ``after`` has that ``before`` lacks: copies to make."""
    empty = Assignment("", ())
    return sum(len(_members(a) - _members(before.get(g, empty))) for g, a in after.items())


def imbalance_percent(assignment: Mapping[int, Assignment], nodes: Iterable[str]) -> float:
    """Largest deviation of a node's primary count from the mean, in percent of the mean."""
    node_set = set(nodes)
    if not node_set or not assignment:
        return 0.0
    counts = Counter(a.primary for a in assignment.values())
    mean = len(assignment) / len(node_set)
    return max(abs(counts[n] - mean) for n in node_set) / mean * 100.0


def _quotas(
    total: int, nodes: list[str], counts: Mapping[str, int], forced: set[str]
) -> dict[str, int]:
    """Split ``total`` into floor/ceil shares: ceil ones to ``forced``, then the fullest."""
    base, extra = divmod(total, len(nodes))
    order = sorted(nodes, key=lambda n: (n not in forced, -counts[n], n))
    return {n: base + (1 if i < extra else 0) for i, n in enumerate(order)}


class _Placer:
    """One run of `place`: mutable working state over sorted groups and nodes."""

    def __init__(self, current: Mapping[int, Assignment], nodes: list[str], r: int,
                 held: Mapping[int, Iterable[str]],
                 avoid: Mapping[int, Collection[str]]) -> None:
        self.nodes = nodes
        self.r = r
        self.gids = sorted(current)
        self.avoid = avoid
        eligible = set(nodes)
        self.before: dict[int, frozenset[str]] = {}
        self.primary: dict[int, str] = {}
        self.reps: dict[int, list[str]] = {}
        for g in self.gids:
            a = current[g]
            p = a.primary if a.primary in eligible else ""
            shunned = avoid.get(g, ())
            reps: list[str] = []
            for x in a.replicas:
                if x in eligible and x != p and x not in reps and x not in shunned:
                    reps.append(x)
            self.primary[g] = p
            self.reps[g] = reps
            self.before[g] = frozenset(
                (_members(a) | eligible.intersection(held.get(g, ()))) - set(shunned))
        self.promoted: set[int] = set()
        self.pcount = Counter({n: 0 for n in nodes})
        self.pcount.update(p for p in self.primary.values() if p)
        self.pq: dict[str, int] = {}
        # Replica-phase state, filled by _place_replicas.
        self.rq: dict[str, int] = {}
        self.rcount: Counter[str] = Counter()
        self.rgroups: dict[str, set[int]] = {}
        # (primary, replica) -> groups. Spreading each node's replicas over many
        # primaries spreads the promotions, and so the load, when a node dies.
        self.pair: Counter[tuple[str, str]] = Counter()
        # Node -> groups whose replica on it could move at no cost (see _refree).
        self.free: defaultdict[str, set[int]] = defaultdict(set)
        # Direct steps, kept between _path calls while only direct steps are taken.
        self.lanes: list[_Lane] | None = None

    def run(self) -> dict[int, Assignment]:
        self._place_primaries()
        self._place_replicas()
        return {g: Assignment(self.primary[g], tuple(self.reps[g])) for g in self.gids}

    # Primaries.

    def _place_primaries(self) -> None:
        for g in self.gids:
            reps = self.reps[g]
            if not self.primary[g] and reps:
                best = min(reps, key=lambda n: (self.pcount[n], n))
                reps.remove(best)
                self.primary[g] = best
                self.pcount[best] += 1
                self.promoted.add(g)
        self.pq = _quotas(len(self.gids), self.nodes, self.pcount, set())

        def short(g: int) -> bool:
            return len(self.reps[g]) < self.r

        # A group short of replicas needs a new copy anyway, so handing its primary
        # to an under-quota node costs no extra data and leaves unaffected groups
        # alone; that is why it comes before swaps in unaffected groups. A promoted
        # primary has the data, unlike the new node, so it only goes when no swap is
        # left.
        self._shed(short, swap=True)
        self._shed(lambda g: short(g) and g not in self.promoted, swap=False)
        self._shed(lambda g: True, swap=True)
        self._shed(short, swap=False)
        for g in self.gids:
            if not self.primary[g]:
                self._set_primary(g, self._neediest(g))
        self._shed(lambda g: True, swap=False)

    def _shed(self, eligible: Callable[[int], bool], *, swap: bool) -> None:
        """Hand primaries of over-quota nodes to under-quota nodes, in ``eligible`` groups.

        With ``swap`` only to an under-quota replica of the group, which moves no data.
        """
        for a in self.nodes:
            if self.pcount[a] <= self.pq[a]:
                continue
            groups = sorted(
                (g for g in self.gids if self.primary[g] == a and eligible(g)),
                key=lambda g: (g in self.promoted, not self._held_by_under(g), g),
            )
            for g in groups:
                if self.pcount[a] <= self.pq[a]:
                    break
                if not swap:
                    b = self._neediest(g)
                    if b not in self.avoid.get(g, ()):  # it could never catch up
                        self._set_primary(g, b)
                    continue
                under = [n for n in self.reps[g] if self.pcount[n] < self.pq[n]]
                if under:
                    self._set_primary(g, min(under, key=lambda n: (self.pcount[n] - self.pq[n], n)))

    def _neediest(self, g: int) -> str:
        """The under-quota node to take group ``g``'s primary: a replica of it if
        possible, else one that holds a copy."""
        under = [n for n in self.nodes if self.pcount[n] < self.pq[n]]
        before = self.before[g]
        shunned = self.avoid.get(g, ())
        return min(under, key=lambda n: (n in shunned, n not in self.reps[g], n not in before,
                                         self.pcount[n] - self.pq[n], n))

    def _held_by_under(self, g: int) -> bool:
        """Whether an under-quota node that is not a member holds a copy of ``g``."""
        members = {self.primary[g], *self.reps[g]}
        return any(n in self.pq and self.pcount[n] < self.pq[n]
                   for n in self.before[g] - members)

    def _set_primary(self, g: int, b: str) -> None:
        """Make ``b`` the primary of ``g``; the old primary stays on as a replica."""
        a = self.primary[g]
        reps = self.reps[g]
        if b in reps:
            if a:
                reps[reps.index(b)] = a
            else:
                reps.remove(b)
        elif a:
            reps.append(a)
        if a:
            self.pcount[a] -= 1
        self.pcount[b] += 1
        self.primary[g] = b

    # Replicas.

    def _place_replicas(self) -> None:
        self.rgroups = {n: set() for n in self.nodes}
        for g in self.gids:
            for x in self.reps[g]:
                self.rcount[x] += 1
                self.rgroups[x].add(g)
                self.pair[self.primary[g], x] += 1
        total = len(self.gids) * (1 + self.r)
        held = {n: self.pcount[n] + self.rcount[n] for n in self.nodes}
        # A node whose primary share is above the floor of the total share must get
        # the ceil of it, or it would need a negative number of replicas.
        floor = total // len(self.nodes)
        forced = {n for n in self.nodes if self.pq[n] > floor}
        tq = _quotas(total, self.nodes, held, forced)
        self.rq = {n: tq[n] - self.pq[n] for n in self.nodes}

        for g in self.gids:
            p = self.primary[g]
            while len(self.reps[g]) > self.r:
                x = max(self.reps[g], key=lambda n: (self._excess(n), self.pair[p, n], n))
                self._remove(g, x)
            shunned = self.avoid.get(g, ())
            while len(self.reps[g]) < self.r:
                taken = {p, *self.reps[g]}
                before = self.before[g]
                x = min(
                    (n for n in self.nodes if n not in taken),
                    key=lambda n: (n in shunned, self._excess(n) >= 0, n not in before,
                                   self.pair[p, n], self._excess(n), n),
                )
                self._add(g, x)
        for g in self.gids:
            self._refree(g, ())
        # First re-route only copies planned in this run, which touches no group that
        # was otherwise unchanged; then move kept replicas as well.
        for planned_only in (True, False):
            self.lanes = None
            while any(self._excess(n) > 0 for n in self.nodes):
                path = self._path(planned_only)
                if path is None:
                    break  # no feasible exchange left: stay as balanced as we got
                for x, y, g in path:
                    self._remove(g, x, replace_with=y)

    def _excess(self, n: str) -> int:
        return self.rcount[n] - self.rq[n]

    def _add(self, g: int, x: str) -> None:
        self.reps[g].append(x)
        self.rcount[x] += 1
        self.rgroups[x].add(g)
        self.pair[self.primary[g], x] += 1

    def _remove(self, g: int, x: str, replace_with: str = "") -> None:
        reps = self.reps[g]
        i = reps.index(x)
        self.rcount[x] -= 1
        self.rgroups[x].discard(g)
        self.pair[self.primary[g], x] -= 1
        if replace_with:
            reps[i] = replace_with
            self.rcount[replace_with] += 1
            self.rgroups[replace_with].add(g)
            self.pair[self.primary[g], replace_with] += 1
        else:
            del reps[i]
        self._refree(g, (x,))

    def _refree(self, g: int, gone: Iterable[str]) -> None:
        """File ``g`` under each replica of it that could move at no cost: a replica
        planned in this run, when an eligible node that held ``g`` before is not a
        member now. ``gone`` are nodes that just stopped being replicas of ``g``."""
        reps = self.reps[g]
        for n in (*gone, *reps):
            self.free[n].discard(g)
        before = self.before[g]
        members = {self.primary[g], *reps}
        if any(y in self.pq and y not in members for y in before):
            for n in reps:
                if n not in before:
                    self.free[n].add(g)

    def _path(self, planned_only: bool) -> list[tuple[str, str, int]] | None:
        """Cheapest chain of replica hand-overs from an over- to an under-quota node.

        A step (x, y, g) moves x's replica of g to y. A step costs one for a new copy
        on y (none if y held g before) and one for taking away a copy x already had;
        among equal costs the shorter chain wins. Chains are needed when every group
        of the over-quota nodes already has the under-quota node as a member. With
        ``planned_only`` only replicas that x did not hold before may move.
        """
        direct = self._direct(planned_only)
        if direct is not None and (direct[0] == 0 or not any(
                self.free[n] for n in self.nodes if self._excess(n) >= 0)):
            # A chain cheaper than a direct step has at least two steps and costs at
            # most one, so one of its steps is free; and it passes no under-quota
            # node, since it ends at the first it reaches. With no such free step
            # (the usual case, as when a node joins), no chain is cheaper.
            return [(direct[3], direct[4], direct[2])]
        # Only a chain strictly cheaper than the best direct step can beat it.
        chain = self._chain(planned_only, direct[0] if direct is not None else 2 * len(self.nodes))
        if chain is not None or direct is None:
            return chain
        return [(direct[3], direct[4], direct[2])]

    def _chain(self, planned_only: bool, limit: int) -> list[tuple[str, str, int]] | None:
        """The cheapest chain from an over- to an under-quota node that costs less
        than ``limit`` (Dijkstra over nodes, by cost then hops), or None."""
        sources = [n for n in self.nodes if self._excess(n) > 0]
        dist: dict[str, tuple[int, int]] = {x: (0, 0) for x in sources}
        parent: dict[str, tuple[str, int]] = {}
        heap: list[tuple[int, int, str]] = [(0, 0, x) for x in sources]
        done: set[str] = set()
        while heap:
            cost, hops, x = heapq.heappop(heap)
            if x in done:
                continue
            done.add(x)
            if self._excess(x) < 0:
                steps: list[tuple[str, str, int]] = []
                y = x
                while y in parent:
                    prev, g = parent[y]
                    steps.append((prev, y, g))
                    y = prev
                steps.reverse()
                return steps
            targets = [y for y in self.nodes if y not in done]
            best: dict[str, tuple[int, int, int]] = {}
            for g, y, step in self._steps(x, targets, planned_only, limit - cost):
                key = (step, self.pair.get((self.primary[g], y), 0), g)
                old = best.get(y)
                if old is None or key < old:
                    best[y] = key
            for y, (step, _, g) in best.items():
                d = (cost + step, hops + 1)
                if y not in dist or d < dist[y]:
                    dist[y] = d
                    parent[y] = (x, g)
                    heapq.heappush(heap, (d[0], d[1], y))
        return None

    def _direct(self, planned_only: bool) -> tuple[int, int, int, str, str] | None:
        """The cheapest direct step from an over- to an under-quota node, as
        (cost, primary/target pairs, group, from, to); the least tuple wins ties.

        Scanning every replica for every step made a join of one node to a
        4096-group map cost seconds. So the steps are filed once in lanes, one per
        (from, to, primary, cost) with its groups in order, and a heap holds each
        lane by its first group. Over- and under-quota nodes only give and only take
        replicas, and a chain's inner nodes are neither, so within one pass a step
        only ever gets dearer (its pair count grows) or impossible (its source or
        target is balanced, its group gone from the source or already on the
        target), and no new one appears. So the heap's top, once checked against
        the present state, is the least step a full scan would find.
        """
        if self.lanes is None:
            sources = [n for n in self.nodes if self._excess(n) > 0]
            under = [n for n in self.nodes if self._excess(n) < 0]
            filed: defaultdict[tuple[str, str, str, int], list[int]] = defaultdict(list)
            for x in sources:
                for g, y, cost in self._steps(x, under, planned_only, 3):
                    filed[x, y, self.primary[g], cost].append(g)
            self.lanes = []
            for (x, y, p, cost), groups in filed.items():
                groups.sort(reverse=True)  # the next group is the last: pop() is cheap
                pairs = self.pair.get((p, y), 0)
                self.lanes.append(_Lane(cost, pairs, groups[-1], x, y, p, groups))
            heapq.heapify(self.lanes)
        lanes = self.lanes
        while lanes:
            lane = lanes[0]
            if self._excess(lane.x) <= 0 or self._excess(lane.y) >= 0:
                heapq.heappop(lanes)
                continue
            groups = lane.groups
            while groups and (groups[-1] not in self.rgroups[lane.x]
                              or lane.y in self.reps[groups[-1]]):
                groups.pop()
            if not groups:
                heapq.heappop(lanes)
                continue
            pairs = self.pair.get((lane.p, lane.y), 0)
            if (pairs, groups[-1]) != (lane.pairs, lane.g):
                heapq.heapreplace(lanes, _Lane(lane.cost, pairs, groups[-1], lane.x, lane.y,
                                               lane.p, groups))
                continue
            return lane.cost, pairs, lane.g, lane.x, lane.y
        return None

    def _steps(
        self, x: str, targets: list[str], planned_only: bool, below: int
    ) -> Iterator[tuple[int, str, int]]:
        """Possible steps (group, target, cost) handing on a replica of ``x``, cost < ``below``."""
        for g in self.rgroups[x]:
            before = self.before[g]
            kept = x in before
            if (kept and planned_only) or kept >= below:
                continue
            p = self.primary[g]
            reps = self.reps[g]
            shunned = self.avoid.get(g, ())
            # A step to a node that held g before costs one less; when only those fit
            # under the bound, look at them alone (the common, cheap case).
            ys = targets if kept + 1 < below else [y for y in targets if y in before]
            for y in ys:
                if y != p and y not in reps and y not in shunned:
                    yield g, y, kept + (y not in before)


@dataclass(order=True, slots=True)
class _Lane:
    """Direct steps from ``x`` to ``y`` of groups whose primary is ``p``, at one cost.

    Ordered by the step it offers next, (cost, pairs, g, x, y), as `_Placer._direct`
    compares steps; (x, y, g) is unique to a lane, so nothing after it is compared.
    """

    cost: int
    pairs: int
    g: int
    x: str
    y: str
    p: str = field(compare=False)
    groups: list[int] = field(compare=False)
