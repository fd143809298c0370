"""Exact and MinHash-LSH near-duplicate removal on Ray Data.

Both steps hash-partition keys into `partitions` buckets (`lmfleet.data.shuffle`: Ray tasks), so every
row sharing a key (content hash, LSH band hash) meets in one task; only keys, ids and (for verification)
the candidates' shingle hashes or signatures are shuffled. The driver sees counts only: the removed uids,
the pairs and the clusters stay in Ray's object store, so its memory does not grow with the corpus.

Representative rule (exact and near): within a group of duplicates keep the document of the source
listed first in the config, then the smallest `id` (string order). It is deterministic and lets the
user rank sources by trust.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmfleet.data import components, minhash
from lmfleet.data.config import DedupConfig
from lmfleet.data.shuffle import (
    bucket_of,
    by_column,
    combine,
    hash_shuffle,
    join_partitions,
    map_blocks,
    ready,
    resolve,
)

_KEY_MIX = np.uint64(0x9E3779B97F4A7C15)


def _rank_sorted(table: pa.Table, key: str) -> pa.Table:
    return table.sort_by([(key, "ascending"), ("source_index", "ascending"), ("id", "ascending")])


# ---- exact dedup -------------------------------------------------------------------------------


def _hash_keys(table: pa.Table) -> pa.Table:
    """What exact dedup shuffles: the content hash and the ranking columns, not the text."""
    return table.select(["content_hash", "source_index", "id", "uid"])


def _hash_partition(table: pa.Table, partitions: int) -> np.ndarray:
    """Partition of each row from a 64-bit prefix of its content hash."""
    prefix = np.array([int(h[:16], 16) for h in table["content_hash"].to_pylist()], dtype=np.uint64)
    return bucket_of(prefix, partitions)


def _duplicate_uids(table: pa.Table) -> pa.Table:
    """The uids of every row but the first of each content hash (in representative order)."""
    table = _rank_sorted(table, "content_hash")
    first = minhash.first_of_runs(np.asarray(table["content_hash"].to_pylist(), dtype=object))
    return table.filter(pa.array(~first)).select(["uid"])


def _sorted_uids(*tables: pa.Table | None) -> np.ndarray:
    return np.sort(np.concatenate([np.zeros(0, np.uint64), *(t["uid"].to_numpy() for t in tables if t is not None)]))


def exact_dedup(ds, partitions: int):
    """One row per distinct normalized text (content_hash), chosen by the representative rule; rows keep
    their order. Only hash keys and ids are shuffled; the removed uids (8 bytes each) are one object the
    filtering tasks read, never on the driver."""
    removed = combine(hash_shuffle(ds.to_arrow_refs(), _hash_partition, _duplicate_uids, partitions,
                                   prepare=_hash_keys), _sorted_uids)
    ready(removed)  # before the tasks that read it (`resolve`)
    return drop_uids(ds, removed)


# ---- near dedup --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LshParams:
    num_perm: int
    ngram: int
    char_ngrams: bool
    bands: int
    rows: int
    threshold: float
    verify: str  # exact, estimate, none
    max_bucket_pairs: int
    seed: int

    @classmethod
    def from_config(cls, cfg: DedupConfig, seed: int) -> LshParams:
        fp = cfg.false_positive_weight
        if fp is None:  # 0.05 verified: cluster recall 0.984 -> 0.995 for 17% more candidates (dedup_bench)
            fp = 0.05 if cfg.verify != "none" else 0.5
        b, r = cfg.bands or minhash.optimal_bands(cfg.threshold, cfg.num_perm, fp, 1.0 - fp)
        return cls(cfg.num_perm, cfg.ngram, cfg.char_ngrams, b, r, cfg.threshold, cfg.verify,
                   cfg.max_bucket_pairs, seed)


def _band_rows(table: pa.Table, p: LshParams) -> pa.Table:
    """One row per (document, band): the band's hash and who the document is (no signature: verification
    computes what it compares for candidate documents afterwards, see `near_duplicates`). Signatures are
    computed 2,000 documents at a time (512 bytes each at 128 perms)."""
    out = []
    for start in range(0, len(table), 2000):
        part = table.slice(start, 2000)
        bands = minhash.band_hashes(_signatures(part, p), p.bands, p.rows, seed=p.seed)  # (n, b) uint64
        doc = pa.array(np.repeat(np.arange(len(part)), p.bands))
        keys = bands.reshape(-1)
        out.append(pa.table({
            "band_key": pa.array(keys),
            "uid": part["uid"].take(doc),
            "source_index": part["source_index"].take(doc),
            "id": part["id"].take(doc),
        }))
    return pa.concat_tables(out)


def _signatures(table: pa.Table, p: LshParams) -> np.ndarray:
    return minhash.minhash_signatures(
        table["text"].to_pylist(), num_perm=p.num_perm, ngram=p.ngram, seed=p.seed, char_ngrams=p.char_ngrams
    )


def _feature_schema(p: LshParams) -> pa.Schema:
    """What verification compares: the signature (estimate) or the distinct shingle hashes (exact)."""
    feature = pa.list_(pa.uint32(), p.num_perm) if p.verify == "estimate" else pa.list_(pa.uint64())
    return pa.schema([("uid", pa.uint64()), ("feature", feature)])


def _candidate_features(table: pa.Table, uids: np.ndarray, p: LshParams) -> pa.Table:
    """(uid, feature) of the documents of `table` among `uids` (sorted)."""
    table = table.filter(pa.array(np.isin(table["uid"].to_numpy(), uids)))
    schema = _feature_schema(p)
    if p.verify == "estimate":
        sigs = _signatures(table, p) if len(table) else np.zeros((0, p.num_perm), np.uint32)
        feature = pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint32()), p.num_perm)
    else:
        values, offsets = minhash.shingle_set_arrays(table["text"].to_pylist(), ngram=p.ngram, seed=p.seed,
                                                     char_ngrams=p.char_ngrams)
        feature = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.uint64()))
    return pa.table({"uid": table["uid"], "feature": feature}, schema=schema)


def _exact_jaccard(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """|A & B| / |A | B| of the sorted, distinct hash lists of each row (0 for two empty ones)."""
    a, b = a.combine_chunks(), b.combine_chunks()
    a_off, b_off = a.offsets.to_numpy(), b.offsets.to_numpy()
    a_val, b_val = a.values.to_numpy(), b.values.to_numpy()
    out = np.zeros(len(a))
    for i in range(len(a)):
        x, y = a_val[a_off[i]:a_off[i + 1]], b_val[b_off[i]:b_off[i + 1]]
        both = np.intersect1d(x, y, assume_unique=True).size
        union = len(x) + len(y) - both
        out[i] = both / union if union else 0.0
    return out


def _bucket_edges(table: pa.Table, p: LshParams) -> pa.Table:
    """Candidate edges between documents sharing a band hash (similarity null: not yet verified).

    Small buckets link all pairs (so verification can judge each pair); a bucket larger than
    max_bucket_pairs links every member to its first member only, bounding the edge count.
    """
    keys = table["band_key"].to_numpy()
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    shared = np.zeros(len(keys), dtype=bool)  # rows whose band hash another row has: the only ones paired
    shared[1:] = keys[1:] == keys[:-1]
    shared[:-1] |= shared[1:]
    # Ranked (source, then id, within a bucket) only where it matters. On dedup_peers' 2.1 M band rows (one
    # core): 0.3 s, where Arrow's 3-key sort of every row and a loop over buckets took 3.1-4.8 s.
    table = _rank_sorted(table.take(pa.array(order[shared], pa.int64())), "band_key")
    left, right = minhash.run_pairs(table["band_key"].to_numpy(), p.max_bucket_pairs)
    if not left.size:
        return EDGE_SCHEMA.empty_table()
    cols = {}
    for side, idx in (("u", left), ("v", right)):
        taken = table.select(["uid", "source_index", "id"]).take(pa.array(idx, type=pa.int64()))
        cols.update({f"{side}_{name}": taken[name] for name in ("uid", "source_index", "id")})
    cols["similarity"] = pa.nulls(len(cols["u_uid"]), pa.float64())
    return pa.table(cols, schema=EDGE_SCHEMA)


EDGE_SCHEMA = pa.schema(
    [(f"{side}_{name}", t) for side in ("u", "v")
     for name, t in (("uid", pa.uint64()), ("source_index", pa.int32()), ("id", pa.string()))]
    + [("similarity", pa.float64())]
)


def _pair_partition(table: pa.Table, partitions: int) -> np.ndarray:
    u, v = table["u_uid"].to_numpy(), table["v_uid"].to_numpy()
    with np.errstate(over="ignore"):
        return bucket_of(np.minimum(u, v) ^ (np.maximum(u, v) * _KEY_MIX), partitions)


def _unique_pairs(table: pa.Table) -> pa.Table:
    """Each candidate pair once (the same pair may collide in several bands), in first-seen order."""
    u, v = table["u_uid"].to_numpy(), table["v_uid"].to_numpy()
    _, first = np.unique(np.stack([np.minimum(u, v), np.maximum(u, v)], axis=1), axis=0, return_index=True)
    return table.take(pa.array(np.sort(first)))


def _endpoints(table: pa.Table | None) -> np.ndarray:
    if table is None:
        return np.zeros(0, np.uint64)
    return np.unique(np.concatenate([table["u_uid"].to_numpy(), table["v_uid"].to_numpy()]))


def _union(*arrays: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([np.zeros(0, np.uint64), *arrays]))


def _sorted_by_uid(table: pa.Table) -> pa.Table:
    return table.sort_by("uid")


def _looked_up(by_uid: pa.Table, column: str, uids: pa.ChunkedArray) -> pa.ChunkedArray:
    """`column` of the rows of `by_uid` (sorted by uid, holding every one of `uids`) for `uids`: a join of
    two tables partitioned alike by uid."""
    at = np.searchsorted(by_uid["uid"].to_numpy(), uids.to_numpy())
    return by_uid[column].take(pa.array(at, pa.int64()))


def _with_feature(edges: pa.Table | None, features: pa.Table | None, side: str) -> pa.Table | None:
    """`edges` (partitioned by `side`_uid) with `side`_feature: that end's, from `features` (uid, feature;
    the same partition, sorted by uid, holding every candidate's)."""
    if edges is None:
        return None
    return edges.append_column(f"{side}_feature", _looked_up(features, "feature", edges[f"{side}_uid"]))


