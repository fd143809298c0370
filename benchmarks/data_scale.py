"""How the data stage scales: corpus size, file layout and CPUs, each run through `lmfleet run`.

    python benchmarks/data_scale.py [--scales 1 4 16 64] [--compare-scale 16] [--keep DIR]

Corpus: real text (../shared/data: C4 documents, Alpaca records, Shakespeare blocks; the stdlib's
docstrings when that folder is absent) replicated N times, every copy after the first with 10% of its
words replaced (new documents for dedup, not near-duplicates), plus 2% near-duplicates (1% of words
replaced) and 1% exact duplicates. Written as eight JSONL files, and at the compare scale also as one file.

Runs (each a fresh `lmfleet run` with its own embedded Ray):
  - every scale, eight files, all CPUs: documents/s per step and end to end, driver peak RSS;
  - at the compare scale: one big file (read.split_bytes at 1/8 of it: eight byte ranges) vs eight
    files, and one core (the run and everything it starts pinned to it, ray.num_cpus=1) vs all: a Ray
    CPU is then a core, which it is not otherwise (the driver, Ray's daemons and library threads use
    every core whatever num_cpus says).
Prints per-step seconds of every run and four ratios: docs/s at the largest vs the compare scale
(target: flat, >= 0.9), the driver's peak memory there (target: flat, <= 1.10: dedup's pairs and
clusters never reach it) as RSS and as its private part (RssAnon: RSS also counts the pages of Ray's
object store the driver has read, shared memory that is the node's, not the driver's), one file vs eight
(target >= 0.9), all CPUs vs one (target >= 1.6).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STEPS = ("read", "exact_dedup", "near_dedup", "tokenizer", "mix_and_pack")


def base_docs() -> list[str]:
    if SHARED.exists():
        docs = [json.loads(line)["text"] for line in (SHARED / "c4_demo.jsonl").read_text().splitlines()]
        docs += [" ".join(filter(None, (r["instruction"], r["input"], r["output"])))
                 for r in json.loads((SHARED / "alpaca_5000.json").read_text())]
        docs += [b.strip() for b in re.split(r"\n\s*\n", (SHARED / "tinyshakespeare.txt").read_text()) if len(b) > 200]
        return docs
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        docs += [d for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.Module)
                 and (d := ast.get_docstring(n)) and len(d) > 200]
    return docs


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(rate * len(words)))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def corpus(scale: int, folder: Path, one_file: bool) -> tuple[int, int]:
    """Writes the corpus at `scale` as eight files (and all.jsonl with one_file); (documents, bytes)."""
    rng = random.Random(scale)
    base = base_docs()
    vocab = sorted({w for d in base[:2000] for w in d.split()})
    folder.mkdir(parents=True, exist_ok=True)
    parts = [open(folder / f"part-{k}.jsonl", "w") for k in range(8)]  # noqa: SIM115
    whole = open(folder / "all.jsonl", "w") if one_file else None  # noqa: SIM115
    n = size = 0
    for copy in range(scale):
        for text in base:
            doc = text if copy == 0 else edit(text, 0.10, rng, vocab)
            extra = [doc] if rng.random() < 0.01 else []
            extra += [edit(doc, 0.01, rng, vocab)] if rng.random() < 0.02 else []
            for d in (doc, *extra):
                line = json.dumps({"text": d}) + "\n"
                parts[n % 8].write(line)
                if whole:
                    whole.write(line)
                n += 1
                size += len(line.encode())
    for f in (*parts, whole):
        if f:
            f.close()
    return n, size


def run_stage(work: Path, name: str, paths: list[str], cpus: int, split_bytes: int = 128 << 20) -> dict:
    """One `lmfleet run` of the data stage on `cpus` cores: the process and all it starts (Ray's daemons,
    workers, the threads of tokenizers and Arrow) pinned to them, and ray.num_cpus = cpus."""
    cores = sorted(os.sched_getaffinity(0))[:cpus]
    config = {"name": name, "seed": 0, "output_dir": str(work / name), "ray": {"num_cpus": cpus},
              "stages": {"data": {"sources": [{"name": "web", "format": "jsonl", "paths": paths}],
                                  "read": {"split_bytes": split_bytes},
                                  "filter": {"max_chars": 200_000}, "tokenizer": {"vocab_size": 8000},
                                  "pack": {"seq_len": 256}}}}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lmfleet"), "run", str(work / f"{name}.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))
    peak = [0, 0]

    def sample():  # the driver's own RSS (Ray's workers are other processes), and its private part
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines())
                  if k in ("VmRSS", "RssAnon")}
            peak[0] = max(peak[0], kb.get("VmRSS", 0) * 1024)
            peak[1] = max(peak[1], kb.get("RssAnon", 0) * 1024)
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode:
        sys.exit(f"{name}: lmfleet run failed:\n{err[-3000:]}")
    report = json.loads((work / name / "data" / "report.json").read_text())
    return {"wall": time.perf_counter() - start, "steps": {k: report["seconds"].get(k, 0.0) for k in STEPS},
            "docs": report["docs_in"], "rss_mb": peak[0] / 2**20, "anon_mb": peak[1] / 2**20,
            "tasks": report["read"]["tasks"]}


def show(label: str, r: dict) -> None:
    steps = sum(r["steps"].values())
    per = "  ".join(f"{k} {v:6.1f}s" for k, v in r["steps"].items())
    print(f"{label:<34} docs {r['docs']:>8,}  steps {steps:6.1f}s  {r['docs'] / steps:8,.0f} docs/s  "
          f"wall {r['wall']:6.1f}s  driver RSS {r['rss_mb']:6.0f} MB (private {r['anon_mb']:4.0f})  read tasks {r['tasks']:>3}  | {per}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--compare-scale", type=int, default=16)
    ap.add_argument("--keep", type=Path, help="keep corpora and runs here (default: a temp dir)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="lmfleet-data-scale-"))
    cpus = len(os.sched_getaffinity(0))
    print(f"data_scale: {cpus} CPUs, corpora and runs in {work}", flush=True)
    results = {}
    for scale in sorted(set(args.scales) | {args.compare_scale}):
        folder = work / f"corpus-{scale}x"
        n, size = corpus(scale, folder, one_file=scale == args.compare_scale)
        print(f"corpus {scale}x: {n:,} documents, {size / 1e6:.0f} MB", flush=True)
        eight = [str(folder / "part-*.jsonl")]
        results[scale] = run_stage(work, f"s{scale}-eight", eight, cpus)
        show(f"{scale}x, 8 files, {cpus} CPUs", results[scale])
        if scale == args.compare_scale:
            # Split into as many ranges as there are files in the other layout: what the default 128 MiB
            # does to a 1 GB file.
            one = run_stage(work, f"s{scale}-one", [str(folder / "all.jsonl")], cpus, split_bytes=-(-size // 8))
            show(f"{scale}x, 1 file in 8 ranges, {cpus} CPUs", one)
            single = run_stage(work, f"s{scale}-cpu1", eight, 1)
            show(f"{scale}x, 8 files, 1 CPU", single)
    rate = {s: r["docs"] / sum(r["steps"].values()) for s, r in results.items()}
    big = max(results)
    print(f"\ndocs/s {big}x / {args.compare_scale}x: {rate[big] / rate[args.compare_scale]:.2f} (target >= 0.9)")
    print(f"driver peak RSS {big}x / {args.compare_scale}x: "
          f"{results[big]['rss_mb'] / results[args.compare_scale]['rss_mb']:.2f}; its private memory: "
          f"{results[big]['anon_mb'] / results[args.compare_scale]['anon_mb']:.2f} (target <= 1.10: flat)")
    print(f"one file / eight files (docs/s): {(one['docs'] / sum(one['steps'].values())) / rate[args.compare_scale]:.2f}"
          " (target >= 0.9)")
    print(f"{cpus} CPUs / 1 CPU (docs/s): {rate[args.compare_scale] / (single['docs'] / sum(single['steps'].values())):.2f}"
          " (target >= 1.6)")


if __name__ == "__main__":
    main()
