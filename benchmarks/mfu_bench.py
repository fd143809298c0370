"""GPU throughput and MFU of a ~1B Llama-style model through the real pretraining stage (one GPU, bf16).
Target: MFU >= 55%. Needs a CUDA GPU; prints one line per figure.

    python benchmarks/mfu_bench.py [--steps 30] [--layers 16] [--d-model 2048] [--micro-batch 4]

It packs the stdlib docstrings at seq_len 2048 with a 32k vocabulary (data stage), then trains with
strategy `none` (autocast bf16), once per attention path (`model.attention_impl`: sdpa, flex), and
reports the median tokens/s and MFU of the steps after the first five, from metrics.jsonl, side by side. MFU counts 6 x non-embedding params + attention (PaLM appendix B) against
the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--attention", default="sdpa,flex", help="attention_impl values to compare")
    args = ap.parse_args()
    impls = args.attention.split(",")
    if not torch.cuda.is_available():
        sys.exit("mfu_bench: needs a CUDA GPU (this machine has none)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = {"name": "mfu", "output_dir": str(work / "run"), "stages": {
            "data": {"sources": [{"name": "stdlib", "format": "python_docstrings"}],
                     "tokenizer": {"vocab_size": 32000}, "pack": {"seq_len": args.seq_len, "val_fraction": 0.0}},
            **{f"pretrain_{impl}": {
                "kind": "pretrain", "data": "data",
                "model": {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.heads,
                          "n_kv_heads": args.kv_heads, "max_seq_len": args.seq_len, "attention_impl": impl},
                "batch": {"global_batch": args.micro_batch * 4, "micro_batch": args.micro_batch},
                "steps": args.steps, "parallel": {"strategy": "none"},
                "scaling": {"num_workers": 1, "use_gpu": True},
                "checkpoint": {"every": 10**6}, "eval": {"every": 10**6}, "log_every": 1, "export": False,
            } for impl in impls}}}
        path = work / "mfu.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        subprocess.run([sys.executable, "-m", "lmfleet.cli", "run", str(path)], check=True)
        rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"settings: {args}, gpu {torch.cuda.get_device_name()}")
    for impl in impls:
        steps = [r for r in rows if r.get("stage") == f"pretrain_{impl}" and isinstance(r.get("step"), int)][5:]
        print(f"{impl}: tokens/s {statistics.median(r['tokens_per_s'] for r in steps):,.0f}, "
              f"MFU {100 * statistics.median(r['mfu'] for r in steps):.1f}% (target >= 55%)")


if __name__ == "__main__":
    main()