def _verified(edges: pa.Table | None, p: LshParams) -> pa.Table | None:
    """The pairs whose Jaccard (exact, or estimated by the signatures' agreement) is >= threshold, with it
    in `similarity`, without the features."""
    if edges is None:
        return None
    n = len(edges)
    if p.verify == "estimate":
        u = edges["u_feature"].combine_chunks().flatten().to_numpy().reshape(n, p.num_perm)
        v = edges["v_feature"].combine_chunks().flatten().to_numpy().reshape(n, p.num_perm)
        similarity = (u == v).mean(axis=1) if n else np.zeros(0)
    else:
        similarity = _exact_jaccard(edges["u_feature"], edges["v_feature"])
    edges = edges.drop_columns(["u_feature", "v_feature"])
    edges = edges.set_column(edges.schema.get_field_index("similarity"), "similarity", pa.array(similarity))
    return edges.filter(pa.array(similarity >= p.threshold))


def _graph_edges(table: pa.Table | None) -> pa.Table:
    if table is None:
        return components.EDGES.empty_table()
    return pa.table({"a": table["u_uid"], "b": table["v_uid"]}, schema=components.EDGES)


_NODES = pa.schema([("uid", pa.uint64()), ("source_index", pa.int32()), ("id", pa.string())])


def _edge_nodes(table: pa.Table) -> pa.Table:
    """(uid, source_index, id) of both ends of each edge."""
    return pa.concat_tables([
        pa.table({name: table[f"{side}_{name}"] for name in _NODES.names}, schema=_NODES) for side in ("u", "v")])


