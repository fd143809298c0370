"""Tokens/s of the Ray Train pretraining loop vs a bare PyTorch loop: same tiny model, same batches,
1 worker, this machine's CPU (or GPU). Target: ratio >= 0.95.

    python benchmarks/train_bench.py [--data runs/quickstart/data] [--steps 40]

Without --data it first runs the data stage of jobs/quickstart.yaml (stdlib docstrings).
Both loops report steady-state tokens/s: the median over steps after the first five.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = {"n_layers": 4, "d_model": 256, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 256}
BATCH = {"global_batch": 16, "micro_batch": 8}


def bare_loop(packed: Path, steps: int) -> list[float]:
    """The same model, optimizer, batches and loss as the platform, with nothing around it."""
    from lmfleet.data.packing import PackedDataset
    from lmfleet.model import ModelConfig, Transformer
    from lmfleet.train.config import OptimizerConfig
    from lmfleet.train.data import BatchPlan, load_batch
    from lmfleet.train.loss import per_sample_ce
    from lmfleet.train.optim import build_optimizer

    index = json.loads((packed / "index.json").read_text())
    ds = PackedDataset(packed, "train")
    model = Transformer(ModelConfig(**MODEL, vocab_size=index["vocab_size"]), seed=1)  # the run's default seed
    opt = build_optimizer(model, OptimizerConfig())
    plan = BatchPlan(ds.source_ranges(), BATCH["global_batch"], 1, None)
    rates = []
    for step in range(steps):
        batch = plan.next_batch(step)
        start = time.perf_counter()
        inputs, positions, targets = load_batch(ds, batch, index["pad_id"], torch.device("cpu"))
        n = float((targets != -100).sum())
        for k in range(0, len(inputs), BATCH["micro_batch"]):
            sl = slice(k, k + BATCH["micro_batch"])
            (per_sample_ce(model(inputs[sl], positions[sl]), targets[sl]).sum() / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(n / (time.perf_counter() - start))
    return rates


def ray_loop(data: Path, steps: int, work: Path) -> list[float]:
    cfg = {"name": "bench", "output_dir": str(work / "ray"), "stages": {"pretrain": {
        "data": str(data), "model": MODEL, "batch": BATCH, "steps": steps,
        # All CPUs for the one worker: Ray sets OMP_NUM_THREADS from the worker's CPUs.
        "parallel": {"strategy": "none"}, "scaling": {"num_workers": 1, "cpus_per_worker": os.cpu_count()},
        "checkpoint": {"every": steps}, "eval": {"every": steps, "batches": 1}, "log_every": 1, "export": False,
    }}}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (work / "ray" / "metrics.jsonl").read_text().splitlines()]
    return [x["tokens_per_s"] for x in lines if "tokens_per_s" in x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a data stage output dir (default: run the quickstart data stage)")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(REPO / "jobs" / "quickstart.yaml"),
                            "--set", f"output_dir={work / 'data_run'}"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            data = work / "data_run" / "data"
        packed = data / "packed"
        print(f"settings: model {MODEL}, batch {BATCH}, steps {args.steps}, torch {torch.__version__}, "
              f"threads {torch.get_num_threads()}")
        ray_rates = ray_loop(data, args.steps, work)
        bare_rates = bare_loop(packed, args.steps)
    ray_tps = statistics.median(ray_rates[5:])
    bare_tps = statistics.median(bare_rates[5:])
    print(f"train loop tokens/s: lmfleet on Ray Train {ray_tps:,.0f}, bare PyTorch {bare_tps:,.0f}, "
          f"ratio {ray_tps / bare_tps:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
