"""Vectorized MinHash, LSH banding and connected components for near-duplicate detection (numpy; the
per-character, per-shingle and per-round loops compiled with numba in :mod:`minhash_kernels`).

Shingling contract (the tests check it against a brute-force reference)
----------------------------------------------------------------------
* Every text is normalized with :func:`normalize_for_hash`: NFKC, then ``str.lower``.
* Word mode (default): tokens are the maximal runs of ``\\w`` characters exactly as Python's ``re``
  defines ``\\w`` for str patterns, i.e. ``re.findall(r"\\w+", normalize_for_hash(text))``.
  Shingles are the contiguous ``ngram``-token sequences.  A document with 1 <= tokens < ``ngram``
  has exactly one shingle: the sequence of all its tokens.
* Char mode (``char_ngrams=True``): the normalized text with whitespace collapsed
  (``" ".join(normalized.split())``, so also stripped); shingles are its ``ngram``-character
  substrings, and a non-empty text shorter than ``ngram`` is one shingle (the whole text).
* Only the shingle SET matters: repeating a shingle does not change the signature.
* A document with no shingle at all (empty; whitespace- or punctuation-only in word mode) gets
  ``EMPTY_VALUE`` (0xFFFFFFFF) in every position.  Two such documents therefore compare as identical
  (their empty sets are equal), and against a non-empty document the estimate is ~0.

Signatures
----------
``uint32`` arrays of shape ``(n_docs, num_perm)`` (32-bit values halve memory; two different shingle
minima collide with probability ~2**-32, negligible next to the sampling error of ``num_perm`` bins).
They come from fast similarity sketching (Dahlgaard, Knudsen, Thorup, FOCS 2017): each shingle's
seeded 64-bit hash picks a bin (high bits) and a value (low 32 bits), as in one-permutation hashing;
the shingles of a doc with bins still empty go on in rounds, each to the next bin of its own
permutation of the bins with a new value, until every bin holds the minimum of the first round that
reached it.  ``P[sig_a[i] == sig_b[i]] = J(A, B)`` for every bin, as for classic k-permutation MinHash,
and the bins are sampled without replacement, so the estimate's error is below k-permutation MinHash's
(0.71 of datasketch's RMSE on stdlib docstrings + C4, benchmarks/dedup_bench.py) for about
``max(n, num_perm * ln(num_perm))`` hashes per doc of ``n`` shingles instead of ``n * num_perm``.
(The one-permutation hashing with densification this replaced copied filled bins into empty ones:
1.06x datasketch's error on short documents.)

Hashing is deterministic for a given seed (no Python ``hash``), independent of how documents are
batched, and different seeds give unrelated signatures.  Python runs per batch of documents (and per
document only for the Unicode normalization of non-ASCII docs); the loops over characters, tokens,
shingles and the sketch's rounds are numba kernels (14x datasketch's ``update_batch`` on prebuilt
shingles, from text, on dedup_bench's corpus; the numpy versions they replaced: 5.3x the same day).

LSH and clustering: :func:`optimal_bands` (datasketch's parameter choice), :func:`band_hashes`,
:func:`candidate_pairs`, :func:`estimate_jaccard_rows` for verification, and
:func:`connected_components` to turn verified pairs into duplicate clusters.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

import numpy as np

from lmfleet.data import minhash_kernels as kernels

__all__ = [
    "EMPTY_VALUE",
    "band_hashes",
    "candidate_pairs",
    "connected_components",
    "estimate_jaccard",
    "estimate_jaccard_rows",
    "minhash_signatures",
    "normalize_for_hash",
    "optimal_bands",
    "splitmix64",
]

EMPTY_VALUE = np.uint32(0xFFFFFFFF)

_MASK64 = (1 << 64) - 1
_U64 = np.uint64


def _mix_int(x: int) -> int:
    """splitmix64 on a Python int (used to derive constants from seeds)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _rand64(tag: int, i: int = 0) -> int:
    return _mix_int(_mix_int(tag & _MASK64) ^ (i & _MASK64))


def splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, in place on a uint64 array (a full-avalanche bijection).

    A strong mixer matters: order-preserving hashes (e.g. small-multiplier multiply-shift) make all
    bins agree and every pair look similar.
    """
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


# Fixed (seed-independent) hashing constants; the seed enters only when shingle hashes are mixed.
_G = 0x9E3779B97F4A7C15
_LEN_MUL = _U64(_rand64(0x1E9) | 1)
_CHAR_ADD = _U64(_rand64(0xC4A2))
_MAX_NGRAM = 64
_OFFSET_MUL = np.array([_rand64(0x5A1, k) | 1 for k in range(_MAX_NGRAM)], dtype=np.uint64)

_WORD_RE = re.compile(r"\w")
# Per non-ASCII code point c, lazily filled: (ord(chr(c).lower()) << 1) | is_word(chr(c).lower()), or -1.
# Each distinct code point is classified once by ``str.lower`` and ``re`` themselves, so the vectorized
# path agrees with ``re.findall(r"\w+", normalize_for_hash(text))`` by construction.
_HIGH_INFO: np.ndarray | None = None
# The only code points whose ``str.lower`` is not a per-character 1:1 map: U+0130 (two characters) and
# U+03A3 (final sigma depends on context).  Docs containing them are lowercased by ``str.lower`` first.
_SPECIAL_LOWER = ("\u0130", "\u03a3")


def normalize_for_hash(text: str) -> str:
    """NFKC-normalize and lowercase ``text`` (the form that is shingled)."""
    if text.isascii():  # NFKC is the identity on ASCII
        return text.lower()
    return unicodedata.normalize("NFKC", text).lower()


def _prenormalize(text: str) -> str:
    """The per-document Python part of :func:`normalize_for_hash`: NFKC, and ``str.lower`` only where
    it is not a per-character map.  Everything else is lowercased vectorized later, because
    ``str.lower`` on non-ASCII strings costs several ns per character."""
    if not unicodedata.is_normalized("NFKC", text):
        text = _nfkc(text)
    if _SPECIAL_LOWER[0] in text or _SPECIAL_LOWER[1] in text:
        text = text.lower()
    return text


def _nfkc(text: str, piece: int = 256) -> str:
    """``unicodedata.normalize("NFKC", text)``, normalizing only the pieces that need it (4x faster on
    web text, where a few no-break spaces or ligatures would otherwise renormalize the whole doc).

    Splitting right before an ASCII character is exact: ASCII characters have canonical combining
    class 0 and NFKC_Quick_Check=Yes, so nothing reorders or composes across them.
    """
    out, i = [], 0
    while i < len(text):
        j = text.find(" ", i + max(piece, 1))
        j = len(text) if j < 0 else j
        part = text[i:j]
        out.append(part if unicodedata.is_normalized("NFKC", part) else unicodedata.normalize("NFKC", part))
        i = j
    return "".join(out)


def _high_info(c: np.ndarray) -> np.ndarray:
    global _HIGH_INFO
    if _HIGH_INFO is None:
        _HIGH_INFO = np.full(0x110000, -1, dtype=np.int32)
    info = _HIGH_INFO[c]
    if (info < 0).any():
        for u in np.unique(c[info < 0]).tolist():
            low = chr(u).lower()
            low = low if len(low) == 1 else chr(u)  # U+0130: its docs were lowercased by str.lower
            _HIGH_INFO[u] = ord(low) << 1 | (_WORD_RE.match(low) is not None)
        info = _HIGH_INFO[c]
    return info


def _code_points(text: str) -> np.ndarray:
    if text.isascii():  # 1 byte per character instead of 4
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _lowered_code_points(text: str) -> np.ndarray:
    """``[ord(c) for c in text]`` after per-character lowercasing, as uint64 (char-shingle mode)."""
    cp = _code_points(text)
    low = cp.astype(np.uint8)  # exact for ASCII positions; the others are overwritten below
    low |= ((low - np.uint8(ord("A"))) < 26).view(np.uint8) << np.uint8(5)
    x = low.astype(np.uint64)
    if cp.dtype != np.uint8:
        high = np.flatnonzero(cp >= 128)
        x[high] = _high_info(cp[high]) >> 1
    return x


# word_token_hashes' constants: the two 8-byte words' multipliers, length multiplier, polynomial tag, G.
_TOKEN_CONSTS = np.array(
    [_rand64(0xC4C, 0) | 1, _rand64(0xC4C, 1) | 1, int(_LEN_MUL), _rand64(0x71DE), _G], dtype=np.uint64
)


def _word_token_hashes(joined: str, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash every ``\\w+`` token of ``joined``; return (token hashes, first-token index per doc + end).

    ``joined`` must start and end with a separator.  The hash is a function of the lowercased token
    only, by one of two routes chosen by the token itself: tokens of at most 16 characters that are all
    < 256 after lowercasing (nearly all tokens of European text) are read as one or two 8-byte words of
    one byte per character, so no per-character 64-bit arithmetic is needed; longer tokens and tokens
    with other characters get a polynomial hash of their characters (``minhash_kernels``).
    """
    cp = _code_points(joined)
    raw = cp.astype(np.uint8)  # exact for ASCII positions; the others are patched below
    sym = np.empty(-(-raw.size // 8) * 8 + 24, dtype=np.uint8)  # whole words, and 8 bytes to spare
    np.bitwise_or(raw, 0x20, out=sym[: raw.size])  # ASCII word characters' symbols: "_" -> 0x7F
    sym[raw.size :] = 0
    wide_pos = np.empty(0, dtype=np.int64)
    wide_val = np.empty(0, dtype=np.int32)
    if cp.dtype != np.uint8:
        high = np.flatnonzero(cp >= 128)
        info = _high_info(cp[high])
        low = info >> 1
        raw[high] = np.where(info & 1, kernels.WORD_HIGH, kernels.NONWORD_HIGH)
        sym[high] = (np.where(low < 128, low | 0x20, low) & 0xFF).astype(np.uint8)  # Latin-1: itself
        wide = low >= 256
        wide_pos, wide_val = high[wide], low[wide]
    hashes, starts = kernels.word_token_hashes(
        raw, sym.view("<u8"), wide_pos, wide_val, kernels.IS_WORD, _TOKEN_CONSTS
    )
    return hashes, np.searchsorted(starts, doc_starts)


def _shingle_hashes(th: np.ndarray, tok_off: np.ndarray, ngram: int, seed_key: int):
    """Seeded 64-bit hash and doc index of every shingle (contiguous ``ngram`` tokens within a doc; a doc
    with fewer tokens is one shingle of them all), grouped by doc in doc order."""
    return kernels.shingle_hashes(th, tok_off.astype(np.int64, copy=False), _OFFSET_MUL[:ngram],
                                  _U64(seed_key), _LEN_MUL)


_STEP_TAG = _U64(_rand64(0x57E9))
_ROUND_MUL = _U64(_rand64(0x12D) | 1)


@functools.lru_cache(maxsize=16)
def _steps(num_perm: int) -> np.ndarray:
    """The bin steps an element may draw: those coprime with ``num_perm``, so that its bins over rounds
    ``0 .. num_perm - 1`` are a permutation of all bins."""
    return np.array([s for s in range(1, num_perm + 1) if np.gcd(s, num_perm) == 1], dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _round_masks(num_perm: int) -> np.ndarray:
    """Per round r >= 1, the mask of its values: ``((hash ^ mask[r]) * _ROUND_MUL) >> 32`` (round 0's
    value is the low 32 bits of the hash itself). A multiply-shift of the (already mixed) hash: the
    estimate error on real text is splitmix64's (dedup_bench)."""
    return np.array([_rand64(int(_ROUND_MUL), r) for r in range(num_perm)], dtype=np.uint64)


def _fast_similarity_sketch(v: np.ndarray, doc: np.ndarray, n_docs: int, num_perm: int) -> np.ndarray:
    """Signatures (n_docs, num_perm) uint32 of the (seeded) shingle hashes ``v`` of docs ``doc``.

    Round 0 bins every element by its hash's high bits (one-permutation hashing); an element of a doc
    that still has empty bins goes on, round after round, to bin ``(b0 + round * step) mod num_perm``
    (``step`` coprime with ``num_perm``: its bins over ``num_perm`` rounds are a permutation), with a new
    value per round; a bin keeps the smallest value of the first round that reached it. So every bin is
    filled by the doc's own elements within ``num_perm`` rounds, and no bin copies another. A doc of n
    shingles needs about ``num_perm / n * ln(num_perm)`` rounds; the loop is ``minhash_kernels``'.
    """
    k = num_perm
    shift = 64 - (k.bit_length() - 1) if k & (k - 1) == 0 else 0
    return kernels.fast_similarity_sketch(v, doc.astype(np.int64, copy=False), n_docs, k, shift, _steps(k),
                                          _round_masks(k), _ROUND_MUL, _STEP_TAG)


def minhash_signatures(
    texts: Iterable[str],
    *,
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 1,
    char_ngrams: bool = False,
    batch_chars: int = 1 << 18,
    batch_docs: int = 1024,
) -> np.ndarray:
    """MinHash signatures, shape ``(len(texts), num_perm)``, dtype ``uint32`` (see module docstring).

    Work is vectorized over all characters/tokens/shingles of a batch.  Text is processed ``batch_chars``
    characters at a time and the sketch's rounds ``batch_docs`` documents at a time; both only
    trade memory against per-call overhead (~256K characters avoided page faults on fresh memory and
    measured fastest) and never change the result.
    """
    if num_perm < 1:
        raise ValueError("num_perm must be >= 1")
    if not 1 <= ngram <= _MAX_NGRAM:
        raise ValueError(f"ngram must be in [1, {_MAX_NGRAM}]")
    docs, is_ascii = _prepared(texts, char_ngrams)
    seed_key = _rand64(0x5EED, seed)
    lengths = np.array(list(map(len, docs)), dtype=np.int64) + 1
    out = np.empty((len(docs), num_perm), dtype=np.uint32)
    # ASCII docs are batched apart from the others so that their batches stay 1 byte per character.
    for group in (np.flatnonzero(is_ascii), np.flatnonzero(~is_ascii)):
        ends = np.cumsum(lengths[group])
        lo = done = 0
        parts_v, parts_d = [], []
        while lo < group.size:
            # Up to batch_chars characters (but at least one doc) per text batch.
            hi = int(np.searchsorted(ends, ends[lo] - lengths[group[lo]] + batch_chars, side="right"))
            hi = min(max(hi, lo + 1), done + batch_docs)
            v, d = _batch_shingles([docs[i] for i in group[lo:hi].tolist()], ngram, seed_key, char_ngrams)
            parts_v.append(v)
            parts_d.append(d + (lo - done))
            lo = hi
            if lo - done >= batch_docs or lo == group.size:
                v, d = np.concatenate(parts_v), np.concatenate(parts_d)
                out[group[done:lo]] = _fast_similarity_sketch(v, d, lo - done, num_perm)
                done, parts_v, parts_d = lo, [], []
    return out


def _prepared(texts: Iterable[str], char_ngrams: bool) -> tuple[list[str], np.ndarray]:
    """The texts as shingling reads them, and which are ASCII."""
    docs = list(texts)
    is_ascii = np.array(list(map(str.isascii, docs)), dtype=np.bool_)
    for i in np.flatnonzero(~is_ascii).tolist():
        docs[i] = _prenormalize(docs[i])
    if char_ngrams:
        docs = [" ".join(d.split()) for d in docs]  # lowercasing never changes what is whitespace
    return docs, is_ascii


def shingle_sets(texts: Iterable[str], *, ngram: int = 5, seed: int = 1, char_ngrams: bool = False,
                 batch_chars: int = 1 << 18) -> list[np.ndarray]:
    """Each text's distinct shingle hashes, sorted uint64: the shingles (and 64-bit hashes) its signature is
    built from, so |A & B| / |A | B| of two is their exact Jaccard (up to 64-bit collisions: ~n^2 / 2^65
    for n shingles)."""
    values, offsets = shingle_set_arrays(texts, ngram=ngram, seed=seed, char_ngrams=char_ngrams,
                                         batch_chars=batch_chars)
    return np.split(values, offsets[1:-1]) if offsets.size > 1 else []  # (split would give one piece)


def shingle_set_arrays(texts: Iterable[str], *, ngram: int = 5, seed: int = 1, char_ngrams: bool = False,
                       batch_chars: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """`shingle_sets` as one array: text i's are ``values[offsets[i]:offsets[i + 1]]`` (an Arrow list
    array's layout). Vectorized over a batch: a np.unique per text cost twice the shingling."""
    docs, _ = _prepared(texts, char_ngrams)
    seed_key = _rand64(0x5EED, seed)
    values, counts = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    lo = 0
    while lo < len(docs):
        hi, chars = lo, 0
        while hi < len(docs) and (hi == lo or chars + len(docs[hi]) <= batch_chars):
            chars += len(docs[hi]) + 1
            hi += 1
        v, d = _batch_shingles(docs[lo:hi], ngram, seed_key, char_ngrams)
        order = np.lexsort((v, d))
        v, d = v[order], d[order]
        new = np.ones(v.size, dtype=bool)  # the first of each distinct (doc, hash)
        new[1:] = (v[1:] != v[:-1]) | (d[1:] != d[:-1])
        values.append(v[new])
        counts.append(np.bincount(d[new], minlength=hi - lo))
        lo = hi
    return np.concatenate(values), np.concatenate([[0], np.cumsum(np.concatenate(counts))])


def _batch_shingles(docs: list[str], ngram: int, seed_key: int, char_ngrams: bool):
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    if char_ngrams:
        # Characters are the tokens; doc boundaries come from the lengths, so no separator is needed.
        x = _lowered_code_points("".join(docs))
        x *= _U64(_G)
        x += _CHAR_ADD
        th = splitmix64(x)
        tok_off = np.concatenate([[0], np.cumsum(lengths)])
    else:
        # A space before and after every doc keeps tokens from running across documents.
        doc_starts = np.concatenate([[1], 1 + np.cumsum(lengths + 1)])
        th, tok_off = _word_token_hashes(" ".join(["", *docs, ""]), doc_starts)
    return _shingle_hashes(th, tok_off, ngram, seed_key)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures: the fraction of equal positions."""
    sig_a, sig_b = np.asarray(sig_a), np.asarray(sig_b)
    if sig_a.shape != sig_b.shape:
        raise ValueError("signatures must have the same shape")
    return float(np.count_nonzero(sig_a == sig_b)) / sig_a.size


def estimate_jaccard_rows(sigs_a: np.ndarray, sigs_b: np.ndarray) -> np.ndarray:
    """Row-wise :func:`estimate_jaccard` for two ``(n, num_perm)`` arrays -> float64 ``(n,)``."""
    return (np.asarray(sigs_a) == np.asarray(sigs_b)).mean(axis=-1)


def _integrate(f, lo: float, hi: float) -> np.ndarray:
    # Composite Gauss-Legendre (32 panels x 16 nodes): the integrands are polynomials of degree
    # b*r <= num_perm, so this matches an adaptive quadrature to ~1e-12 for any realistic num_perm.
    nodes, weights = np.polynomial.legendre.leggauss(16)
    edges = np.linspace(lo, hi, 33)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    s = ((edges[:-1, None] + edges[1:, None]) / 2 + half * nodes).ravel()
    w = (half * weights).ravel()
    return f(s) @ w


def optimal_bands(
    threshold: float,
    num_perm: int,
    false_positive_weight: float = 0.5,
    false_negative_weight: float = 0.5,
) -> tuple[int, int]:
    """LSH bands ``b`` and rows per band ``r`` (``b * r <= num_perm``) for a Jaccard ``threshold``.

    Minimizes ``fp_w * FP + fn_w * FN`` with ``FP = integral_0^t 1 - (1 - s**r)**b ds`` and
    ``FN = integral_t^1 (1 - s**r)**b ds`` (the probability a pair of similarity ``s`` shares a band is
    ``1 - (1 - s**r)**b``), the same objective and tie-breaking (first in ``b``-then-``r`` order) as
    datasketch's ``MinHashLSH``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError("threshold must be in [0, 1]")
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    error = np.empty(len(pairs))
    for lo in range(0, len(pairs), 2048):  # chunks bound the (pairs x nodes) temporaries
        b, r = pairs[lo : lo + 2048, :1].astype(float), pairs[lo : lo + 2048, 1:].astype(float)
        fp = _integrate(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
        fn = _integrate(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1.0)
        error[lo : lo + 2048] = false_positive_weight * fp + false_negative_weight * fn
    best = int(np.argmin(error))  # first minimum, as datasketch's strict "<" scan
    return int(pairs[best, 0]), int(pairs[best, 1])


def band_hashes(signatures: np.ndarray, b: int, r: int, seed: int = 0) -> np.ndarray:
    """One uint64 hash per LSH band: ``(n, num_perm)`` signatures -> ``(n, b)``.

    Band ``j`` covers columns ``[j*r, (j+1)*r)``; its index is mixed in, so equal values in different
    bands give different hashes.  Equal band contents always give equal hashes.
    """
    sig = np.asarray(signatures)
    if sig.ndim != 2 or b * r > sig.shape[1] or b < 1 or r < 1:
        raise ValueError(f"need 2-D signatures with at least b*r={b * r} columns")
    bands = sig[:, : b * r].astype(np.uint64).reshape(sig.shape[0], b, r)
    mul = np.array([_rand64(0xBA2D, k) | 1 for k in range(r)], dtype=np.uint64)
    h = (bands * mul).sum(axis=2, dtype=np.uint64)  # random odd multipliers per row: order matters
    h += np.arange(b, dtype=np.uint64) * _U64(_rand64(0xBA2E) | 1) + _U64(_rand64(0xBA2F, seed))
    return splitmix64(h)


def first_of_runs(keys: np.ndarray) -> np.ndarray:
    """True where a row starts a run of equal ``keys`` (sorted, or grouped)."""
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return first


def run_pairs(keys: np.ndarray, max_run: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, within each run of equal values of ``keys`` (sorted, or grouped),
    run by run, ``i`` then ``j`` ascending: every pair of a run of at most ``max_run`` rows (quadratic:
    k rows give k*(k-1)/2), the run's first row with each other one in a longer run (k-1, the same
    connected components)."""
    n = len(keys)
    starts = np.flatnonzero(first_of_runs(keys))
    size = np.diff(np.append(starts, n))
    starts, m = starts[size > 1], size[size > 1]  # most keys are alone: the rest works on the few others
    size = np.repeat(m, m)  # for each row of those runs: its run's length, its place in the run
    i = np.arange(size.size) - np.repeat(np.cumsum(m) - m, m)
    count = np.where(size <= max_run, size - 1 - i, np.where(i == 0, size - 1, 0))  # pairs it is first of
    left = np.repeat(np.repeat(starts, m) + i, count)
    k = np.arange(left.size) - np.repeat(np.cumsum(count) - count, count)
    return left, left + 1 + k


def candidate_pairs(bands: np.ndarray, all_pairs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of rows sharing at least one band hash (deduplicated, sorted).

    Per band: sort, find runs of equal hashes, emit pairs from each run (vectorized).  With
    ``all_pairs`` every pair in a run is emitted, quadratic in the run length (k identical docs give
    k*(k-1)/2 pairs); ``all_pairs=False`` links each member to the first row of its run instead
    (k-1 edges), which gives the same :func:`connected_components`.
    """
    bands = np.asarray(bands)
    n = bands.shape[0]
    codes = []
    for j in range(bands.shape[1]):
        order = np.argsort(bands[:, j], kind="stable")
        first, second = run_pairs(bands[order, j], n if all_pairs else 1)
        a, c = order[first], order[second]
        codes.append(np.minimum(a, c).astype(np.int64) * n + np.maximum(a, c))
    if not codes:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    code = np.unique(np.concatenate(codes))
    return code // n, code % n


def connected_components(n: int, edges_u: np.ndarray, edges_v: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes: the smallest node index in its component.

    Vectorized hooking + pointer jumping: every root is hooked onto the smallest root it shares an
    edge with (``np.minimum.at``), then paths are compressed until every node points at its root.
    Labels only ever decrease and satisfy ``label[x] <= x``, so each root is its tree's minimum; the
    number of trees per component at least halves per round, hence O(log n) rounds.
    """
    labels = np.arange(n, dtype=np.int64)
    u = np.asarray(edges_u, dtype=np.int64).ravel()
    v = np.asarray(edges_v, dtype=np.int64).ravel()
    if u.shape != v.shape:
        raise ValueError("edges_u and edges_v must have the same length")
    if u.size and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= n):
        raise ValueError("edge endpoint out of range")
    while u.size:
        lu, lv = labels[u], labels[v]
        keep = lu != lv  # edges inside an already merged tree are done for good
        u, v, lu, lv = u[keep], v[keep], lu[keep], lv[keep]
        if not u.size:
            break
        low = np.minimum(lu, lv)
        np.minimum.at(labels, lu, low)
        np.minimum.at(labels, lv, low)
        while True:  # pointer jumping
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt
    return labels
