"""Compiled loops of :mod:`lmfleet.data.minhash` (numba): word tokens' hashes, shingle hashes and the
fast similarity sketch, one pass over a batch's characters, tokens or a document's elements where the
numpy versions made several array passes (the sketch: ~6 per round over every unfinished document).

Measured on dedup_bench's corpus (5,670 docs, 3.2 M characters, 487k shingles, one core): text to
shingle hashes 22 -> 11 ms, sketch 37 -> 10 ms. Compiled on a process's first call and cached on disk
(``cache=True``: beside this file, or numba's user cache dir where that is read-only): 1.6 s once per
machine, 0.18 s to load in a new process after that; 1.6 s in every process where neither is writable.

Everything here is integer arithmetic modulo 2**64 on ``uint64``: every operand is a uint64 (numba,
like numpy, would turn ``uint64 op int64`` into float64).
"""

from __future__ import annotations

import logging

import numba
import numpy as np

_U = np.uint64
_log = logging.getLogger(__name__)
_uncached: list[str] = []


def _jit(**options):
    """``numba.njit(nogil=True)``, cached on disk where numba finds a writable place for it (beside this
    file, NUMBA_CACHE_DIR, or the user's cache dir). Where it finds none (a read-only install and home,
    as in a container with a read-only root filesystem) ``cache=True`` raises at import: compile in
    every process instead (~1.6 s at its first call) and say so once."""
    def decorate(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
            if not _uncached:
                _log.warning("numba cannot cache lmfleet's MinHash kernels (%s); each process compiles them "
                             "(~1.6 s). Set NUMBA_CACHE_DIR to a writable directory to cache them.", e)
            _uncached.append(fn.__name__)
            return numba.njit(nogil=True, **options)(fn)
    return decorate


@_jit(inline="always")
def _splitmix64(z):
    z ^= z >> _U(30)
    z *= _U(0xBF58476D1CE4E5B9)
    z ^= z >> _U(27)
    z *= _U(0x94D049BB133111EB)
    z ^= z >> _U(31)
    return z


# 1 for the bytes of ASCII word characters (\\w: letters, digits, "_") and for WORD_HIGH, which the
# caller puts where a character >= 128 is a word character (and NONWORD_HIGH where it is not).
WORD_HIGH, NONWORD_HIGH = 0x80, 0x81
IS_WORD = np.array([chr(c).isalnum() or c == 0x5F if c < 128 else c == WORD_HIGH for c in range(256)],
                   dtype=np.uint8)
_BYTE_MASK = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)  # a word's first n bytes


@_jit(inline="always")
def _load8(words, pos):
    """The 8 bytes from byte offset ``pos`` as a little-endian uint64, from aligned words."""
    shift = _U((pos & 7) << 3)
    out = words[pos >> 3] >> shift
    return out | ((words[(pos >> 3) + 1] << _U(1)) << (_U(63) - shift))  # a shift by 64 must give 0


