"""Deterministic, resumable batches over the packed shards.

Every step draws `global_batch` sample indices. Each source (or one stream over all sources when
no mixing schedule is set) walks its own seeded permutation of its samples, epoch after epoch; the
number drawn per source follows the schedule's weights at that step (largest remainder). All ranks
compute the same plan, so no communication is needed; data-parallel rank r takes the r-th
contiguous slice. The whole data position is the per-stream cursors, saved with the checkpoint:
resume and a different worker count both continue the exact same sequence of global batches. With a
curriculum (lmfleet.train.curriculum), its steps draw from each stream's easiest samples instead,
statelessly, and the streams' walks start after it.
"""

from __future__ import annotations

import numpy as np
import torch

from lmfleet.data.mixing import MixingSchedule
from lmfleet.data.packing import PackedDataset
from lmfleet.train.config import ObjectiveConfig
from lmfleet.train.curriculum import Curriculum
from lmfleet.train.objectives import IGNORE, ObjectiveTokens, make_example, sample_rng


class Stream:
    """An endless seeded walk over a set of sample indices, reshuffled each epoch."""

    def __init__(self, indices: np.ndarray, seed: int):
        self.indices, self.seed, self.cursor = indices, seed, 0
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation), built once per epoch
        self.epochs = np.empty(0, dtype=np.int64)  # the epoch of each index the last `take` returned

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.indices)))
        return self._perm[1]

    def take(self, n: int) -> np.ndarray:
        out, epochs = [], []
        while n > 0:
            epoch, offset = divmod(self.cursor, len(self.indices))
            chunk = self._permutation(epoch)[offset : offset + n]
            out.append(self.indices[chunk])
            epochs.append(np.full(len(chunk), epoch, dtype=np.int64))
            self.cursor += len(chunk)
            n -= len(chunk)
        self.epochs = np.concatenate(epochs) if epochs else np.empty(0, dtype=np.int64)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to weights (largest remainder, ties by name)."""
    names = sorted(weights)
    exact = np.array([weights[k] for k in names], dtype=np.float64) * total / sum(weights.values())
    counts = np.floor(exact).astype(int)
    rest = total - counts.sum()
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), names[i]))
    for i in order[:rest]:
        counts[i] += 1
    return dict(zip(names, counts.tolist(), strict=True))


class BatchPlan:
    def __init__(self, source_ranges: dict[str, list[tuple[int, int]]], global_batch: int, seed: int,
                 schedule: MixingSchedule | None, curriculum: Curriculum | None = None):
        self.global_batch, self.schedule, self.curriculum = global_batch, schedule, curriculum
        if schedule is None:
            every = np.concatenate([np.arange(a, b) for r in source_ranges.values() for a, b in r])
            self.streams = {"all": Stream(np.sort(every), seed)}  # index order, whatever the dict order
        else:
            self.streams = {
                name: Stream(np.concatenate([np.arange(a, b) for a, b in ranges]), seed + 7919 * (i + 1))
                for i, (name, ranges) in enumerate(sorted(source_ranges.items()))
            }
        if curriculum is not None:  # each stream's samples, easiest first
            self.ordered = {k: curriculum.ordered(s.indices) for k, s in self.streams.items()}
        spans = sorted((a, name) for name, ranges in source_ranges.items() for a, _ in ranges)
        self._starts = np.array([a for a, _ in spans])
        self._names = [name for _, name in spans]

    def sources(self, indices: np.ndarray) -> list[str]:
        """Source name of each sample index (shards of a source are contiguous index ranges)."""
        return [self._names[i] for i in np.searchsorted(self._starts, indices, side="right") - 1]

    def next_batch(self, step: int) -> np.ndarray:
        """The global batch of `step` (call once per step, in order); `self.epochs`: the epoch of each sample in it
        (how many times its stream went through all its samples before), which seeds its corruption."""
        if self.schedule is None:
            counts = {"all": self.global_batch}
        else:
            counts = allocate(self.global_batch, {k: w for k, w in self.schedule.weights(step).items()
                                                  if k in self.streams})
        parts, epochs = [], []
        for k, n in sorted(counts.items()):
            stream = self.streams[k]
            if self.curriculum is not None and step < self.curriculum.steps:
                # stateless: from (stream seed, step); its samples' corruption is seeded by the step
                parts.append(self.curriculum.draw(self.ordered[k], n, step, stream.seed))
                epochs.append(np.full(n, step, dtype=np.int64))
            else:
                parts.append(stream.take(n))
                epochs.append(stream.epochs)
        self.epochs = np.concatenate(epochs)
        return np.concatenate(parts)

    def state_dict(self) -> dict:
        return {"cursors": {k: s.cursor for k, s in self.streams.items()},
                "schedule": self.schedule.state_dict() if self.schedule else None}

    def load_state_dict(self, state: dict) -> None:
        for k, cursor in state["cursors"].items():
            self.streams[k].cursor = cursor
        if self.schedule is not None and state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])


def dp_slice(batch: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    per = len(batch) // dp_size
    return batch[dp_rank * per : (dp_rank + 1) * per]


def load_batch(ds: PackedDataset, indices: np.ndarray, pad_id: int, device, objective: ObjectiveConfig | None = None,
               tokens: ObjectiveTokens | None = None, seed: int = 0, epochs: np.ndarray | None = None,
               split: int = 0) -> tuple[torch.Tensor, ...]:
    """inputs, positions, targets for a set of samples: next-token prediction (targets of pad tokens ignored), or
    `objective`'s examples, each sample's corruption seeded by (seed, sample, epoch, split)."""
    rows = [ds[int(i)] for i in indices]
    if objective is None or objective.kind == "clm":
        ids = torch.from_numpy(np.stack([r[0] for r in rows]))
        positions = torch.from_numpy(np.stack([r[1] for r in rows]))
        targets = ids[:, 1:].clone()
        targets[targets == pad_id] = IGNORE
        # contiguous: pipeline stages send these through gloo point-to-point
        return ids[:, :-1].contiguous().to(device), positions[:, :-1].contiguous().to(device), targets.to(device)
    epochs = np.zeros(len(indices), dtype=np.int64) if epochs is None else epochs

    def other(rng):  # mlm_nsp's NotNext: a random sample of the same split
        return ds[int(rng.integers(len(ds)))]

    examples = [make_example(objective, t, p, sample_rng(seed, int(i), int(e), split), tokens, other)
                for (t, p), i, e in zip(rows, indices, epochs, strict=True)]
    return tuple(torch.from_numpy(np.stack([getattr(x, k) for x in examples])).contiguous().to(device)
                 for k in ("inputs", "positions", "targets"))
