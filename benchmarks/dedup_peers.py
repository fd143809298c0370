"""Near dedup side by side: datatrove's MinHash pipeline, Data-Juicer's Ray MinHash deduplicator and
lmfleet's data stage, on the same corpus, cores, shingles, permutations, bands and threshold.

    pip install -e ".[bench]"      # the peers; a venv of its own: Data-Juicer pins dill / multiprocess
    python benchmarks/dedup_peers.py [--copies 2] [--cores 2] [--threshold 0.8]

Corpus: real text (../shared/data: C4, Alpaca, Shakespeare blocks; the stdlib's docstrings otherwise),
each document also as `--copies` new documents with 10% of their words replaced (J ~0.4: not
duplicates), and a quarter of all as near-duplicate copies with 1%, 2% or 5% replaced. Every system gets
the same JSONL files (one per core) of texts already normalized to lowercase `\\w+` tokens joined by
single spaces, so that each one's word shingling (lmfleet's `\\w+`, datatrove's tokenizer replaced by a
whitespace split, Data-Juicer's `space`) yields the same 5-word shingles.

Each system runs in a process of its own, timed from its start (framework start-up included: Ray for
lmfleet and Data-Juicer, datatrove's worker pool) to its deduplicated output on disk:
  - datatrove (LocalPipelineExecutor, `--cores` workers): signatures -> buckets -> clusters -> filter;
    LSH candidates are duplicates (no verification);
  - Data-Juicer (RayBTSMinhashDeduplicator on Ray Data, `--cores` CPUs): LSH candidates are duplicates;
  - lmfleet (`lmfleet run` of a data stage: read, near dedup with exact verification, tokenizer copied
    from a prepared one, no exact dedup and no packing, `ray.num_cpus = --cores`).
Scored on the documents each keeps, against exact Jaccard on the shingles (an inverted index over the
corpus): recall = true pairs (J >= threshold) with at least one side removed; precision = removed
documents with a true near-duplicate in the corpus. Prints docs/s and lmfleet / peer ratios (target >= 2
at equal or better precision and recall).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
_WORD = re.compile(r"\w+")


def tokens(text: str) -> str:
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).lower()))


def build(copies: int, seed: int) -> list[str]:
    from data_scale import base_docs, edit

    rng = random.Random(seed)
    base = [t for t in map(tokens, base_docs()) if len(t.split()) >= 20]
    vocab = sorted({w for d in base[:2000] for w in d.split()})
    docs = list(base)
    for _ in range(copies):
        docs += [edit(d, 0.10, rng, vocab) for d in base]
    dups = [edit(d, rng.choice((0.01, 0.02, 0.05)), rng, vocab) for d in rng.sample(docs, len(docs) // 4)]
    docs += dups
    rng.shuffle(docs)
    return docs


def oracle(docs: list[str], threshold: float) -> set[tuple[int, int]]:
    from dedup_bench import exact_pairs, shingle_strings

    truth, _ = exact_pairs([shingle_strings(d, 5) for d in docs], threshold)
    return truth


def run_lmfleet(inputs: Path, work: Path, a) -> tuple[float, set[str]]:
    import pyarrow.parquet as pq
    import yaml

    from lmfleet.data.config import TokenizerConfig
    from lmfleet.data.tokenizer import train_tokenizer

    tok = work / "tokenizer"
    train_tokenizer(["a prepared tokenizer, its training is not timed"] * 10, TokenizerConfig(vocab_size=300), tok)
    config = {"name": "peers", "output_dir": str(work / "run"), "ray": {"num_cpus": a.cores}, "stages": {"data": {
        "sources": [{"name": "web", "format": "jsonl", "paths": [str(inputs)], "id_field": "id"}],
        "dedup": {"exact": False, "near": True, "threshold": a.threshold, "num_perm": a.num_perm, "ngram": 5,
                  "bands": [a.bands, a.rows]},
        "tokenizer": {"path": str(tok)}, "pack": None}}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "from lmfleet.cli import app; app()", "run", str(path)],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"lmfleet failed:\n{out.stderr[-3000:]}")
    steps = json.loads((work / "run" / "data" / "report.json").read_text())["seconds"]
    print("lmfleet steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()), file=sys.stderr)
    return seconds, set(pq.read_table(work / "run" / "data" / "kept", columns=["id"])["id"].to_pylist())


def run_datatrove(inputs: Path, work: Path, a) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Split(WordTokenizer):  # the texts are already tokens: lmfleet's shingles (English needs spaCy)
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    norm = TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                          norm_unicode_diacritics=False, norm_numbers=False, norm_weekdays=False,
                          norm_monthnames=False)
    cfg = MinhashConfig(hash_config=HashConfig(precision=64), n_grams=5, num_buckets=a.bands,
                        hashes_per_bucket=a.rows, norm_config=norm)
    mh, logs = work / "minhash", work / "logs"
    files = len(list(inputs.glob("*.jsonl")))
    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(inputs)), MinhashDedupSignature(
        output_folder=str(mh / "sigs"), config=cfg, language=Split())],
                          tasks=files, workers=a.cores, logging_dir=str(logs / "1")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=str(mh / "sigs"), output_folder=str(mh / "buckets"),
                                                        config=cfg)],
                          tasks=cfg.num_buckets, workers=a.cores, logging_dir=str(logs / "2")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=str(mh / "buckets"),
                                                        output_folder=str(mh / "remove"), config=cfg)],
                          tasks=1, logging_dir=str(logs / "3")).run()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(inputs)), MinhashDedupFilter(input_folder=str(mh / "remove")),
                                    JsonlWriter(str(work / "out"), compression=None)],
                          tasks=files, workers=a.cores, logging_dir=str(logs / "4")).run()
    seconds = time.perf_counter() - t0
    kept = {json.loads(line)["id"] for f in (work / "out").glob("*.jsonl") for line in f.read_text().splitlines()}
    return seconds, kept


def run_data_juicer(inputs: Path, work: Path, a) -> tuple[float, set[str]]:
    t0 = time.perf_counter()
    import ray

    ray.init(num_cpus=a.cores, include_dashboard=False, log_to_driver=False)
    from data_juicer.ops.deduplicator.ray_bts_minhash_deduplicator import RayBTSMinhashDeduplicator

    op = RayBTSMinhashDeduplicator(tokenization="space", window_size=5, lowercase=False,
                                   num_permutations=a.num_perm, jaccard_threshold=a.threshold,
                                   num_bands=a.bands, num_rows_per_band=a.rows, work_dir=str(work))
    ds = ray.data.read_json(sorted(str(p) for p in inputs.glob("*.jsonl")))
    op.run(ds).select_columns(["id"]).write_parquet(str(work / "out"))
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq

    return seconds, set(pq.read_table(work / "out", columns=["id"])["id"].to_pylist())


RUNNERS = {"datatrove": run_datatrove, "data-juicer": run_data_juicer, "lmfleet": run_lmfleet}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=2, help="edited (not duplicate) copies of each document")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--only", default=",".join(RUNNERS), help="comma-separated systems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", choices=list(RUNNERS), help=argparse.SUPPRESS)  # one system, in its own process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    from lmfleet.data.minhash import optimal_bands

    a.bands, a.rows = optimal_bands(a.threshold, a.num_perm, 0.05, 0.95)  # the data stage's, verified
    if a.run:
        work = Path(a.work)
        seconds, kept = RUNNERS[a.run](work / "input", work / a.run, a)
        (work / f"{a.run}.json").write_text(json.dumps({"seconds": seconds, "kept": sorted(kept)}))
        return
    with tempfile.TemporaryDirectory(prefix="dedup_peers_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        docs = build(a.copies, a.seed)
        (work / "input").mkdir()
        for f in range(a.cores):
            with (work / "input" / f"part{f}.jsonl").open("w") as fh:
                for i in range(f, len(docs), a.cores):
                    fh.write(json.dumps({"id": str(i), "text": docs[i]}) + "\n")
        print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} M characters; {a.num_perm} "
              f"permutations, {a.bands} bands x {a.rows} rows, 5-word shingles, {a.cores} cores; built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        n_docs, results = len(docs), {}
        del docs  # the systems run first, with this process small (the oracle peaks at ~3 GB at --copies 16, ~20 at 64)
        cores = sorted(os.sched_getaffinity(0))[: a.cores]  # each system and all it starts on these
        for name in a.only.split(","):
            (work / name).mkdir()
            path = [str(ROOT / "platform"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # (an empty entry would add the cwd)
            out = subprocess.run([sys.executable, __file__, "--run", name, "--work", str(work), "--cores", str(a.cores),
                                  "--threshold", str(a.threshold), "--num-perm", str(a.num_perm)],
                                 capture_output=True, text=True, env=env,
                                 preexec_fn=lambda: os.sched_setaffinity(0, cores))
            if out.returncode:
                print(f"{name}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            results[name] = json.loads((work / f"{name}.json").read_text())
            if name == "lmfleet":
                print(out.stderr.strip().splitlines()[-1], flush=True)
        docs = [""] * n_docs
        for f in (work / "input").glob("*.jsonl"):
            for line in f.read_text().splitlines():
                record = json.loads(line)
                docs[int(record["id"])] = record["text"]
        truth = oracle(docs, a.threshold)
        twins = {d for pair in truth for d in pair}
        print(f"oracle: {len(truth)} pairs at exact J >= {a.threshold} ({len(twins)} documents in one)")
        rates = {}
        for name, r in results.items():
            kept = {int(i) for i in r["kept"]}
            removed = set(range(n_docs)) - kept
            recall = sum(i in removed or j in removed for i, j in truth) / max(len(truth), 1)
            precision = len(removed & twins) / max(len(removed), 1)
            rates[name] = n_docs / r["seconds"]
            print(f"{name:12s} {r['seconds']:7.1f} s  {rates[name]:8,.0f} docs/s  removed {len(removed):6d}  "
                  f"recall {recall:.4f}  precision {precision:.4f}", flush=True)
        if "lmfleet" in rates:
            for name, rate in rates.items():
                if name != "lmfleet":
                    print(f"docs/s lmfleet / {name}: {rates['lmfleet'] / rate:.2f}x (target >= 2)")


if __name__ == "__main__":
    main()