@_jit()
def word_token_hashes(raw, sym_words, wide_pos, wide_val, is_word, consts):
    """Hash every maximal run of word characters (``is_word[raw[i]]``) of a text. ``sym_words``: one
    symbol byte per character (ASCII letters case-folded by the 0x20 bit, digits, "_" -> 0x7F, Latin-1
    lowered) as aligned little-endian uint64 words with 24 bytes to spare; ``wide_pos`` / ``wide_val``
    (sorted): the characters whose lowered code point is >= 256. Returns (hashes, token starts).

    A token of at most 16 characters without wide ones hashes as one or two 8-byte words (times
    ``consts[0]`` / ``consts[1]``), any other as ``sum_p symbol[p] * G**p ^ consts[3]`` with the wide
    code points as symbols; then ``^ length * consts[2]`` and splitmix64.
    """
    chunk0, chunk1, len_mul, poly_tag, g = consts[0], consts[1], consts[2], consts[3], consts[4]
    n = raw.size
    starts = np.empty(n // 2 + 2, np.int64)
    ends = np.empty(n // 2 + 2, np.int64)
    # Pass 1, branch-free: one loop branching at every token boundary took 8.2 ms on dedup_bench's ASCII
    # text (2.3 M characters; mispredicted branches), the caller with these two passes 4.6 ms.
    n_start = n_end = 0
    prev = 0
    for i in range(n):
        w = is_word[raw[i]]
        starts[n_start] = i
        n_start += w & (prev ^ 1)
        ends[n_end] = i
        n_end += prev & (w ^ 1)
        prev = w
    ends[n_end] = n
    n_end += prev
    hashes = np.empty(n_start, np.uint64)
    masks = _BYTE_MASK  # a global array: numba compiles it in as a constant
    wp = 0
    for t in range(n_start):
        s, e = starts[t], ends[t]
        length = e - s
        while wp < wide_pos.size and wide_pos[wp] < s:
            wp += 1
        if length <= 16 and not (wp < wide_pos.size and wide_pos[wp] < e):
            h = (_load8(sym_words, s) & masks[min(length, 8)]) * chunk0
            h += (_load8(sym_words, s + 8) & masks[max(min(length - 8, 8), 0)]) * chunk1
        else:
            h = _U(0)
            gp = _U(1)
            for p in range(s, e):
                if wp < wide_pos.size and wide_pos[wp] == p:
                    x = _U(wide_val[wp])
                    wp += 1
                else:
                    x = (sym_words[p >> 3] >> _U((p & 7) << 3)) & _U(0xFF)
                h += x * gp
                gp *= g
            h ^= poly_tag
        h ^= _U(length) * len_mul
        hashes[t] = _splitmix64(h)
    return hashes, starts[:n_start]


@_jit()
def shingle_hashes(th, tok_off, mul, seed_key, len_mul):
    """Seeded 64-bit hash and doc of every shingle, grouped by doc in doc order: doc d's tokens are
    ``th[tok_off[d]:tok_off[d + 1]]``; a shingle of n tokens hashes as ``splitmix64(sum_i th[i] * mul[i] +
    n * len_mul + seed_key)``: the contiguous ``mul.size``-token windows, or all of a doc's 1 <= n <
    ``mul.size`` tokens."""
    ngram = mul.size
    n_docs = tok_off.size - 1
    total = 0
    for d in range(n_docs):
        cnt = tok_off[d + 1] - tok_off[d]
        total += max(cnt - ngram + 1, 1) if cnt > 0 else 0
    v = np.empty(total, np.uint64)
    doc = np.empty(total, np.int64)
    at = 0
    for d in range(n_docs):
        lo, hi = tok_off[d], tok_off[d + 1]
        width = min(hi - lo, ngram)
        if width == 0:
            continue
        add = _U(width) * len_mul + seed_key
        for i in range(lo, max(hi - ngram + 1, lo + 1)):
            acc = add
            for j in range(width):
                acc += th[i + j] * mul[j]
            v[at] = _splitmix64(acc)
            doc[at] = d
            at += 1
    return v, doc


@_jit()
def fast_similarity_sketch(v, doc, n_docs, k, shift, steps, round_xor, round_mul, step_tag):
    """Signatures (n_docs, k) uint32 of elements ``v`` (seeded 64-bit hashes) of docs ``doc`` (grouped
    by doc in doc order, as ``shingle_hashes`` gives them); see ``minhash._fast_similarity_sketch``. ``shift`` = 64 - log2(k) when k is a power
    of two (bins by the hash's high bits), else 0 (multiply-shift range reduction)."""
    start = np.zeros(n_docs + 1, np.int64)  # doc d's elements: v[start[d]:start[d + 1]]
    for i in range(v.size):
        if i and doc[i] < doc[i - 1]:
            raise ValueError("fast_similarity_sketch: elements must come grouped by doc, in doc order")
        start[doc[i] + 1] += 1
    for d in range(n_docs):
        start[d + 1] += start[d]
    most = 0
    for d in range(n_docs):
        most = max(most, start[d + 1] - start[d])
    out = np.full((n_docs, k), np.uint32(0xFFFFFFFF), np.uint32)  # EMPTY_VALUE for docs without any
    first_round = np.empty(k, np.int32)  # the round that first reached each bin, -1: none yet
    bins = np.empty(most, np.int32)  # int32: twice the elements a vector instruction moves
    step = np.empty(most, np.int32)
    hits = np.empty(most, np.int32)
    ku = _U(k)
    n_steps = _U(steps.size)
    low32 = _U(0xFFFFFFFF)
    for d in range(n_docs):
        lo, hi = start[d], start[d + 1]
        if hi == lo:
            continue
        row = out[d]
        first_round[:] = -1
        filled = 0
        for j in range(hi - lo):  # round 0: one-permutation hashing
            x = v[lo + j]
            if shift:
                b = np.int64(x >> _U(shift)) if shift < 64 else np.int64(0)
            else:
                b = np.int64(((x >> _U(32)) * ku) >> _U(32))
            bins[j] = b
            value = np.uint32(x & low32)
            if first_round[b] < 0:
                first_round[b] = 0
                row[b] = value
                filled += 1
            elif value < row[b]:
                row[b] = value
        if filled == k:
            continue
        for j in range(hi - lo):
            z = _splitmix64(v[lo + j] ^ step_tag)
            step[j] = steps[np.int64(((z >> _U(32)) * n_steps) >> _U(32))]
        # Each round in three loops: move every element to its next bin (vectorized), list those that
        # land in a bin empty before the round (branch-free), then value only those. One loop branching
        # per element cost 2x (11 vs 5.7 ms on dedup_bench's corpus): whether an element lands in an
        # empty bin is a coin flip in the early rounds.
        m = hi - lo
        for r in range(1, k):  # by round k every element has visited every bin
            for j in range(m):
                b = bins[j] + step[j]
                bins[j] = b - (k if b >= k else 0)
            n_hit = 0
            for j in range(m):
                hits[n_hit] = j
                n_hit += first_round[bins[j]] < 0
            mask = round_xor[r]
            for t in range(n_hit):
                j = hits[t]
                b = bins[j]
                value = np.uint32(((v[lo + j] ^ mask) * round_mul) >> _U(32))
                if first_round[b] != r:  # a bin keeps the minimum of the first round that reached it
                    first_round[b] = r
                    row[b] = value
                    filled += 1
                elif value < row[b]:
                    row[b] = value
            if filled == k:
                break
    return out
