"""Dataset distillation measured: the same model and steps trained on the full corpus, on 10% of its characters
chosen by distill_data (DSIR toward a target) and on a random 10%, three seeds each; validation loss on held-out
target text from an eval stage.

    python benchmarks/distill_data_bench.py [--steps 600] [--fraction 0.1]

The corpus: C4, Alpaca (instruction + input + output), the standard library's docstrings and 85% of
tinyshakespeare's blocks (../shared/data). The target: Shakespeare. DSIR reads 5% of the blocks as its
reference; the eval stage scores the last 10% (never trained on, never a reference): bits per byte and the
token-level loss (ln of the token perplexity; one tokenizer for every model). Target: distilled beats random on
the mean and recovers >= 50% of the gap between random and full: (random - distilled) / (random - full).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = {"n_layers": 4, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}
SEEDS = (1, 2, 3)


def split_shakespeare(work: Path) -> tuple[Path, Path, Path]:
    blocks = [b for b in (SHARED / "tinyshakespeare.txt").read_text().split("\n\n") if b.strip()]
    a, b = int(0.85 * len(blocks)), int(0.90 * len(blocks))
    (work / "plays.txt").write_text("\n\n".join(blocks[:a]))
    (work / "reference.txt").write_text("\n\n".join(blocks[a:b]))
    (work / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in blocks[b:]))
    return work / "plays.txt", work / "reference.txt", work / "heldout.jsonl"


def pretrain(data: str, steps: int) -> dict:
    return {"kind": "pretrain", "data": data, "model": MODEL, "batch": {"global_batch": 16, "micro_batch": 16},
            "steps": steps, "optimizer": {"lr": 3e-3}, "lr_schedule": {"warmup_steps": steps // 10},
            "parallel": {"strategy": "none"}, "scaling": {"num_workers": 1, "cpus_per_worker": 2},
            "checkpoint": {"every": steps}, "eval": {"every": steps, "batches": 4}, "log_every": 50}


def run(work: Path, name: str, seed: int, stages: dict) -> None:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": seed, "output_dir": str(work / name), "stages": stages},
                                   sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(path)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"run {name} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)  # random 10% ~6 epochs, the corpus ~0.6: a gap to recover
    ap.add_argument("--fraction", type=float, default=0.1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plays, reference, heldout = split_shakespeare(work)
        data = {"kind": "data", "sources": [
            {"name": "c4", "format": "jsonl", "paths": [str(SHARED / "c4_demo.jsonl")]},
            {"name": "alpaca", "format": "json", "paths": [str(SHARED / "alpaca_5000.json")],
             "text_field": ["instruction", "input", "output"]},
            {"name": "stdlib", "format": "python_docstrings"},
            {"name": "plays", "format": "text", "text_unit": "block", "paths": [str(plays)]}],
            "filter": {"min_chars": 20}, "tokenizer": {"vocab_size": 2048}, "pack": {"seq_len": 128, "val_fraction": 0.02}}
        models = []
        for seed in SEEDS:
            corpus = "data" if seed == SEEDS[0] else str(work / f"s{SEEDS[0]}" / "data")
            stages = {"data": data} if seed == SEEDS[0] else {}
            stages.update({
                "dsir": {"kind": "distill_data", "data": corpus, "fraction": args.fraction,
                         "target": {"format": "text", "text_unit": "block", "paths": [str(reference)]},
                         "pack": {"seq_len": 128, "val_fraction": 0.02}},
                "random": {"kind": "distill_data", "data": corpus, "method": "random", "fraction": args.fraction,
                           "pack": {"seq_len": 128, "val_fraction": 0.02}},
                "full": pretrain(corpus, args.steps),
                "on_dsir": pretrain("dsir", args.steps),
                "on_random": pretrain("random", args.steps)})
            run(work, f"s{seed}", seed, stages)
            models += [str(work / f"s{seed}" / m) for m in ("full", "on_dsir", "on_random")]
        run(work, "eval", 1, {"eval": {"kind": "eval", "models": models, "bootstrap": 0, "max_length": 128,
                                        "scaling": {"num_workers": 2},
                                        "tasks": [{"name": "heldout", "kind": "perplexity", "path": str(heldout)}]}})
        ev = json.loads((work / "eval" / "eval" / "report.json").read_text())
        names = list(ev["results"])
        loss = {n: math.log(ev["results"][n]["heldout"]["token_perplexity"]["value"]) for n in names}
        bpb = {n: ev["results"][n]["heldout"]["bits_per_byte"]["value"] for n in names}
        s1 = json.loads((work / f"s{SEEDS[0]}" / "report.json").read_text())["stages"]
        print(f"settings: model {MODEL}, {args.steps} steps of 16 x 128 tokens, fraction {args.fraction}, seeds {SEEDS}; "
              f"held-out Shakespeare: {ev['tasks']['heldout']['records']} blocks")
        for kind in ("dsir", "random"):
            r = s1[kind]
            print(f"{kind} (seed {SEEDS[0]}): {r['docs_kept']:,} of {r['docs_in']:,} documents, "
                  f"{sum(v['chars_kept'] for v in r['per_source'].values()):,} characters, "
                  f"{r['packing']['real_tokens']:,} tokens; per source kept/in: "
                  + ", ".join(f"{s} {v['docs_kept']}/{v['docs_in']}" for s, v in r["per_source"].items()))
        print(f"full corpus: {sum(s1['data']['packing']['samples'].values()):,} "
              f"samples, {s1['data']['packing']['real_tokens']:,} tokens")
        print("| training data | held-out loss (mean +- sd over seeds) | bits per byte | per seed (loss) |")
        print("|---|---|---|---|")
        means = {}
        for label, suffix in (("full corpus", "full"), ("distilled 10% (DSIR)", "on_dsir"), ("random 10%", "on_random")):
            keys = [n for n in names if n.endswith(suffix)]
            ls, bs = [loss[k] for k in keys], [bpb[k] for k in keys]
            means[suffix] = statistics.mean(ls)
            print(f"| {label} | {statistics.mean(ls):.4f} +- {statistics.stdev(ls):.4f} | {statistics.mean(bs):.4f} | "
                  + ", ".join(f"{x:.4f}" for x in ls) + " |")
        gap = means["on_random"] - means["full"]
        print(f"distilled beats random: {means['on_dsir'] < means['on_random']}; "
              + (f"gap recovered (random - distilled) / (random - full): "
                 f"{(means['on_random'] - means['on_dsir']) / gap:.2f} (target >= 0.5)" if gap > 0 else
                 "the full corpus is no better than random 10% at this budget: no gap to recover (more --steps)"))


if __name__ == "__main__":
    main()