def _unique_nodes(table: pa.Table) -> pa.Table:
    _, first = np.unique(table["uid"].to_numpy(), return_index=True)
    return table.take(pa.array(first))


def _labelled(nodes: pa.Table | None, labels: pa.Table | None) -> pa.Table | None:
    """Each node with its component's label (both partitioned by uid: every node of one is in the other)."""
    if nodes is None:
        return None
    return nodes.append_column("label", _looked_up(labels.sort_by("uid"), "label", nodes["uid"]))


MEMBERS = pa.schema([("uid", pa.uint64()), ("cluster_id", pa.string()), ("removed", pa.bool_())])


def _representatives(table: pa.Table) -> pa.Table:
    """Every member of the clusters in `table` (all of a cluster's nodes meet here, shuffled by label) with
    its cluster_id: the id of the member first by the representative rule (source order, then id), kept;
    the others removed."""
    table = table.sort_by([("label", "ascending"), ("source_index", "ascending"), ("id", "ascending")])
    first = minhash.first_of_runs(table["label"].to_numpy())
    head = np.flatnonzero(first)[np.cumsum(first) - 1]  # each row's cluster's first row
    return pa.table({"uid": table["uid"], "cluster_id": table["id"].take(pa.array(head)),
                     "removed": pa.array(~first)}, schema=MEMBERS)


