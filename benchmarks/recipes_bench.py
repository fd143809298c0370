"""Training recipes side by side: the same data, model size and steps, one lmfleet run, this machine's CPUs.

    python benchmarks/recipes_bench.py [--data runs/x/data] [--steps 300]

- objectives: clm vs fim vs span_infill, each on its own validation loss, and every causal model's plain
  left-to-right (clm) validation loss (FIM "for free": does rearranging half the documents cost left-to-right
  quality?);
- curriculum: clm with and without a length curriculum (validation loss);
- Mixture of Experts: dense vs MoE at equal active parameters (4 experts of half the dense FFN, top 2):
  validation loss and tokens/s;
- optimizers: AdamW vs 8-bit AdamW (bitsandbytes): optimizer state bytes, final training and validation loss;
- pruning: the clm model magnitude-pruned to 30 / 50 / 70% (global), validation perplexity as pruned and after
  50 recovery steps.

Without --data it first runs a data stage on ../shared/data (C4 and Shakespeare, 2,048-token BPE, 128-token
samples). Each variant is a pretrain stage of one run config; all share seed, data order and initial weights.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = {"n_layers": 4, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}
BATCH = {"global_batch": 16, "micro_batch": 16}
VARIANTS = {
    "clm": {},
    "fim": {"objective": {"kind": "fim", "rate": 0.5}},
    "span_infill": {"objective": {"kind": "span_infill"}},
    "adamw_8bit": {"optimizer": {"name": "adamw_8bit", "lr": 3e-3}},
    "curriculum": {"curriculum": {"score": "length", "start_fraction": 0.25}},
    "moe": {"model": {**MODEL, "ffn_dim": 172, "moe": {"num_experts": 4, "top_k": 2}}},  # dense: 344 (SwiGLU of 128)
}
PRUNE = (0.3, 0.5, 0.7)
RECOVERY = 50


def data_stage() -> dict:
    return {"sources": [{"name": "c4", "format": "jsonl", "paths": [str(SHARED / "c4_demo.jsonl")]},
                        {"name": "plays", "format": "text", "text_unit": "block",
                         "paths": [str(SHARED / "tinyshakespeare.txt")]}],
            "tokenizer": {"vocab_size": 2048}, "pack": {"seq_len": 128, "val_fraction": 0.05}}


def pretrain_stage(data: str, steps: int, **over) -> dict:
    stage = {"kind": "pretrain", "data": data, "model": MODEL, "batch": BATCH, "steps": steps,
             "optimizer": {"lr": 3e-3}, "lr_schedule": {"warmup_steps": steps // 10},
             "parallel": {"strategy": "none"}, "scaling": {"num_workers": 1, "cpus_per_worker": 2},
             "checkpoint": {"every": steps}, "eval": {"every": steps, "batches": 8}, "log_every": 10}
    return {**stage, **over}


def clm_val_loss(model_dir: Path, packed: Path, batches: int = 8) -> float:
    """Left-to-right loss of an exported causal model on the first batches of the val split (the samples the
    stages evaluate on)."""
    from lmfleet.model.export import load_model
    from lmfleet.prune.stage import val_loss

    pad = json.loads((packed / "index.json").read_text())["pad_id"]
    return val_loss(load_model(model_dir).eval(), str(packed), batches, BATCH["global_batch"], pad)


def _params(model_dir: Path) -> int:
    from lmfleet.model.export import load_model

    return sum(p.numel() for p in load_model(model_dir).parameters())


def optimizer_bytes(name: str, vocab: int) -> int:
    """Optimizer state bytes after one step of the benchmark's model."""
    from lmfleet.model import ModelConfig, Transformer
    from lmfleet.train.config import OptimizerConfig
    from lmfleet.train.optim import build_optimizer

    model = Transformer(ModelConfig(**MODEL, vocab_size=vocab))
    opt = build_optimizer(model, OptimizerConfig(name=name))
    model(torch.randint(0, vocab, (2, 16))).sum().backward()
    opt.step()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a data stage output dir (default: a data stage on ../shared/data)")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stages = {} if args.data else {"data": data_stage()}
        data = str(args.data.resolve()) if args.data else "data"
        stages.update({name: pretrain_stage(data, args.steps, **over) for name, over in VARIANTS.items()})
        for sparsity in PRUNE:
            for steps in (0, RECOVERY):
                stages[f"prune{int(100 * sparsity)}_{steps}"] = {
                    "kind": "prune", "model": "clm", "data": data, "sparsity": sparsity, "eval_batches": 8,
                    "recovery": {"steps": steps, "batch": BATCH, "scaling": {"num_workers": 1, "cpus_per_worker": 2}}}
        path = work / "recipes.yaml"
        path.write_text(yaml.safe_dump({"name": "recipes", "output_dir": str(work / "run"), "stages": stages}, sort_keys=False))
        proc = subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(path)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the run failed:\n{proc.stderr[-3000:]}")
        run = work / "run"
        packed = (args.data.resolve() if args.data else run / "data") / "packed"
        vocab = json.loads((packed / "index.json").read_text())["vocab_size"]
        reports = {name: json.loads((run / name / "report.json").read_text()) for name in VARIANTS}
        print(f"settings: model {MODEL}, batch {BATCH}, {args.steps} steps, vocab {vocab}, torch {torch.__version__}")
        print("objectives (each on its own validation loss; clm val loss: every model read left to right):")
        print("| objective | final train loss | own val loss | clm val loss | clm val perplexity | target tokens/s |")
        print("|---|---|---|---|---|---|")
        for name in ("clm", "fim", "span_infill"):
            r = reports[name]
            clm = clm_val_loss(run / name / "model", packed)
            print(f"| {name} | {r['final_loss']:.4f} | {r['val_loss']:.4f} | {clm:.4f} | {math.exp(clm):.2f} | "
                  f"{r['tokens_per_s']:,.0f} |")
        print("optimizers (clm):")
        print("| optimizer | state bytes | final train loss | val loss | tokens/s |")
        print("|---|---|---|---|---|")
        for name, opt in (("clm", "adamw"), ("adamw_8bit", "adamw_8bit")):
            r = reports[name]
            print(f"| {opt} | {optimizer_bytes(opt, vocab):,} | {r['final_loss']:.4f} | {r['val_loss']:.4f} | "
                  f"{r['tokens_per_s']:,.0f} |")
        print("curriculum (clm):")
        print("| run | final train loss | val loss |")
        print("|---|---|---|")
        for name in ("clm", "curriculum"):
            print(f"| {name} | {reports[name]['final_loss']:.4f} | {reports[name]['val_loss']:.4f} |")
        print("dense vs MoE at equal active parameters:")
        print("| model | parameters | val loss | tokens/s |")
        print("|---|---|---|---|")
        for name in ("clm", "moe"):
            count = _params(run / name / "model")
            print(f"| {'dense' if name == 'clm' else 'MoE 4 x top 2'} | {count:,} | {reports[name]['val_loss']:.4f} | "
                  f"{reports[name]['tokens_per_s']:,.0f} |")
        print("magnitude pruning of the clm model (global):")
        print(f"| sparsity | val perplexity, pruned | after {RECOVERY} recovery steps |")
        print("|---|---|---|")
        print(f"| 0 | {math.exp(reports['clm']['val_loss']):.2f} | |")
        for sparsity in PRUNE:
            pruned = json.loads((run / f"prune{int(100 * sparsity)}_0" / "report.json").read_text())
            recovered = json.loads((run / f"prune{int(100 * sparsity)}_{RECOVERY}" / "report.json").read_text())
            print(f"| {pruned['pruned']['sparsity']:.0%} | {pruned['pruned']['val_perplexity']:.2f} | "
                  f"{recovered['recovered']['val_perplexity']:.2f} |")


if __name__ == "__main__":
    main()
