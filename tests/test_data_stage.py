"""The data stage end to end on local Ray with real text, against brute-force ground truth."""

import json
import random
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmfleet.data import minhash
from lmfleet.data.config import NormalizeConfig
from lmfleet.data.minhash import normalize_for_hash
from lmfleet.data.packing import PackedDataset
from lmfleet.data.read import expand_paths, normalize_text, read_file
from lmfleet.errors import InputError
from lmfleet.runner import load_run, run

from conftest import shared, write_config
from test_read import messy_jsonl

THRESHOLD = 0.8
EDIT_RATES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.3)


def shingles(text: str, n: int = 5) -> frozenset:
    toks = re.findall(r"\w+", normalize_for_hash(text))
    if len(toks) < n:
        return frozenset([tuple(toks)]) if toks else frozenset()
    return frozenset(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def edit_words(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(rate * len(words)))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """c4 docs + injected exact and near duplicates + an alpaca slice + Shakespeare files + bad records."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    c4 = [json.loads(line) for line in shared("c4_demo.jsonl").read_text().splitlines()]
    vocab = sorted({w for d in c4 for w in d["text"].split()})
    (root / "web").mkdir()
    # `quality` (packed as a column): a float, an int, a string (not a number) or missing
    quality = [{} if i % 10 == 0 else {"quality": "0.5"} if i % 10 == 1 else {"quality": i % 7} if i % 10 == 2
               else {"quality": len(d["text"]) % 101 / 10} for i, d in enumerate(c4)]
    (root / "web" / "c4.jsonl").write_text("".join(json.dumps({"text": d["text"], **q}) + "\n"
                                                   for d, q in zip(c4, quality, strict=True)))
    injected = []
    long_docs = [i for i, d in enumerate(c4) if len(d["text"].split()) > 150]
    for i in long_docs[:10]:  # exact duplicates, one with only whitespace/NFKC differences
        injected.append({"text": c4[i]["text"]})
    injected.append({"text": "  " + c4[long_docs[10]]["text"].replace(" ", "\u00a0 ") + "\n\n\n"})
    for k, i in enumerate(long_docs[20:62]):  # near duplicates at several edit rates
        injected.append({"text": edit_words(c4[i]["text"], EDIT_RATES[k % len(EDIT_RATES)], rng, vocab)})
    (root / "web" / "injected.jsonl").write_text("".join(json.dumps(d) + "\n" for d in injected))
    messy_jsonl(root / "web" / "messy.jsonl")

    alpaca = json.loads(shared("alpaca_5000.json").read_text())[:800]
    (root / "alpaca.json").write_text(json.dumps(alpaca))

    (root / "plays").mkdir()
    lines = shared("tinyshakespeare.txt").read_text().splitlines()
    for k in range(8):
        (root / "plays" / f"part{k}.txt").write_text("\n".join(lines[k * 400 : (k + 1) * 400]))
    (root / "plays" / "part0_copy.txt").write_text(
        edit_words((root / "plays" / "part0.txt").read_text(), 0.005, rng, vocab))
    return root


def data_config(corpus, out, seed=1, **data):
    return {
        "name": "it", "seed": seed, "output_dir": str(out),
        "stages": {"data": {
            "sources": [
                {"name": "web", "format": "jsonl", "paths": [str(corpus / "web")]},
                {"name": "alpaca", "format": "json", "paths": [str(corpus / "alpaca.json")],
                 "text_field": ["instruction", "input", "output"]},
                {"name": "plays", "format": "text", "paths": [str(corpus / "plays" / "*.txt")]},
            ],
            "filter": {"max_chars": 100_000},
            "dedup": {"threshold": THRESHOLD},
            "tokenizer": {"vocab_size": 1000},
            "pack": {"seq_len": 128, "val_fraction": 0.05, "samples_per_shard": 256, "columns": ["quality"]},
            **data,
        }},
    }


@pytest.fixture(scope="module")
def result(corpus, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("run")
    report = run(load_run(write_config(out / "c.yaml", data_config(corpus, out / "run"))))
    return report["stages"]["data"], out / "run" / "data"


def _input_docs(corpus):
    """All valid input docs as (source, normalized text), read independently of the stage."""
    docs = []
    for f in sorted((corpus / "web").glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            try:
                t = json.loads(line.decode()).get("text")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if isinstance(t, str) and t.strip() and len(t) <= 100_000:
                docs.append(("web", normalize_text(t, NormalizeConfig())))
    for r in json.loads((corpus / "alpaca.json").read_text()):
        docs.append(("alpaca", normalize_text("\n\n".join(v for v in (r["instruction"], r["input"], r["output"])
                                                           if v.strip()), NormalizeConfig())))
    for f in sorted((corpus / "plays").glob("*.txt")):
        docs.append(("plays", normalize_text(f.read_text(), NormalizeConfig())))
    return docs


def test_rejects_counted_exactly_and_written(result):
    report, out = result
    assert report["rejects"] == {"invalid_json": 1, "invalid_utf8": 1, "empty_text": 1, "text_not_string": 1,
                                 "missing_text": 1, "not_an_object": 1, "too_long": 1}
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert len(rejects) == 7 and all(r["source"] == "web" and r["location"] for r in rejects)


def test_no_valid_document_lost(corpus, result):
    """Every valid input text is kept, or is an exact duplicate / near-duplicate of a kept document."""
    report, out = result
    docs = _input_docs(corpus)
    assert report["valid_docs"] == len(docs)
    kept = pq.read_table(out / "kept").to_pylist()
    clusters = {r["id"]: r["cluster_id"] for r in pq.read_table(out / "clusters.parquet").to_pylist()}
    kept_ids = {r["id"] for r in kept}
    kept_texts = {r["text"] for r in kept}
    distinct = {t for _, t in docs}
    assert report["exact_duplicates_removed"] == len(docs) - len(distinct) == 11
    assert len(clusters) == len(distinct)  # one clusters row per doc surviving exact dedup
    assert all(cid in kept_ids for cid in clusters.values())  # every cluster's representative is kept
    assert len(kept) == len(distinct) - report["near_duplicates_removed"]
    assert kept_texts <= distinct
    assert len([c for i, c in clusters.items() if i != c]) == report["near_duplicates_removed"]


def _stage_docs(corpus) -> dict[str, str]:
    """id -> normalized text of every valid input doc, via the (separately tested) readers."""
    cfg = load_run(write_config(corpus / "c.yaml", data_config(corpus, corpus / "unused"))).stages[0].config
    docs = {}
    for i, src in enumerate(cfg.sources):
        for f in expand_paths(src):
            task = {"source": src.model_dump_json(), "source_index": i, "path": f.path, "relpath": f.rel}
            for t in read_file(task, cfg.normalize, cfg.filter):
                docs.update((r["id"], r["text"]) for r in t.to_pylist() if r["reject_reason"] is None)
    return docs


def test_near_dup_recall_and_precision_vs_exact_jaccard(corpus, result):
    report, out = result
    text = _stage_docs(corpus)
    cluster = {r["id"]: r["cluster_id"] for r in pq.read_table(out / "clusters.parquet").to_pylist()}
    sets = {i: shingles(text[i]) for i in cluster}
    # Brute force over all pairs sharing a shingle (an inverted index; others have Jaccard 0).
    by_shingle: dict = {}
    for i, sh in sets.items():
        for s in sh:
            by_shingle.setdefault(s, []).append(i)
    candidates = {tuple(sorted(p)) for ids in by_shingle.values() if len(ids) < 200 for p in combinations(ids, 2)}
    jaccard = {p: len(sets[p[0]] & sets[p[1]]) / len(sets[p[0]] | sets[p[1]]) for p in candidates}
    true_pairs = {p for p, j in jaccard.items() if j >= THRESHOLD}
    found = {tuple(sorted((r["id_a"], r["id_b"]))) for r in pq.read_table(out / "pairs.parquet").to_pylist()}
    same_cluster = {p for p in true_pairs if cluster[p[0]] == cluster[p[1]]}
    recall = len(same_cluster) / len(true_pairs)
    clear = {p for p in true_pairs if jaccard[p] >= THRESHOLD + 0.05}
    clear_recall = len(clear & same_cluster) / len(clear)
    exact_of_found = [jaccard.get(p, 0.0) for p in found]
    precision = np.mean([j >= THRESHOLD for j in exact_of_found])
    near_precision = np.mean([j >= THRESHOLD - 0.1 for j in exact_of_found])
    print(f"true pairs {len(true_pairs)}, found {len(found)}, recall {recall:.3f} "
          f"(J >= t+0.05: {clear_recall:.3f} of {len(clear)}), precision {precision:.3f}, within 0.1: {near_precision:.3f}")
    assert len(true_pairs) >= 19  # injected 0.5-2% edits (6 each) and the Shakespeare copy, at least
    # Exact verification (the default) keeps a candidate pair iff its shingle sets' Jaccard is >= threshold:
    # every pair found is a true one, and no document is removed without a true near-duplicate. Recall is
    # LSH's: banding tuned for recall finds a pair at J 0.8 with probability ~0.99.
    assert precision == 1.0 and near_precision == 1.0
    assert all(r["similarity"] == pytest.approx(jaccard[tuple(sorted((r["id_a"], r["id_b"])))])
               for r in pq.read_table(out / "pairs.parquet").to_pylist())
    partners = {i for p in true_pairs for i in p}
    assert all(i in partners for i, c in cluster.items() if i != c)
    assert clear_recall >= 0.95 and recall >= 0.9
    assert report["lsh"]["bands"] * report["lsh"]["rows"] <= 128


def test_clusters_are_the_components_of_the_pairs_by_the_representative_rule(result):
    """The clusters, found in Ray tasks (large-star / small-star rounds, never on the driver), are the
    connected components of the verified pairs by the union-find reference; each is named after its
    member first by source order, then id; every other document is its own cluster."""
    report, out = result
    pairs = pq.read_table(out / "pairs.parquet")
    assert len(pairs) >= 19 and min(pairs["similarity"].to_pylist()) >= THRESHOLD
    rows = pq.read_table(out / "clusters.parquet").to_pylist()
    source = {r["id"]: r["source"] for r in rows}
    order = {"web": 0, "alpaca": 1, "plays": 2}  # the config's source order
    ids = sorted({*pairs["id_a"].to_pylist(), *pairs["id_b"].to_pylist()})
    index = {x: i for i, x in enumerate(ids)}
    labels = minhash.connected_components(len(ids), np.array([index[x] for x in pairs["id_a"].to_pylist()]),
                                          np.array([index[x] for x in pairs["id_b"].to_pylist()]))
    want = {}
    for label in set(labels.tolist()):
        members = [ids[i] for i in np.flatnonzero(labels == label)]
        want.update(dict.fromkeys(members, min(members, key=lambda x: (order[source[x]], x))))
    assert {r["id"]: r["cluster_id"] for r in rows if r["id"] in index} == want
    assert all(r["cluster_id"] == r["id"] for r in rows if r["id"] not in index)
    clusters = len(set(labels.tolist()))
    assert report["clusters"] == clusters and report["near_duplicates_removed"] == len(ids) - clusters
    sizes = Counter(Counter(labels.tolist()).values())
    assert report["cluster_sizes"] == {str(k): sizes[k] for k in sorted(sizes)}
    assert report["lsh"]["verified_edges"] == len(pairs) <= report["lsh"]["candidate_pairs"]
    assert report["lsh"]["clustering_rounds"] >= 2


def test_kept_ids_deterministic_for_a_seed(corpus, result, tmp_path):
    report, out = result
    again = tmp_path / "again"
    run(load_run(write_config(tmp_path / "c.yaml", data_config(corpus, again))))
    ids = lambda d: sorted(r["id"] for r in pq.read_table(d / "kept").to_pylist())  # noqa: E731
    assert ids(again / "data") == ids(out)
    # The tokenizer (trained in a Ray task, on every kept document by default) is the same file.
    assert report["tokenizer_training"]["trained_on_docs"] == report["docs_kept"]
    assert (again / "data" / "tokenizer" / "tokenizer.json").read_bytes() == (out / "tokenizer" / "tokenizer.json").read_bytes()
    a, b = PackedDataset(out / "packed"), PackedDataset(again / "data" / "packed")
    assert len(a) == len(b) and all(np.array_equal(a[i][0], b[i][0]) for i in range(0, len(a), 7))


def test_tokenizer_trains_on_a_seeded_sample_when_bounded(corpus, result, tmp_path):
    report, _ = result
    cfg = data_config(corpus, tmp_path / "run", tokenizer={"vocab_size": 1000, "max_train_docs": 200}, pack=None)
    sampled = run(load_run(write_config(tmp_path / "c.yaml", cfg)))["stages"]["data"]
    # A seeded hash keeps each document with probability 200 / kept: about 200 of them.
    assert 140 <= sampled["tokenizer_training"]["trained_on_docs"] <= 260 < report["docs_kept"]
    assert sampled["tokenizer"]["vocab_size"] == 1000


def test_packing_roundtrip_boundaries_and_efficiency(result):
    from transformers import AutoTokenizer

    report, out = result
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    ds = PackedDataset(out / "packed", "train")
    assert report["packing"]["efficiency"] >= 0.99
    assert set(ds.source_ranges()) == {"web", "alpaca", "plays"}
    eos, pad = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|pad|>")
    kept_texts = {r["text"] for r in pq.read_table(out / "kept").to_pylist()}
    whole_docs = 0
    for i in range(len(ds)):
        tokens, positions = ds[i]
        assert tokens.shape == positions.shape == (129,)
        assert positions[0] == 0
        # a new segment starts exactly after each EOS (a new document) or at a pad
        after_eos = np.flatnonzero(tokens[:-1] == eos) + 1
        assert np.all(positions[after_eos] == 0)
        steps = np.diff(positions)
        assert np.all((steps == 1) | (positions[1:] == 0))
        # segments that start at position 0 and end with EOS inside the sample decode to a kept doc
        starts = np.flatnonzero(positions == 0)
        for s, e in zip(starts[:-1], starts[1:], strict=True):
            if tokens[e - 1] == eos and (s == 0 and i > 0 and ds[i - 1][0][-1] == eos or s > 0 and tokens[s - 1] == eos):
                if tokens[s] != pad:
                    assert tok.decode(tokens[s : e - 1].tolist()) in kept_texts
                    whole_docs += 1
    assert whole_docs > 100
    per_source = report["packing"]["per_source"]
    assert sum(v["train_tokens"] + v["val_tokens"] for v in per_source.values()) == report["packing"]["real_tokens"]
    assert len(PackedDataset(out / "packed", "val")) > 0
    # special-token strings inside documents are text, not EOS / padding
    from lmfleet.data.packing import _load_tokenizer

    assert not {eos, pad} & set(_load_tokenizer(str(out / "tokenizer")).encode("a <|endoftext|> <|pad|> b").ids)


def test_column_means_by_hand():
    from lmfleet.data.packing import column_values, sample_means

    # documents of 3, 4 and 2 tokens (EOS included) cut into samples of 4: [0 0 0 1] [1 1 1 2] [2 pad pad pad]
    lengths = np.array([3, 4, 2])
    assert sample_means(np.array([1.0, 2.0, 4.0]), lengths, 4, 3).tolist() == [1.25, 2.5, 4.0]
    assert sample_means(np.array([1.0, np.nan, 4.0]), lengths, 4, 3).tolist() == [1.0, 4.0, 4.0]
    assert np.isnan(sample_means(np.full(3, np.nan), lengths, 4, 3)).all()
    assert sample_means(np.array([3.0]), np.array([10]), 4, 3).tolist() == [3.0] * 3  # one over three samples
    got = sample_means(np.array([5.0, np.nan]), np.array([1, 9]), 4, 3)
    assert got[0] == 5.0 and np.isnan(got[1:]).all()
    assert len(sample_means(np.empty(0), np.empty(0, dtype=np.int64), 4, 0)) == 0
    meta = ['{"q": 1}', '{"q": "1"}', "{}", '{"q": NaN}', '{"q": true}', '{"q": 2.5}', None, '{"q": [1]}']
    assert np.array_equal(column_values(meta, "q"), [1, np.nan, np.nan, np.nan, 1, 2.5, np.nan, np.nan], equal_nan=True)


def test_packed_column_is_the_token_weighted_mean_of_its_documents(result):
    """Brute force: every shard's token stream cut back into documents at EOS, each document found among the kept
    ones by its decoded text, its `quality` spread over its tokens (EOS included); a sample's value is the mean
    over its tokens that have one."""
    from tokenizers import Tokenizer

    report, out = result
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    index = json.loads((out / "packed" / "index.json").read_text())
    eos, pad = index["eos_id"], index["pad_id"]
    assert index["columns"] == ["quality"]
    quality = {}
    for r in pq.read_table(out / "kept").to_pylist():
        q = json.loads(r["meta"]).get("quality")
        quality[r["text"]] = float(q) if isinstance(q, int | float) else np.nan
    docs_without, samples_without = 0, 0
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            tokens = np.load(out / "packed" / shard["tokens"])
            got = np.load(out / "packed" / shard["columns"]["quality"])
            assert got.shape == (len(tokens),) and got.dtype == np.float64
            stream = tokens.reshape(-1)
            values = np.full(len(stream), np.nan)
            start = 0
            for end in np.flatnonzero(stream == eos):
                text = tok.decode(stream[start:end].tolist(), skip_special_tokens=False)
                assert text in quality
                values[start : end + 1] = quality[text]
                docs_without += bool(np.isnan(quality[text]))
                start = end + 1
            assert np.all(stream[start:] == pad)  # only the tail pads
            rows = values.reshape(tokens.shape)
            has = ~np.isnan(rows)
            want = np.where(has.any(axis=1), np.nansum(rows, axis=1) / np.maximum(has.sum(axis=1), 1), np.nan)
            np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
            samples_without += int(np.isnan(want).sum())
    # alpaca and plays records have no quality; a tenth of the web ones none and a tenth a string
    assert report["packing"]["columns"] == {"quality": {"docs_without_value": docs_without,
                                                        "samples_without_value": samples_without}}
    assert 0 < samples_without < index["splits"]["train"]["num_samples"]
    assert any("column quality kept per sample" in line for line in report["summary"])


def test_all_rejected_is_a_clear_error(tmp_path, ray_local):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n{"body": "again"}\n')
    cfg = {"name": "bad", "output_dir": str(tmp_path / "run"), "stages": {"data": {
        "sources": [{"name": "web", "format": "jsonl", "paths": [str(bad)]}]}}}
    with pytest.raises(InputError, match=r"no valid documents among 2 records \(rejects: \{'missing_text': 2\}"):
        run(load_run(write_config(tmp_path / "c.yaml", cfg)))