def _rows(table: pa.Table | None) -> int:
    return 0 if table is None else table.num_rows


def _cluster_counts(table: pa.Table | None) -> tuple[int, int, Counter]:
    """(clusters, removed members, {cluster size: clusters}) of a `_representatives` table."""
    if table is None:
        return 0, 0, Counter()
    removed = int(np.count_nonzero(table["removed"].to_numpy(zero_copy_only=False)))
    sizes = Counter(table.group_by("cluster_id").aggregate([("uid", "count")])["uid_count"].to_pylist())
    return table.num_rows - removed, removed, sizes


def _all_members(*tables: pa.Table | None) -> pa.Table:
    return pa.concat_tables([MEMBERS.empty_table(), *(t for t in tables if t is not None)]).sort_by("uid")


def _removed_uids(members: pa.Table) -> np.ndarray:
    return members.filter(members["removed"])["uid"].to_numpy()  # sorted: members are


@dataclass
class NearDuplicates:
    """What near dedup found, held in Ray's object store (the driver has refs and counts only)."""

    pairs: list  # refs of EDGE_SCHEMA tables (or None): each pair once, similarity null if not verified
    members: object  # ref of one MEMBERS table, sorted by uid: every document in a cluster of two or more
    removed: object  # ref of a sorted uint64 array: the members that are not their cluster's representative
    counts: dict  # candidate_pairs, verified_pairs, clusters, removed, rounds, sizes ({size: clusters})


