"""Hash shuffles and block maps of Arrow tables with plain Ray tasks.

Ray Data's `groupby(...).map_groups(...)` costs seconds a call whatever the data: measured on the 2-core
machine (Ray 2.60, every shuffle strategy alike), 4.4 s for 112k documents (65 MB) and 5.0 s for their
key columns alone (2 MB), against 0.1 s for the same hash partitioning as tasks here. The data stage made
three such calls, so on the benchmark corpus they were most of the steps' time that a second CPU
cannot shorten. The tasks below take a dataset's blocks (`Dataset.to_arrow_refs()`), keep their order
(so outputs are deterministic) and return object refs: `ray.get` them, or `ray.data.from_arrow_refs`.
A None in place of a table (a partition no row went to) is read as an empty one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pyarrow as pa

_MIX = np.uint64(0x9E3779B97F4A7C15)


def bucket_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Partition index of 64-bit keys (uids, hashes); a multiplicative mix so structured keys spread evenly.
    Every shuffle by uid uses it, so partition i of one holds the same uids as partition i of another
    (`join_partitions`)."""
    with np.errstate(over="ignore"):
        return ((keys.astype(np.uint64) * _MIX) >> np.uint64(40)).astype(np.int64) % partitions


def by_column(column: str) -> functools.partial:
    """The partition function of a shuffle by a 64-bit key column (`bucket_of`: two shuffles by the same
    kind of key meet in `join_partitions`)."""
    return functools.partial(_column_partition, column=column)


def _column_partition(table: pa.Table, partitions: int, column: str) -> np.ndarray:
    return bucket_of(table[column].to_numpy(), partitions)


def _concat(tables: tuple[pa.Table | None, ...]) -> pa.Table | None:
    """The tables with rows, in order (an empty block may lack the schema); None if there are none."""
    full = [t for t in tables if t is not None and t.num_rows]
    return pa.concat_tables(full) if full else None


def _split(table: pa.Table | None, prepare: Callable | None, partition: Callable, partitions: int, *args):
    if table is None or not table.num_rows:  # nothing to prepare (an empty block may even lack columns)
        return [table] * partitions if partitions > 1 else table
    table = prepare(table, *args) if prepare else table
    part = partition(table, partitions)
    order = np.argsort(part, kind="stable")  # one take, then slices: rows keep their block order
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    table = table.take(pa.array(order, pa.int64()))
    pieces = [table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(partitions)]
    return pieces if partitions > 1 else pieces[0]


def _reduce(reduce: Callable, *parts: pa.Table):
    table = _concat(parts)
    return reduce(table) if table is not None else None


def hash_shuffle(blocks: list, partition: Callable, reduce: Callable, partitions: int,
                 prepare: Callable | None = None, args: tuple = ()) -> list:
    """Refs of `reduce(rows of partition i)` for i < partitions (None for a partition without rows).

    Each block is a map task: `prepare(table, *args)` (optional), then `partition(table, partitions)` -> an
    int array in [0, partitions) for its rows. Reduce task i concatenates its rows from every block, in block
    order, and calls `reduce(table)`. Arguments are picklable callables (functools.partial for settings);
    `args` may be object refs, which Ray resolves before the task starts (a `ray.get` inside it would block
    its worker, and Ray starts another process for the waiting tasks: ~1.5 s apiece on 2 cores).
    """
    import ray

    splitter = ray.remote(num_cpus=1, num_returns=partitions)(_split)
    reducer = ray.remote(num_cpus=1)(_reduce)
    pieces = [splitter.remote(b, prepare, partition, partitions, *args) for b in blocks]
    if partitions == 1:
        pieces = [[p] for p in pieces]
    return [reducer.remote(reduce, *[p[i] for p in pieces]) for i in range(partitions)]


def map_blocks(blocks: list, fn: Callable) -> list:
    """Refs of fn(table) for each block (a task each)."""
    import ray

    task = ray.remote(num_cpus=1)(_apply)
    return [task.remote(fn, b) for b in blocks]


def join_partitions(left: list, right: list, fn: Callable) -> list:
    """Refs of fn(left[i], right[i]) (a task each): two shuffles' outputs partitioned alike (`bucket_of` of
    the same key) meet partition by partition, as a join."""
    import ray

    task = ray.remote(num_cpus=1)(_apply)
    return [task.remote(fn, a, b) for a, b in zip(left, right, strict=True)]


def combine(refs: list, fn: Callable):
    """A ref of fn(*values of refs), computed in one task: what a driver would gather, kept off the driver."""
    import ray

    return ray.remote(num_cpus=1)(_apply).remote(fn, *refs)


def _apply(fn: Callable, *tables):
    return fn(*tables)


def resolve(value):
    """The value behind an object ref handed to a task inside another argument (a functools.partial, a Ray
    Data fn_kwargs): Ray resolves only refs passed as arguments themselves. Anything else as it is.
    Whoever launches such tasks first waits for the ref to be computed (`ready`), so that the `ray.get`
    here finds it instead of blocking the worker (Ray would start another one for the waiting tasks)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def ready(*refs) -> None:
    """Waits until the tasks behind `refs` have finished, without fetching their values here."""
    import ray

    ray.wait(list(refs), num_returns=len(refs), fetch_local=False)


def gather(refs: list, schema: pa.Schema) -> pa.Table:
    """The tables behind `refs` (None ones skipped) as one table on the driver."""
    import ray

    return pa.concat_tables([schema.empty_table(), *(t for t in ray.get(refs) if t is not None)])
