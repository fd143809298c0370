"""`lmfleet plan`'s predicted peak memory per rank against the peak each rank measured in a real run, for a
~100M-parameter model under each strategy on this machine's CPU, then post-training it (SFT, with and
without LoRA; DPO, whose frozen reference doubles the weights) and SFT of a vocab-heavy model, whose
loss's logits weigh as much as its states. Target: within +-15% for each.

    python benchmarks/plan_vs_measured.py [--data runs/quickstart/data] [--steps 3] [--only ddp,fsdp]

Without --data it first runs the data stage of jobs/quickstart.yaml (stdlib docstrings, vocab 4096,
seq_len 256). Each case is one `lmfleet run` of a pretrain stage (a fresh Ray, fresh worker processes);
measured = the stage report's `memory.peak_bytes_per_rank` (CPU: each rank's peak RSS above its RSS
before it built the model; lmfleet.train.memory); predicted = `lmfleet plan CONFIG --json`'s
`memory.peak` (post-training: `rank_peak`) for the same config.

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
# Post-training of the same model (random weights, exported as a HF Llama dir) on python_functions records:
# name: (kind, stage keys). One record per forward pass, 3 optimizer steps, 2 workers. The plan counts
# sequences of training.max_length tokens: python_functions' records, 61-217 tokens (median ~72) with the
# quickstart tokenizer, fill 64 (truncated).
POST_LENGTH = 64
NO_EVAL = {"samples": 0, "generation": {"max_new_tokens": 16}}
POSTTRAIN = {
    "sft (ddp)": ("sft", {"eval": NO_EVAL}),
    "sft + LoRA r 16": ("sft", {"eval": NO_EVAL, "peft": {"r": 16}}),
    "dpo (policy + reference)": ("dpo", {"eval": NO_EVAL}),
    # Vocab-heavy: the loss's logits (TRL's fused LM head: ~8 tiles of the micro-batch's 1,024 tokens x 32,768
    # columns on CPU) about as large as the 59M-parameter model's weights, gradients and AdamW states.
    "sft (vocab 32768; micro-batch 16)": ("sft", {"eval": NO_EVAL, "batch": {"micro_batch": 16}}),
}
# The vocab-heavy case's model: its vocab beyond the tokenizer's (ids the data never uses still cost logits).
VOCAB_HEAVY = {"n_layers": 8, "d_model": 512, "n_heads": 8, "max_seq_len": 256, "vocab_size": 32768}


def stage(data: Path, parallel: dict, workers: int, steps: int) -> dict:
    return {
        "data": str(data), "model": MODEL, "batch": BATCH, "steps": steps, "parallel": parallel,
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "scaling": {"num_workers": workers, "cpus_per_worker": 2 // workers},
        "checkpoint": {"every": 10**6}, "eval": {"every": 10**6, "batches": 1}, "log_every": 1, "export": False,
    }


def posttrain_stage(model_dir: Path, kind: str, keys: dict, steps: int) -> dict:
    return {"kind": kind, "model": str(model_dir), "dataset": {"format": "python_functions", "max_records": 64},
            "training": {"max_steps": steps, "max_length": POST_LENGTH}, "batch": {"micro_batch": 1},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1}, "checkpoint": {"every": 10**6}, **keys}


def hf_model(data: Path, work: Path, model: dict | None = None) -> Path:
    """MODEL (or `model`) with random weights as a HF Llama dir with the data's tokenizer: the post-training
    input. Vocab: the tokenizer's unless `model` sets one."""
    import torch

    from lmfleet.model.config import ModelConfig
    from lmfleet.model.export import export_model
    from lmfleet.model.transformer import Transformer

    index = json.loads((data / "packed" / "index.json").read_text())
    cfg = ModelConfig(**{"vocab_size": index["vocab_size"], **(model or MODEL)})
    out = work / f"hf_model_{cfg.vocab_size}_{cfg.d_model}"
    torch.manual_seed(0)
    export_model(Transformer(cfg).state_dict(), cfg, out, data / "tokenizer", eos_id=index["eos_id"],
                 pad_id=index["pad_id"])
    return out


def run_case(name: str, stage_cfg: dict, work: Path, env: dict) -> tuple[int, list[int]]:
    """(predicted peak, each rank's measured peak) of one stage run on a fresh local Ray."""
    slug = "".join(c if c.isalnum() else "_" for c in name) + ("_mmap" if "MALLOC_MMAP_THRESHOLD_" in env else "")
    path = work / f"{slug}.yaml"
    kind = stage_cfg.get("kind", "pretrain")
    path.write_text(yaml.safe_dump({"name": slug, "output_dir": str(work / slug), "stages": {kind: stage_cfg}},
                                   sort_keys=False))
    planned = subprocess.run([sys.executable, "-m", "lmfleet.cli", "plan", str(path), "--json"], capture_output=True,
                             text=True)
    if planned.returncode:
        sys.exit(f"{name}: lmfleet plan failed:\n{planned.stderr[-3000:]}")
    plan = json.loads(planned.stdout)
    predicted = plan["memory"]["peak"] if kind == "pretrain" else plan["rank_peak"]
    # The workers inherit the environment through the local Ray that `lmfleet run` starts.
    done = subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(path)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        sys.exit(f"{name}: lmfleet run failed:\n{done.stderr[-3000:]}")
    report = json.loads((work / slug / kind / "report.json").read_text())
    return predicted, report["memory"]["peak_bytes_per_rank"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a data stage output dir (default: run the quickstart data stage)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    wanted = lambda name: not args.only or name in args.only.split(",")  # noqa: E731
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
        cases = {name: stage(data, parallel, workers, args.steps) for name, (parallel, workers) in CASES.items()
                 if wanted(name)}
        for name, (kind, keys) in POSTTRAIN.items():
            if wanted(name):
                model_dir = hf_model(data, work, VOCAB_HEAVY if "vocab" in name else None)
                cases[name] = posttrain_stage(model_dir, kind, keys, args.steps)
        for name, stage_cfg in cases.items():
            predicted, rss = run_case(name, stage_cfg, work, plain)
            _, mapped = run_case(name, stage_cfg, work, {**plain, "MALLOC_MMAP_THRESHOLD_": "131072"})
            worst = max(worst, abs(max(mapped) / predicted - 1))
            print(f"{name:42s} {predicted / 2**20:10.1f} {max(rss) / 2**20:9.1f} {max(rss) / predicted:6.3f} "
                  f"{max(mapped) / 2**20:10.1f} {max(mapped) / predicted:6.3f}", flush=True)
        print(f"largest deviation with RSS following the live tensors: {100 * worst:.1f}% (target <= 15%)")


if __name__ == "__main__":
    main()
