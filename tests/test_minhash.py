"""MinHash / LSH / connected components (lmfleet.data.minhash) against brute-force references on real text."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import unicodedata
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from datasketch.lsh import _optimal_param

from lmfleet.data import minhash as mh
from lmfleet.data.minhash import (
    EMPTY_VALUE,
    band_hashes,
    candidate_pairs,
    connected_components,
    estimate_jaccard,
    estimate_jaccard_rows,
    minhash_signatures,
    normalize_for_hash,
    optimal_bands,
    run_pairs,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NUM_PERM = 128


# The contract: these few lines define the shingle sets the signatures estimate.
def word_shingles(text: str, n: int = 5) -> set:
    toks = re.findall(r"\w+", normalize_for_hash(text))
    if len(toks) >= n:
        return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}
    return {tuple(toks)} if toks else set()


def char_shingles(text: str, n: int) -> set:
    s = " ".join(normalize_for_hash(text).split())
    if len(s) >= n:
        return {s[i : i + n] for i in range(len(s) - n + 1)}
    return {s} if s else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


@pytest.fixture(scope="module")
def words() -> list[str]:
    path = DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} not found: these tests need ../shared/data beside the repo")
    return path.read_text(encoding="utf-8").split()


def edited(words: list[str], start: int, rate: float, rng: np.random.Generator, n: int = 300) -> str:
    """A copy of words[start:start+n] with each word replaced, with probability ``rate``, by a random one."""
    out = [w if rng.random() >= rate else words[rng.integers(len(words))] for w in words[start : start + n]]
    return " ".join(out)


@pytest.fixture(scope="module")
def pairs(words):
    """(doc_a, doc_b, exact word-5-shingle Jaccard): >= 20 pairs in each bucket around 0.1 .. 0.9, and ~0."""
    rng = np.random.default_rng(0)
    out = []
    for target in (0.1, 0.3, 0.5, 0.7, 0.9):
        q = 2 * target / (1 + target)  # J = q / (2 - q) with q = (1 - rate) ** 5 surviving shingles
        rate = 1 - q ** (1 / 5)
        found = 0
        for _ in range(200):
            start = int(rng.integers(len(words) - 300))
            a = " ".join(words[start : start + 300])
            b = edited(words, start, rate, rng)
            j = jaccard(word_shingles(a), word_shingles(b))
            if abs(j - target) <= 0.05:
                out.append((a, b, j))
                found += 1
                if found == 24:
                    break
    for _ in range(24):  # unrelated passages: exact J ~ 0
        s, t = rng.integers(len(words) - 300, size=2)
        a, b = " ".join(words[s : s + 300]), " ".join(words[t : t + 300])
        out.append((a, b, jaccard(word_shingles(a), word_shingles(b))))
    return out


def test_estimates_track_exact_jaccard(pairs):
    docs = [d for a, b, _ in pairs for d in (a, b)]
    sig = minhash_signatures(docs, num_perm=NUM_PERM)
    assert sig.shape == (len(docs), NUM_PERM) and sig.dtype == np.uint32
    est = estimate_jaccard_rows(sig[0::2], sig[1::2])
    exact = np.array([j for _, _, j in pairs])
    # With 128 bins a single estimate has std sqrt(J(1-J)/128) ~ 0.044 at J = 0.5, so +-0.05 cannot be
    # asserted per pair; per bucket of >= 20 pairs the mean error and the bias are tight.
    for centre in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9):
        sel = np.abs(exact - centre) <= 0.05
        assert sel.sum() >= 20, f"only {sel.sum()} pairs near J={centre}"
        err = est[sel] - exact[sel]
        assert np.abs(err).mean() <= 0.05, (centre, np.abs(err).mean())
        assert abs(err.mean()) <= 0.03, (centre, err.mean())
    assert est[exact < 0.01].max() <= 0.1


def test_identical_and_equal_set_docs_estimate_exactly_one(words):
    a = " ".join(words[1000:1300])
    variants = [
        a,
        a.upper(),
        "  ".join(a.split()) + " ...",
        re.sub(r"\W+", " ; ", a),  # other separators, same tokens
        a + " " + a,  # a repeated passage adds one new shingle per join: not equal ...
    ]
    sig = minhash_signatures(variants)
    for k in range(4):
        assert estimate_jaccard(sig[0], sig[k]) == 1.0
    # ... its exact Jaccard is just below 1, and the estimate is close.
    assert (
        abs(estimate_jaccard(sig[0], sig[4]) - jaccard(word_shingles(a), word_shingles(variants[4]))) < 0.05
    )


def test_disjoint_docs_estimate_near_zero(words):
    a, b = " ".join(words[0:300]), " ".join(words[50_000:50_300])
    assert jaccard(word_shingles(a), word_shingles(b)) < 0.01
    sig = minhash_signatures([a, b])
    assert estimate_jaccard(sig[0], sig[1]) <= 0.05


def test_shingling_contract_short_unicode_and_empty_docs():
    def same(x: str, y: str, **kw) -> bool:
        s = minhash_signatures([x, y], **kw)
        return bool((s[0] == s[1]).all())

    # Fewer tokens than ngram: one shingle of all tokens (so a different short doc shares nothing).
    assert word_shingles("To be, or not") == {("to", "be", "or", "not")}
    assert same("To be, or not", "to BE or   not!")
    assert not same("To be, or not", "to be or")
    s = minhash_signatures(["To be, or not", "to be or"])
    assert estimate_jaccard(s[0], s[1]) < 0.05
    # NFKC + lowercase: composed/decomposed accents, ligatures, full-width forms, final sigma, and
    # U+0130 whose lowercase is two code points ("i" + combining dot, which is not \w).
    assert same("Ünïcödé café naïve", "ÜNÏCÖDÉ CAFÉ NAÏVE")
    assert same("Ünïcödé café naïve", unicodedata.normalize("NFD", "Ünïcödé café naïve"))
    assert same("ﬁnal ﬂow ﬀ", "final flow ff")
    assert same("ＡＢＣ１２３ word", "abc123 word")
    assert same("ΟΔΟΣ ΣΟΦΙΑΣ κι άλλα", "οδος σοφιας κι άλλα")
    assert word_shingles("İstanbul is big", 2) == {("i", "stanbul"), ("stanbul", "is"), ("is", "big")}
    assert same("İstanbul is big", "i stanbul is big", ngram=2)
    assert not same("Ünïcödé café naïve", "Unicode cafe naive")
    # No tokens at all: the documented EMPTY_VALUE signature; equal to each other, ~0 against text.
    s = minhash_signatures(["", "  \n ", "!!! ... ---", "word"])
    assert (s[:3] == EMPTY_VALUE).all()
    assert estimate_jaccard(s[0], s[3]) == 0.0
    # Char shingles: whitespace collapsed, short texts are one shingle.
    assert same("Hello   World", "hello world", char_ngrams=True)
    assert same("ab", "AB", char_ngrams=True, ngram=5)
    assert not same("ab", "abc", char_ngrams=True, ngram=5)
    assert (minhash_signatures(["   "], char_ngrams=True) == EMPTY_VALUE).all()


def test_shingle_sets_are_the_contracts_sets(pairs):
    """The distinct shingle hashes exact verification compares: one per distinct shingle of the contract,
    so their Jaccard is the exact one; the same in any batch size and in the flat (Arrow) layout."""
    docs = [d for a, b, _ in pairs[:40] for d in (a, b)] + ["", "To be, or not", "to BE or   not!", "!!!"]
    sets = mh.shingle_sets(docs)
    assert [len(x) for x in sets] == [len(word_shingles(d)) for d in docs]
    assert all((x[1:] > x[:-1]).all() for x in sets)  # sorted, distinct
    for k, (_, _, j) in enumerate(pairs[:40]):
        x, y = sets[2 * k], sets[2 * k + 1]
        both = np.intersect1d(x, y).size
        assert both / (x.size + y.size - both) == pytest.approx(j)
    np.testing.assert_array_equal(sets[-3], sets[-2])
    assert mh.shingle_sets([]) == []
    small = mh.shingle_sets(docs, batch_chars=500)
    assert all(np.array_equal(x, y) for x, y in zip(sets, small, strict=True))
    values, offsets = mh.shingle_set_arrays(docs, batch_chars=3000)
    assert offsets.tolist() == np.cumsum([0] + [len(x) for x in sets]).tolist()
    np.testing.assert_array_equal(values, np.concatenate(sets))


def test_char_ngram_estimates(words):
    rng = np.random.default_rng(1)
    docs, exact = [], []
    for _ in range(40):
        start = int(rng.integers(len(words) - 100))
        a = " ".join(words[start : start + 100])
        b = edited(words, start, float(rng.uniform(0, 0.3)), rng, n=100)
        docs += [a, b]
        exact.append(jaccard(char_shingles(a, 7), char_shingles(b, 7)))
    sig = minhash_signatures(docs, char_ngrams=True, ngram=7)
    err = estimate_jaccard_rows(sig[0::2], sig[1::2]) - np.array(exact)
    assert np.abs(err).mean() <= 0.05 and abs(err.mean()) <= 0.03


def _random_unicode(rng: random.Random, n: int) -> str:
    pools = [
        "abcXYZ 019_ ",
        " \t\n.,;!?-'\"",
        "ÄÖÜßéÉñÑçÇÿ",
        "ΣσςΑΒΓαβγ ",
        "İıIi",
        "ﬁﬂﬀ",
        "ＡＢＣａｂｃ１２３",
        "\u0301\u0308\u200b\u00a0\u2019\u2026",
        "кириллица КИРИЛЛИЦА",
        "中文字符日本語",
        "٠١٢٣",
        "😀🎉",
        "ǅǈǋẞⅫⅻ①",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, n)))


def test_vectorized_tokenizer_matches_re_on_random_unicode():
    rng = random.Random(0)
    texts = [_random_unicode(rng, 60) for _ in range(800)] + ["plain ascii text, with_underscores 42"]
    # Each of the kernel's hash routes at its length bounds: one 8-byte word, two, polynomial (long or wide).
    texts += [" ".join(c * n for n in (7, 8, 9, 16, 17, 40)) for c in ("a", "Z", "é", "ω", "_1")]
    prepared = [mh._prenormalize(t) for t in texts]
    joined = " ".join(["", *prepared, ""])
    lengths = np.array([len(p) for p in prepared])
    doc_starts = np.concatenate([[1], 1 + np.cumsum(lengths + 1)])
    hashes, tok_off = mh._word_token_hashes(joined, doc_starts)
    ref_tokens = [re.findall(r"\w+", normalize_for_hash(t)) for t in texts]
    assert np.diff(tok_off).tolist() == [len(t) for t in ref_tokens]
    # Equal tokens hash equally wherever they occur, different tokens differently.
    seen: dict[int, str] = {}
    for tok, h in zip([t for toks in ref_tokens for t in toks], hashes.tolist(), strict=True):
        assert seen.setdefault(h, tok) == tok
    assert len(seen) == len({t for toks in ref_tokens for t in toks})
    # End to end: a text and the plain join of its reference tokens have the same shingle set.
    plain = [" ".join(toks) for toks in ref_tokens]
    for ngram in (1, 3):
        np.testing.assert_array_equal(
            minhash_signatures(texts, ngram=ngram), minhash_signatures(plain, ngram=ngram)
        )
    # Char mode: a text and its reference normalization (already NFKC, lowercase, collapsed).
    plain = [" ".join(normalize_for_hash(t).split()) for t in texts]
    np.testing.assert_array_equal(
        minhash_signatures(texts, ngram=3, char_ngrams=True),
        minhash_signatures(plain, ngram=3, char_ngrams=True),
    )


def test_piecewise_nfkc_equals_unicodedata():
    rng = random.Random(2)
    pool = [chr(c) for c in range(0x20, 0x7F)] + [
        chr(c)
        for c in [*range(0xA0, 0x250), *range(0x300, 0x370), *range(0x1100, 0x1180), *range(0xAC00, 0xAC20)]
        + [*range(0xFB00, 0xFB07), *range(0xFF01, 0xFF60), *range(0x2000, 0x2070), 0x0CD5, 0x3099, 0x304B]
    ]
    for _ in range(5000):
        s = "".join(rng.choice(pool + [" "] * 10) for _ in range(rng.randint(1, 40)))
        for piece in (1, 3, 8):
            assert mh._nfkc(s, piece) == unicodedata.normalize("NFKC", s), (s, piece)


def test_deterministic_seeded_and_batch_independent(words):
    rng = np.random.default_rng(3)
    docs = [
        " ".join(words[s : s + int(n)])
        for s, n in zip(rng.integers(0, 100_000, 60), rng.integers(1, 400, 60), strict=True)
    ]
    docs += ["", "naïve café", "Σίσυφος", "x", "a b c d e f"]
    a = minhash_signatures(docs, seed=7)
    np.testing.assert_array_equal(a, minhash_signatures(docs, seed=7))
    b = minhash_signatures(docs, seed=8)
    assert (a != b).mean() > 0.9  # unrelated hash functions, apart from the empty doc
    one_by_one = np.vstack([minhash_signatures([d], seed=7) for d in docs])
    np.testing.assert_array_equal(a, one_by_one)
    np.testing.assert_array_equal(a[::-1], minhash_signatures(docs[::-1], seed=7))
    np.testing.assert_array_equal(a, minhash_signatures(docs, seed=7, batch_chars=500, batch_docs=3))


def test_kernels_run_where_numba_has_nowhere_to_cache_them(tmp_path):
    """A read-only install and home (a container with a read-only root filesystem): numba's
    ``cache=True`` raises at import there; the kernels compile in the process instead, same signatures.
    numba's own settings stand in for the read-only disk (root writes through file modes)."""
    docs = ["naïve café " * 20, "the quick brown fox jumps over the lazy dog " * 5, "", "x"]
    code = ("import sys, numpy as np; from lmfleet.data import minhash as mh, minhash_kernels as k; "
            f"np.save(sys.argv[1], mh.minhash_signatures({docs!r}, seed=3)); print(k._uncached)")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator",
           "NUMBA_CACHE_DIR": "/proc/lmfleet-no-such-dir", "PYTHONPATH": str(Path(mh.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sig.npy")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "word_token_hashes" in out.stdout and "fast_similarity_sketch" in out.stdout
    assert "NUMBA_CACHE_DIR" in out.stderr  # the warning, once
    assert out.stderr.count("numba cannot cache") == 1
    np.testing.assert_array_equal(np.load(tmp_path / "sig.npy"), minhash_signatures(docs, seed=3))


@pytest.mark.parametrize("num_perm", [16, 100, 128, 200])
def test_fast_similarity_sketch_matches_reference(words, num_perm):
    """The signatures against the sketch's definition, per doc in plain Python: every element visits bin
    (b0 + round * step) mod num_perm in each of num_perm rounds; a bin keeps the (round, value) minimum."""
    rng = np.random.default_rng(num_perm)
    docs = [
        " ".join(words[s : s + int(n)])
        for s, n in zip(rng.integers(0, 100_000, 24), rng.integers(1, 300, 24), strict=True)
    ]
    seed_key = mh._rand64(0x5EED, 5)
    lengths = np.array([len(d) for d in docs])
    doc_starts = np.concatenate([[1], 1 + np.cumsum(lengths + 1)])
    th, tok_off = mh._word_token_hashes(" ".join(["", *docs, ""]), doc_starts)
    v, doc = mh._shingle_hashes(th, tok_off, 5, seed_key)
    got = mh._fast_similarity_sketch(v, doc, len(docs), num_perm)
    np.testing.assert_array_equal(got, minhash_signatures(docs, num_perm=num_perm, seed=5))
    steps = [s for s in range(1, num_perm + 1) if np.gcd(s, num_perm) == 1]
    mask, mul = (1 << 64) - 1, int(mh._ROUND_MUL)
    for d in range(len(docs)):
        best: dict[int, tuple[int, int]] = {}
        for h in v[doc == d].tolist():
            b0 = ((h >> 32) * num_perm) >> 32
            step = steps[((int(mh.splitmix64(np.array([h ^ int(mh._STEP_TAG)], np.uint64))[0]) >> 32)
                          * len(steps)) >> 32]
            for r in range(num_perm):
                value = h & 0xFFFFFFFF if r == 0 else (((h ^ mh._rand64(mul, r)) * mul) & mask) >> 32
                j = (b0 + r * step) % num_perm
                best[j] = min(best.get(j, (r, value)), (r, value))
        assert sorted(best) == list(range(num_perm))  # every bin filled by the doc's own shingles
        assert got[d].tolist() == [best[j][1] for j in range(num_perm)], d


def test_short_documents_estimate_as_well_as_k_permutation_minhash(words):
    """Documents with fewer shingles than bins, where one-permutation hashing has to copy bins: the
    estimate's error is no larger than k-permutation MinHash's sqrt(J(1 - J) / k) (measured: ~0.7 of it)."""
    rng = np.random.default_rng(11)
    a_docs, b_docs, exact = [], [], []
    for _ in range(400):
        n, start = int(rng.integers(12, 100)), int(rng.integers(len(words) - 100))
        a = " ".join(words[start : start + n])
        b = edited(words, start, float(rng.uniform(0.0, 0.15)), rng, n)
        a_docs.append(a), b_docs.append(b), exact.append(jaccard(word_shingles(a), word_shingles(b)))
    exact = np.array(exact)
    sig = minhash_signatures(a_docs + b_docs, num_perm=NUM_PERM)
    est = estimate_jaccard_rows(sig[:400], sig[400:])
    rmse = float(np.sqrt(np.mean((est - exact) ** 2)))
    k_perm = float(np.sqrt(np.mean(exact * (1 - exact) / NUM_PERM)))
    assert rmse <= k_perm, (rmse, k_perm)


@pytest.mark.parametrize(
    "threshold,num_perm,fp,fn",
    [
        (0.5, 128, 0.5, 0.5),
        (0.8, 128, 0.5, 0.5),
        (0.9, 256, 0.5, 0.5),
        (0.7, 64, 0.5, 0.5),
        (0.8, 128, 0.7, 0.3),
        (0.3, 32, 0.2, 0.8),
    ],
)
def test_optimal_bands_agrees_with_datasketch(threshold, num_perm, fp, fn):
    b, r = optimal_bands(threshold, num_perm, fp, fn)
    assert (b, r) == _optimal_param(threshold, num_perm, fp, fn)
    assert b * r <= num_perm


def test_band_hashes_and_lsh_recall(pairs):
    sig = np.tile(np.arange(8, dtype=np.uint32), (3, 4))  # every band of every row has the same content
    h = band_hashes(sig, 4, 8)
    assert h.shape == (3, 4) and h.dtype == np.uint64
    assert (h == h[0]).all() and len(set(h[0].tolist())) == 4  # band index is mixed in
    assert not (band_hashes(sig, 4, 8, seed=1) == h).any()

    docs = [d for a, b, _ in pairs for d in (a, b)]
    exact = np.array([j for _, _, j in pairs])
    b, r = optimal_bands(0.8, NUM_PERM)
    bands = band_hashes(minhash_signatures(docs), b, r)
    collide = (bands[0::2] == bands[1::2]).any(axis=1)
    assert collide[exact >= 0.9].all()
    assert not collide[exact <= 0.1].any()
    i, j = candidate_pairs(bands)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    assert {(2 * k, 2 * k + 1) for k in np.flatnonzero(collide)} <= found


def test_candidate_pairs_brute_force():
    rng = np.random.default_rng(4)
    bands = rng.integers(0, 6, size=(300, 3)).astype(np.uint64)
    i, j = candidate_pairs(bands)
    want = {(a, c) for a in range(300) for c in range(a + 1, 300) if (bands[a] == bands[c]).any()}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == want and len(i) == len(want)
    assert candidate_pairs(np.arange(10, dtype=np.uint64)[:, None])[0].size == 0
    # Star edges (each run member to the run's first row): far fewer, same components.
    si, sj = candidate_pairs(bands, all_pairs=False)
    assert set(zip(si.tolist(), sj.tolist(), strict=True)) <= want and len(si) < len(want) / 5
    np.testing.assert_array_equal(connected_components(300, si, sj), connected_components(300, i, j))


def test_run_pairs_by_hand_and_against_a_loop():
    # Runs [5 5 5] [7] [9 9]: all pairs of each run, run by run; with max_run 2 the run of 3 is a star.
    keys = np.array([5, 5, 5, 7, 9, 9], dtype=np.uint64)
    assert [x.tolist() for x in run_pairs(keys, 64)] == [[0, 0, 1, 4], [1, 2, 2, 5]]
    assert [x.tolist() for x in run_pairs(keys, 2)] == [[0, 0, 4], [1, 2, 5]]
    assert all(x.size == 0 for x in run_pairs(np.zeros(0, np.uint64), 8) + run_pairs(np.arange(4), 8))
    rng = np.random.default_rng(7)
    keys = np.sort(rng.integers(0, 400, size=3000))  # runs of 1 to ~20
    for max_run in (1, 5, 64):
        want = []
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        for s, e in zip(starts, np.r_[starts[1:], keys.size], strict=True):
            m = e - s
            pairs = [(a, b) for a in range(m) for b in range(a + 1, m)] if m <= max_run else [(0, b) for b in range(1, m)]
            want += [(s + a, s + b) for a, b in pairs]
        i, j = run_pairs(keys, max_run)
        assert list(zip(i.tolist(), j.tolist(), strict=True)) == want


def bfs_labels(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(u.tolist(), v.tolist(), strict=True):
        adj[a].append(b)
        adj[b].append(a)
    labels = np.full(n, -1)
    for s in range(n):  # ascending, so the first node reached is the component minimum
        if labels[s] < 0:
            labels[s], queue = s, deque([s])
            while queue:
                for y in adj[queue.popleft()]:
                    if labels[y] < 0:
                        labels[y] = s
                        queue.append(y)
    return labels


@pytest.mark.parametrize(
    "n,m", [(1, 0), (10, 0), (10, 5), (200, 150), (2000, 1500), (2000, 4000), (5000, 200)]
)
def test_connected_components_random_graphs(n, m):
    rng = np.random.default_rng(n + m)
    u, v = rng.integers(0, n, m), rng.integers(0, n, m)  # includes self loops and duplicate edges
    np.testing.assert_array_equal(connected_components(n, u, v), bfs_labels(n, u, v))


def test_connected_components_long_chains():
    n = 20_000
    perm = np.random.default_rng(5).permutation(n)
    for order in (np.arange(n), np.arange(n)[::-1], perm):  # diameter n-1, in three labellings
        u, v = order[:-1], order[1:]
        assert (connected_components(n, u, v) == 0).all()
    u, v = perm[:-1].copy(), perm[1:].copy()
    cut = np.ones(n - 1, dtype=bool)
    cut[[10, 5000, 12_345]] = False  # three cuts: four chains
    np.testing.assert_array_equal(connected_components(n, u[cut], v[cut]), bfs_labels(n, u[cut], v[cut]))
    assert connected_components(0, np.array([], dtype=int), np.array([], dtype=int)).size == 0
