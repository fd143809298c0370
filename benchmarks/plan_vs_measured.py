"""`lmfleet plan`'s predicted peak memory per rank against the peak each rank measured in a real run, for a
~100M-parameter model under each strategy on this machine's CPU. Target: within +-15% for each.

    python benchmarks/plan_vs_measured.py [--data runs/quickstart/data] [--steps 3] [--only ddp,fsdp]

Without --data it first runs the data stage of jobs/quickstart.yaml (stdlib docstrings, vocab 4096,
seq_len 256). Each case is one `lmfleet run` of a pretrain stage (a fresh Ray, fresh worker processes);
measured = the stage report's `memory.peak_bytes_per_rank` (CPU: each rank's peak RSS above its RSS
before it built the model; lmfleet.train.memory); predicted = `lmfleet plan CONFIG --json`'s
`memory.peak` for the same config.

Each case runs twice, side by side: with glibc's default malloc, whose RSS also holds freed heap
memory it keeps (fragmentation from the many 1-30 MB tensors a step allocates and frees), and with
MALLOC_MMAP_THRESHOLD_=131072, which maps every tensor of 128 KiB or more on its own and unmaps it when
freed, so RSS follows the live tensors: the quantity the planner predicts, and what
`torch.cuda.max_memory_allocated` reports on GPU. The target applies to the second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# 14 layers x d_model 768 (12 heads), vocab 4096: 105M parameters.
MODEL = {"n_layers": 14, "d_model": 768, "n_heads": 12, "max_seq_len": 256}
BATCH = {"global_batch": 4, "micro_batch": 1}
CASES = {  # name: (parallel, workers)
    "none (1 rank)": ({"strategy": "none"}, 1),
    "none + activation checkpointing (1 rank)": ({"strategy": "none", "activation_checkpointing": True}, 1),
    "ddp": ({"strategy": "ddp"}, 2),
    "fsdp": ({"strategy": "fsdp"}, 2),
    "deepspeed ZeRO-3": ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, 2),
    "tp 2": ({"strategy": "ddp", "tp_size": 2}, 2),
}


def stage(data: Path, parallel: dict, workers: int, steps: int) -> dict:
    return {
        "data": str(data), "model": MODEL, "batch": BATCH, "steps": steps, "parallel": parallel,
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "scaling": {"num_workers": workers, "cpus_per_worker": 2 // workers},
        "checkpoint": {"every": 10**6}, "eval": {"every": 10**6, "batches": 1}, "log_every": 1, "export": False,
    }


def run_case(name: str, data: Path, parallel: dict, workers: int, steps: int, work: Path,
             env: dict) -> tuple[int, list[int]]:
    slug = "".join(c if c.isalnum() else "_" for c in name) + ("_mmap" if "MALLOC_MMAP_THRESHOLD_" in env else "")
    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump({"name": slug, "output_dir": str(work / slug),
                                    "stages": {"pretrain": stage(data, parallel, workers, steps)}}, sort_keys=False))
    plan = subprocess.run([sys.executable, "-m", "lmfleet.cli", "plan", str(path), "--json"],
                          check=True, capture_output=True, text=True)
    predicted = json.loads(plan.stdout)["memory"]["peak"]
    # The workers inherit the environment through the local Ray that `lmfleet run` starts.
    done = subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(path)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        sys.exit(f"{name}: lmfleet run failed:\n{done.stderr[-3000:]}")
    report = json.loads((work / slug / "pretrain" / "report.json").read_text())
    return predicted, report["memory"]["peak_bytes_per_rank"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a data stage output dir (default: run the quickstart data stage)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(REPO / "jobs" / "quickstart.yaml"),
                            "--stage", "data", "--set", f"output_dir={work / 'data_run'}"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            data = work / "data_run" / "data"
        print(f"model {MODEL}, batch {BATCH}, {args.steps} steps, fp32 on CPU; MiB per rank (max over ranks)")
        print(f"{'case':42s} {'predicted':>10s} {'RSS':>9s} {'ratio':>6s} {'RSS, mmap':>10s} {'ratio':>6s}")
        worst = 0.0
        plain = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        for name, (parallel, workers) in cases.items():
            predicted, rss = run_case(name, data, parallel, workers, args.steps, work, plain)
            _, mapped = run_case(name, data, parallel, workers, args.steps, work,
                                 {**plain, "MALLOC_MMAP_THRESHOLD_": "131072"})
            worst = max(worst, abs(max(mapped) / predicted - 1))
            print(f"{name:42s} {predicted / 2**20:10.1f} {max(rss) / 2**20:9.1f} {max(rss) / predicted:6.3f} "
                  f"{max(mapped) / 2**20:10.1f} {max(mapped) / predicted:6.3f}", flush=True)
        print(f"largest deviation with RSS following the live tensors: {100 * worst:.1f}% (target <= 15%)")


if __name__ == "__main__":
    main()
