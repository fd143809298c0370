"""Distributed connected components (lmfleet.data.components) against the driver-side union-find
(lmfleet.data.minhash.connected_components) on the graphs near-dedup meets: chains, stars, many small
components, one giant one; node ids are random 64-bit uids, as the data stage's are."""

import numpy as np
import pyarrow as pa
import pytest

from lmfleet.data import components, minhash
from lmfleet.data.shuffle import gather


def _uids(rng, n: int) -> np.ndarray:
    # Distinct, spread over the whole uint64 range (the top bit set for about half of them).
    return np.unique(rng.integers(0, 2**64 - 1, size=2 * n, dtype=np.uint64))[:n][rng.permutation(n)]


def _reference(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    labels = minhash.connected_components(len(nodes), inverse[: len(a)], inverse[len(a):])
    return {int(u): int(nodes[label]) for u, label in zip(nodes, labels, strict=True)}  # smallest uid


def _distributed(ray, a: np.ndarray, b: np.ndarray, blocks: int = 3, partitions: int = 3):
    refs = [ray.put(pa.table({"a": pa.array(x, pa.uint64()), "b": pa.array(y, pa.uint64())}))
            for x, y in zip(np.array_split(a, blocks), np.array_split(b, blocks), strict=True)]
    labels, counts = components.connected_components(refs, partitions)
    table = gather(labels, components.LABELS)
    got = dict(zip(table["uid"].to_pylist(), table["label"].to_pylist(), strict=True))
    assert len(got) == len(table), "a node labelled twice"
    return got, counts


def _graphs():
    rng = np.random.default_rng(7)
    u = _uids(rng, 2000)
    yield "chain", u[:-1], u[1:]
    star = _uids(rng, 501)
    yield "star", np.repeat(star[250], 500), np.delete(star, 250)
    small = _uids(rng, 3000).reshape(1000, 3)  # 1000 triangles
    yield "many small", np.concatenate([small[:, 0], small[:, 1], small[:, 2]]), np.concatenate(
        [small[:, 1], small[:, 2], small[:, 0]])
    nodes = _uids(rng, 3000)
    i, j = rng.integers(0, 3000, 4500), rng.integers(0, 3000, 4500)  # a giant component and stragglers
    yield "random", nodes[i], nodes[j]
    # Repeats, both directions and self-loops, as LSH bands produce them.
    pairs = _uids(rng, 40).reshape(20, 2)
    a = np.concatenate([pairs[:, 0], pairs[:, 1], pairs[:, 0], pairs[:5, 0]])
    b = np.concatenate([pairs[:, 1], pairs[:, 0], pairs[:, 1], pairs[:5, 0]])
    yield "repeats", a, b


@pytest.mark.parametrize("name, a, b", list(_graphs()), ids=[g[0] for g in _graphs()])
def test_same_components_as_union_find(ray_local, name, a, b):
    got, counts = _distributed(ray_local, a, b)
    assert got == _reference(a, b)
    assert counts["rounds"] <= 4 * int(np.log2(len(got)) + 1), counts


def test_a_node_with_only_a_self_loop_is_its_own_component(ray_local):
    a, b = np.array([5, 9, 7, 7], np.uint64), np.array([9, 5, 7, 7], np.uint64)
    assert _distributed(ray_local, a, b)[0] == _reference(a, b) == {5: 5, 9: 5, 7: 7}


def test_no_edges(ray_local):
    got, counts = _distributed(ray_local, np.array([], np.uint64), np.array([], np.uint64))
    assert got == {} and counts["edges"] == 0


def test_partition_and_block_counts_do_not_change_labels(ray_local):
    rng = np.random.default_rng(3)
    nodes = _uids(rng, 500)
    a, b = nodes[rng.integers(0, 500, 400)], nodes[rng.integers(0, 500, 400)]
    want = _reference(a, b)
    for blocks, partitions in ((1, 1), (5, 2), (2, 7)):
        assert _distributed(ray_local, a, b, blocks, partitions)[0] == want


def test_real_text_pairs(ray_local, packed):
    """The near-duplicate pairs the data stage verified on real text (C4 documents, Shakespeare blocks)."""
    import hashlib

    import pyarrow.parquet as pq

    pairs = pq.read_table(packed / "pairs.parquet")
    assert len(pairs) >= 5, len(pairs)

    def uid(doc_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")

    a = np.array([uid(x) for x in pairs["id_a"].to_pylist()], np.uint64)
    b = np.array([uid(x) for x in pairs["id_b"].to_pylist()], np.uint64)
    got, _ = _distributed(ray_local, a, b)
    assert got == _reference(a, b)
