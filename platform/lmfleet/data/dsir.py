"""Data selection by importance resampling toward a target distribution (DSIR: Xie, Santurkar, Ma, Liang
2023, "Data Selection for Language Models via Importance Resampling", NeurIPS), pure numpy over texts.

A document's features are its hashed word n-grams (lower-cased `\\w+` words; crc32 of the n-gram, seeded,
modulo `buckets`). The target (reference texts) and the raw corpus are each a bag-of-n-grams model: the
smoothed bucket frequencies. A document's log importance weight is the sum over its features of
log p_target - log p_raw, i.e. log p_target(x) / p_raw(x) under the two models. Resampling k documents without
replacement in proportion to the weights is the Gumbel top-k trick: the k largest log weight + Gumbel noise,
the noise a seeded hash of the document's uid (so a selection is a function of the seed, not of block
layout or worker count).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from lmfleet.data.mixing import unit_hash

WORD = re.compile(r"\w+")
SELECTION_EPOCH = -5  # unit_hash stream of the selection noise (-1..-4: val split, pack order, ...)


def features(text: str, buckets: int, ngrams: tuple[int, ...], seed: int) -> np.ndarray:
    """The bucket of each word n-gram of `text` (n in `ngrams`)."""
    words = WORD.findall(text.lower())
    grams = [" ".join(words[i : i + n]) for n in ngrams for i in range(len(words) - n + 1)]
    start = zlib.crc32(str(seed).encode())
    return np.fromiter((zlib.crc32(g.encode(), start) % buckets for g in grams), dtype=np.int64, count=len(grams))


def bucket_counts(texts, buckets: int, ngrams: tuple[int, ...], seed: int) -> np.ndarray:
    """How often each bucket occurs over `texts`."""
    total = np.zeros(buckets, dtype=np.int64)
    for text in texts:
        total += np.bincount(features(text, buckets, ngrams, seed), minlength=buckets)
    return total


def log_frequencies(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """log of the add-`smoothing` bucket frequencies."""
    return np.log((counts + smoothing) / (counts.sum() + smoothing * len(counts)))


def log_weights(texts, log_ratio: np.ndarray, ngrams: tuple[int, ...], seed: int) -> np.ndarray:
    """Each text's log importance weight: its features' log p_target - log p_raw (`log_ratio`), summed."""
    return np.array([float(log_ratio[features(t, len(log_ratio), ngrams, seed)].sum()) for t in texts])


def gumbel(uids: np.ndarray, seed: int) -> np.ndarray:
    """Standard Gumbel noise per uid (seeded): -log(-log(u)), u uniform in (0, 1)."""
    u = unit_hash(uids, seed, SELECTION_EPOCH)
    u = np.clip(u, 1e-300, 1.0 - 2**-53)
    return -np.log(-np.log(u))


def top_k(keys: np.ndarray, uids: np.ndarray, k: int) -> np.ndarray:
    """The uids of the k largest keys (ties: the smaller uid), sorted."""
    order = np.lexsort((uids, -keys))
    return np.sort(uids[order[:k]])


def top_size(keys: np.ndarray, uids: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
    """The uids of the largest keys, in key order (ties: the smaller uid), until their sizes reach `budget` (the
    document that crosses it included), sorted. Gumbel top-k with a size budget instead of a count."""
    order = np.lexsort((uids, -keys))
    reached = np.cumsum(sizes[order]) >= budget
    k = int(np.argmax(reached)) + 1 if reached.any() else len(order)
    return np.sort(uids[order[:k]])
