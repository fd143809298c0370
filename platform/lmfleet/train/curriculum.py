"""Curriculum learning: easy samples first, harder ones let in as training goes (`curriculum:` of pretrain).

Competence-based curriculum (Platanios et al. 2019, "Competence-based Curriculum Learning for Neural
Machine Translation"): every training sample has a difficulty score; at step s a stream draws only from
its easiest c(s) fraction of samples (hardest, with `order: hard_first`), where the competence c grows from
`start_fraction` to 1 over `steps` steps, linearly or in `buckets` equal jumps (`pacing: step`, baby steps).
Each stream of the batch plan (one per source with a mixing schedule) has its own pool, so the mixing
weights still hold. A step's draw from the pool is a seeded permutation of the pool from (seed, stream,
step): no state beyond the step, so resume, a resized worker group and any dp layout draw the same batches.
After the curriculum the plan walks its usual per-epoch permutations from their start.

Scores, computed by the driver before training (lmfleet.train.scoring; one number per train sample):
- `length`: a sample's mean document length in tokens (its real tokens / its document segments): packed
  samples all have seq_len tokens, so the documents they hold are what differs;
- `loss`: a proxy model's mean token loss on the sample (e.g. an earlier pretrain stage), one Ray task per
  packed shard;
- `column:NAME`: a numeric field of the records the data stage kept per sample (`pack.columns`: the
  token-weighted mean over the sample's documents). Samples without a value (NaN) come last in either order:
  they join the pool at the end of the curriculum.
"""

from __future__ import annotations

import math

import numpy as np

from lmfleet.train.config import CurriculumConfig


class Curriculum:
    def __init__(self, cfg: CurriculumConfig, scores: np.ndarray, total_steps: int):
        self.cfg, self.scores = cfg, scores
        self.steps = cfg.steps or max(1, total_steps // 2)

    def fraction(self, step: int) -> float:
        """The competence c(step): the fraction of each stream's samples it draws from at `step` (0-based)."""
        c = self.cfg
        if step >= self.steps:
            return 1.0
        progress = step / self.steps
        if c.pacing == "step":
            progress = math.floor(c.buckets * progress) / c.buckets
        return c.start_fraction + (1.0 - c.start_fraction) * progress

    def ordered(self, indices: np.ndarray) -> np.ndarray:
        """`indices` (global sample ids) easiest first (hardest first for hard_first); ties in index order,
        unscored (NaN) samples last."""
        s = self.scores[indices]
        return indices[np.lexsort((indices, -s if self.cfg.order == "hard_first" else s, np.isnan(s)))]

    def draw(self, ordered: np.ndarray, n: int, step: int, seed: int) -> np.ndarray:
        """`n` samples from the pool of `step`: a seeded permutation of the pool (repeating it if n is larger)."""
        pool = ordered[: max(1, math.ceil(self.fraction(step) * len(ordered)))]
        rng = np.random.default_rng([seed, step])
        reps = -(-n // len(pool))
        return np.concatenate([pool[rng.permutation(len(pool))] for _ in range(reps)])[:n]


def length_scores(tokens: np.ndarray, positions: np.ndarray, pad: int) -> np.ndarray:
    """Mean document length of each sample of a shard (real tokens / document segments)."""
    real = tokens != pad
    segments = ((positions == 0) & real).sum(axis=1)
    return real.sum(axis=1) / np.maximum(segments, 1)