def near_duplicates(ds, params: LshParams, partitions: int) -> NearDuplicates:
    """MinHash-LSH near duplicates of `ds` and their clusters, computed in Ray tasks.

    1. Band rows (uid, band hash; ~40 bytes a row, no signature) shuffled by band: documents sharing a
       band hash meet and become candidate pairs; the pairs are then shuffled by pair to drop repeats.
       (Carrying each document's signature in every band row, as this did before, shuffled bands x 512
       bytes per document: 808 MB for a 57 MB corpus of 112k documents, 14 bands.)
    2. Verification: the candidates' uids go to every document block, which computes what it compares for
       its candidates alone (a few % of the corpus): their distinct shingle hashes (verify: exact) or
       signatures (estimate), shuffled by uid; the pairs meet each end's in two joins by uid and keep a
       Jaccard >= threshold (with exact: |A & B| / |A | B| of the hashed shingle sets).
    3. Connected components of the verified pairs (lmfleet.data.components), then each component's
       members meet in a shuffle by label, where the representative rule picks the one kept.
    Only counts reach the driver; the candidates' uids (8 bytes each) and the clusters' members are single
    objects the tasks read from the object store.
    """
    import ray

    blocks = ds.to_arrow_refs()
    bucketed = hash_shuffle(blocks, by_column("band_key"), functools.partial(_bucket_edges, p=params), partitions,
                            prepare=functools.partial(_band_rows, p=params))
    pairs = hash_shuffle(bucketed, _pair_partition, _unique_pairs, partitions)
    counts = {"candidate_pairs": sum(ray.get(map_blocks(pairs, _rows)))}
    if params.verify != "none" and counts["candidate_pairs"]:
        wanted = combine(map_blocks(pairs, _endpoints), _union)
        features = hash_shuffle(blocks, by_column("uid"), _sorted_by_uid, partitions,
                                prepare=functools.partial(_candidate_features, p=params), args=(wanted,))
        for side in ("u", "v"):
            pairs = join_partitions(hash_shuffle(pairs, by_column(f"{side}_uid"), _identity, partitions), features,
                                    functools.partial(_with_feature, side=side))
        pairs = map_blocks(pairs, functools.partial(_verified, p=params))
    counts["verified_pairs"] = sum(ray.get(map_blocks(pairs, _rows)))
    labels, cc = components.connected_components(map_blocks(pairs, _graph_edges), partitions)
    nodes = hash_shuffle(pairs, by_column("uid"), _unique_nodes, partitions, prepare=_edge_nodes)
    clustered = hash_shuffle(join_partitions(nodes, labels, _labelled), by_column("label"), _representatives,
                             partitions)
    per_partition = ray.get(map_blocks(clustered, _cluster_counts))
    members = combine(clustered, _all_members)
    counts.update(clusters=sum(c for c, _, _ in per_partition), removed=sum(r for _, r, _ in per_partition),
                  rounds=cc["rounds"], sizes=dict(sorted(sum((s for _, _, s in per_partition), Counter()).items())))
    removed = combine([members], _removed_uids)
    ready(members, removed)  # before the Ray Data maps that read them (`resolve`)
    return NearDuplicates(pairs, members, removed, counts)


def _identity(table: pa.Table) -> pa.Table:
    return table


def _assign_clusters(table: pa.Table, members) -> pa.Table:
    members = resolve(members)
    member_uids = members["uid"].to_numpy()
    uid = table["uid"].to_numpy()
    pos = np.minimum(np.searchsorted(member_uids, uid), max(len(member_uids) - 1, 0))
    hit = member_uids[pos] == uid if len(member_uids) else np.zeros(len(uid), bool)
    cluster = members["cluster_id"].take(pa.array(pos)) if len(member_uids) else table["id"]
    return table.append_column("cluster_id", pc.if_else(pa.array(hit), cluster, table["id"]))


def with_cluster_ids(ds, members):
    """Adds `cluster_id` (the representative's id; a document's own id when it has no near-duplicate).
    `members`: a ref of NearDuplicates.members."""
    return ds.map_batches(_assign_clusters, batch_format="pyarrow", fn_kwargs={"members": members})


def _drop_uids(table: pa.Table, removed_uids) -> pa.Table:
    return table.filter(pa.array(~np.isin(table["uid"].to_numpy(), resolve(removed_uids))))


def drop_uids(ds, removed_uids):
    """`ds` without the rows whose uid is in `removed_uids` (a sorted uint64 array, or a ref of one)."""
    return ds.map_batches(_drop_uids, batch_format="pyarrow", fn_kwargs={"removed_uids": removed_uids})
