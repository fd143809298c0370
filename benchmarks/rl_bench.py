"""Where an RL iteration's time goes, on the demo's models: PPO, GRPO and RLOO at 1 and 2 workers, colocated
vs split placement; and lmfleet's GRPO beside TRL's GRPOTrainer on the same model, prompts and settings.

    make demo                                   # once: the SFT and reward models of runs/quickstart
    python benchmarks/rl_bench.py [--run-dir runs/quickstart] [--iterations 8]

Every run: the demo's SFT model as the policy, its reward model plus the demo's regex reward, 8 prompts
of the demo's per iteration (GRPO / RLOO: 4 completions each; PPO: 32 prompts, one completion each, so
every iteration samples 32 completions of up to 48 tokens), one update pass of 32 completions per
iteration. Per iteration (median over iterations after the first): seconds in generation, scoring
(reward model + functions) and training (log-probs + backward + step), all of it, and rollout
tokens/s. The embedded Ray is told 3 CPUs so a split run's actor has its own (the machine's cores are
shared by all: on 2 cores, 2 workers + an actor oversubscribe them).

TRL side by side: `trl.GRPOTrainer` in this process (no Ray), same model, prompts, reward model + regex
reward, 32 completions (8 prompts x 4) per step, one optimizer step on them, beta 0.04, token-level loss,
group-scaled rewards; its seconds per step (median after the first) over lmfleet GRPO's at 1 worker
colocated (mini_batch 32: one step per iteration too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REGEX = {"function": "lmfleet.posttrain.rewards:regex", "weight": 1.0, "args": {"pattern": r"^[A-Z].*\.$", "full": True}}


def stage(kind: str, run_dir: Path, workers: int, placement: str, iterations: int) -> dict:
    cfg = {
        "kind": kind, "model": str(run_dir / "sft" / "model"), "reward_model": str(run_dir / "reward" / "model"),
        "reward_functions": [REGEX], "iterations": iterations, "checkpoint": {"every": iterations},
        "dataset": {"format": "python_functions", "max_records": 1000, "val_fraction": 0.05},
        "training": {"max_length": 192}, "optimizer": {"lr": 5e-5}, "generation": {"max_new_tokens": 48},
        "scaling": {"num_workers": workers}, "eval": {"samples": 0}, "placement": placement,
        "split": {"actors": 1, "cpus_per_actor": 1},
    }
    group = {"rollout_batch": 8, "num_generations": 4, "mini_batch": 32}
    cfg[kind] = {"rollout_batch": 32, "mini_batch": 32, "epochs": 1} if kind == "ppo" else group
    if kind == "grpo":
        cfg[kind]["kl_coef"] = 0.04
    return cfg


def ours(kind: str, run_dir: Path, workers: int, placement: str, iterations: int, out: Path) -> dict:
    from lmfleet.runner import load_run, run

    name = f"{kind}_{workers}_{placement}"
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(out / name), "ray": {"num_cpus": 3},
                                    "stages": {kind: stage(kind, run_dir, workers, placement, iterations)}},
                                   sort_keys=False))
    run(load_run(path))
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "iteration" in r][1:]  # the first iteration warms up
    med = {k: statistics.median(r[k] for r in rows) for k in
           ("generation_seconds", "scoring_seconds", "training_seconds", "seconds", "rollout_tokens_per_s")}
    return {"kind": kind, "workers": workers, "placement": placement, **med}


def trl_grpo(run_dir: Path, steps: int, out: Path) -> float:
    """Median seconds per step of TRL's GRPOTrainer on the same model, prompts and settings."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lmfleet.posttrain.models import load_tokenizer
    from lmfleet.posttrain.rewards import regex

    prompts = [json.loads(x)["prompt"] for x in (run_dir / "grpo" / "data" / "prompts.jsonl").read_text().splitlines()]
    tok = load_tokenizer(run_dir / "sft" / "model")
    tok.padding_side = "left"
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    def regex_reward(prompts, completions, **kwargs):
        return [regex(None, c[0]["content"] if isinstance(c, list) else c, {}, REGEX["args"]["pattern"], True)
                for c in completions]

    args = GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=32, num_generations=4, max_completion_length=48,
        max_steps=steps, learning_rate=5e-5, beta=0.04, loss_type="dapo", scale_rewards="group", temperature=1.0,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=1, disable_tqdm=True,
        reward_weights=[1.0, 1.0],
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(run_dir / "sft" / "model")),
        reward_funcs=[str(run_dir / "reward" / "model"), regex_reward], args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok,
        callbacks=[Clock()],
    )
    start = time.perf_counter()
    trainer.train()
    steps_s = [b - a for a, b in zip([start, *marks], marks, strict=False)]
    return statistics.median(steps_s[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's GRPOTrainer")
    a = parser.parse_args()
    for need in ("sft/model", "reward/model", "grpo/data/prompts.jsonl"):
        if not (a.run_dir / need).exists():
            sys.exit(f"{a.run_dir / need} is missing: run `make demo` first (or pass --run-dir)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for kind in ("ppo", "grpo", "rloo"):
            for workers in (1, 2):
                for placement in ("colocated", "split"):
                    results.append(ours(kind, a.run_dir, workers, placement, a.iterations, out))
        trl = None if a.no_trl else trl_grpo(a.run_dir, a.iterations, out)
    print(f"\n{'algorithm':9} {'workers':>7} {'placement':>10} {'generate s':>10} {'score s':>8} {'train s':>8} "
          f"{'iteration s':>11} {'tokens/s':>9}")
    for r in results:
        print(f"{r['kind']:9} {r['workers']:>7} {r['placement']:>10} {r['generation_seconds']:>10.2f} "
              f"{r['scoring_seconds']:>8.2f} {r['training_seconds']:>8.2f} {r['seconds']:>11.2f} "
              f"{r['rollout_tokens_per_s']:>9.0f}")
    for kind in ("ppo", "grpo", "rloo"):
        one, two = (next(r for r in results if r["kind"] == kind and r["workers"] == w and r["placement"] == "colocated")
                    for w in (1, 2))
        print(f"{kind}: 2 workers / 1, colocated, iterations per second: {one['seconds'] / two['seconds']:.2f}")
    if trl is not None:
        mine = next(r for r in results if r["kind"] == "grpo" and r["workers"] == 1 and r["placement"] == "colocated")
        print(f"TRL GRPOTrainer: {trl:.2f} s per step; lmfleet grpo (1 worker, colocated): {mine['seconds']:.2f} s "
              f"per iteration; TRL / lmfleet: {trl / mine['seconds']:.2f}")


if __name__ == "__main__":
    main()
