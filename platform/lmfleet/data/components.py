"""Connected components of a graph held as Arrow edge tables in Ray's object store, on Ray tasks: the
driver sees two numbers a round, never an edge or a label.

Alternating large-star and small-star (Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii: "Connected
Components in MapReduce and Beyond", SoCC 2014), each a hash shuffle of the edges by node
(lmfleet.data.shuffle) and a group-by-node reduce:

- large-star: every node `a` links each neighbour larger than itself to the smallest of its neighbourhood
  (itself included);
- small-star: every node `a` links each neighbour smaller than itself, and itself, to the smallest of them.

Both keep each component connected and only ever move edges onto smaller nodes; a round that leaves the
(deduplicated) edge set unchanged has turned every component into a star around its smallest node, which
is then every member's label. The number of rounds grows with log(n): on the test graphs (random 64-bit
ids, 3 partitions, 2 CPUs), a 2,000-node chain took 11 rounds (2.1 s), a 500-leaf star and 1,000
triangles 3 (0.3 s), a random graph of 2,844 nodes 6 (1.3 s). The union-find of
lmfleet.data.minhash.connected_components is the reference the tests hold this to.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from lmfleet.data.shuffle import by_column, hash_shuffle, map_blocks

EDGES = pa.schema([("a", pa.uint64()), ("b", pa.uint64())])  # a node and a neighbour
LABELS = pa.schema([("uid", pa.uint64()), ("label", pa.uint64())])
_MIX = np.uint64(0x9E3779B97F4A7C15)
MAX_ROUNDS = 200  # far beyond log(n) rounds for any corpus; a guard against a bug, not a setting


_partition = by_column("a")  # (labels come out partitioned by uid as every shuffle by uid)


def _edges(a: np.ndarray, b: np.ndarray) -> pa.Table:
    return pa.table({"a": pa.array(a, pa.uint64()), "b": pa.array(b, pa.uint64())}, schema=EDGES)


def _both_ways(table: pa.Table) -> pa.Table:
    a, b = table["a"].to_numpy(), table["b"].to_numpy()
    return _edges(np.concatenate([a, b]), np.concatenate([b, a]))


def _larger_first(table: pa.Table) -> pa.Table:
    a, b = table["a"].to_numpy(), table["b"].to_numpy()
    return _edges(np.maximum(a, b), np.minimum(a, b))


def _grouped(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b) without self-loops and repeats, sorted by a then b, and the index of each row's group start."""
    a, b = table["a"].to_numpy(), table["b"].to_numpy()
    keep = a != b
    a, b = a[keep], b[keep]
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    fresh = np.ones(len(a), dtype=bool)
    fresh[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b = a[fresh], b[fresh]
    starts = np.ones(len(a), dtype=bool)
    starts[1:] = a[1:] != a[:-1]
    group = np.cumsum(starts) - 1
    return a, b, np.flatnonzero(starts)[group]


def _fingerprint(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(edges, an order-free 64-bit hash of them) of undirected edges listed both ways: each counted once."""
    once = a < b
    mixed = (a[once] * _MIX) ^ (b[once] + np.uint64(0x632BE59BD9B4E019))
    mixed = (mixed ^ (mixed >> np.uint64(29))) * _MIX
    return int(once.sum()), int(np.bitwise_xor.reduce(mixed)) if len(mixed) else 0


def _large_star(table: pa.Table) -> tuple[pa.Table, tuple[int, int]]:
    """Edges (b, m(a)) for each neighbour b > a, m(a) the smallest of a's neighbourhood and a; with the
    fingerprint of the edge set it read (every edge of a group meets here, so repeats are seen)."""
    a, b, start = _grouped(table)
    with np.errstate(over="ignore"):
        stats = _fingerprint(a, b)
    smallest = np.minimum(b[start], a)  # sorted by b within a group: its first b is its smallest
    up = b > a
    return _edges(b[up], smallest[up]), stats


def _small_star(table: pa.Table) -> pa.Table:
    """For each node a and its neighbours b < a (the rows, larger end first): edges (v, m) for v among them
    and a itself, m the smallest, except m itself."""
    a, b, start = _grouped(table)
    smallest = b[start]  # every b < a here: the group's first b is the smallest of the neighbourhood
    heads = start == np.arange(len(a))  # one row per group brings the node a itself
    nodes = np.concatenate([b, a[heads]])
    to = np.concatenate([smallest, smallest[heads]])
    keep = nodes != to
    return _edges(nodes[keep], to[keep])


def _stats_of(pair) -> tuple[int, int]:
    return (0, 0) if pair is None else pair[1]  # None: a partition no edge went to


def _table_of(pair) -> pa.Table:
    return EDGES.empty_table() if pair is None else pair[0]


def _or_empty(table: pa.Table | None) -> pa.Table:
    return EDGES.empty_table() if table is None else table


def _self_rows(table: pa.Table | None) -> pa.Table:
    """(x, x) for every endpoint x of the input edges: each node labels itself unless its component labels
    it lower, so a node whose only edges are self-loops (dropped by the rounds) keeps its own label."""
    if table is None or not table.num_rows:
        return EDGES.empty_table()
    nodes = np.unique(np.concatenate([table["a"].to_numpy(), table["b"].to_numpy()]))
    return _edges(nodes, nodes)


def _labels(table: pa.Table) -> pa.Table:
    """Each node's component label from a star forest (edges between a component's smallest node and each
    other member, listed both ways): the smaller end of its edges (a centre labels itself)."""
    a, b = table["a"].to_numpy(), table["b"].to_numpy()
    label = np.minimum(a, b)
    order = np.lexsort((label, a))
    a, label = a[order], label[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = a[1:] != a[:-1]
    return pa.table({"uid": pa.array(a[first], pa.uint64()), "label": pa.array(label[first], pa.uint64())},
                    schema=LABELS)


def connected_components(edge_refs: list, partitions: int) -> tuple[list, dict]:
    """Refs of (uid, label) tables, one row per node of the graph (label: the smallest uid of its
    component), partition i holding the uids u with `bucket_of(u) == i`, and counts {"rounds", "edges"}. `edge_refs`: refs of Arrow tables (a, b) of uint64 node
    ids (undirected; repeats and self-loops allowed)."""
    import ray

    blocks, previous, rounds = list(edge_refs), None, 0
    while True:
        rounds += 1
        pairs = hash_shuffle(blocks, _partition, _large_star, partitions, prepare=_both_ways)
        stats = ray.get(map_blocks(pairs, _stats_of))
        edges = sum(n for n, _ in stats)
        fingerprint = (edges, functools.reduce(lambda x, y: x ^ y, (h for _, h in stats), 0))
        if fingerprint == previous or edges == 0 or rounds > MAX_ROUNDS:
            break
        previous = fingerprint
        blocks = hash_shuffle(map_blocks(pairs, _table_of), _partition, _small_star, partitions,
                              prepare=_larger_first)
        blocks = map_blocks(blocks, _or_empty)
    if rounds > MAX_ROUNDS:
        raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
    # The last round changed nothing: `blocks` (its input) is the star forest. Label each node once: a
    # shuffle by node id (every edge listed both ways, and every input node with itself) so each node's
    # rows meet in one task.
    labels = hash_shuffle(blocks + map_blocks(list(edge_refs), _self_rows), _partition, _labels, partitions,
                          prepare=_both_ways)
    return labels, {"rounds": rounds, "edges": edges}
