"""PPO for RLHF (InstructGPT, Ouyang et al. 2022), our own: TRL no longer ships a PPOTrainer.

Four models: the policy (the SFT model) with a value head on its last hidden state (trained), a
frozen reference copy of the SFT model (per-token KL penalty), and the frozen reward model (score of
each full response). Every iteration: sample responses to `rollout_batch` prompts, score them, shape
per-token rewards (score at the last token minus kl_coef * (log pi - log ref) at every token), GAE
advantages (whitened over each worker's share) and returns, then `ppo_epochs` passes of clipped
policy + clipped value loss.

Where the models live: all four in each Ray Train worker. Workers split every rollout batch (data
parallel); DDP averages the policy / value gradients. More workers or nodes = more prompts per
second at the same batch semantics; each worker needs memory for the four models (the reference and
reward model are frozen, no optimizer state). Checkpoints (policy, value head, optimizer, iteration,
KL coefficient) go to Ray Train every `checkpoint_every` iterations; restarted workers resume there.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lmfleet.errors import InputError
from lmfleet.outputs import publish, workdir
from lmfleet.posttrain.config import PREFERENCE_FORMATS, PPOStageConfig
from lmfleet.posttrain.inputs import check_ppo
from lmfleet.posttrain.models import input_model, local_models
from lmfleet.posttrain.records import prompt_of
from lmfleet.runlog import read_jsonl
from lmfleet.storage import checkpoint_uri
from lmfleet.uri import local_copy

# -- PPO math: pure functions on [batch, response_len] tensors; `mask` marks real response tokens --


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); zeros outside the mask."""
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (log pi - log ref) at every token, plus the score at the last one."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = mask.sum(dim=1).long() - 1
    rows = torch.arange(len(scores))
    rewards[rows, last.clamp(min=0)] += scores * (last >= 0)
    return rewards


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016); the value after the last token is 0."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m  # padding after the response has no value
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (negated, to minimize) and the fraction of clipped tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2), masked mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKL:
    """kl_coef follows the rollouts' KL towards a target (Ziegler et al. 2019), or stays fixed."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, samples: int) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * samples / self.horizon


# -- models --


class PolicyWithValue(nn.Module):
    """A causal LM and a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def response_stats(model, seq, attention, prompt_len: int, with_values: bool, temperature: float = 1.0):
    """Log-probs under softmax(logits / temperature), the distribution responses were sampled from (and
    values) at the response positions: logits at t predict token t + 1."""
    # Left-padded prompts: count positions from each row's first real token, as generate() did.
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    if with_values:
        logits, values = model(seq, attention, position_ids=positions)
        values = values[:, prompt_len - 1 : -1]
    else:
        logits, values = model(input_ids=seq, attention_mask=attention, position_ids=positions).logits, None
    return token_logprobs(logits[:, prompt_len - 1 : -1] / temperature, seq[:, prompt_len:]), values


# -- the Ray Train worker --


def read_prompt_records(cfg: PPOStageConfig, seed: int):
    """SFT or preference records (PPO takes their prompts); `auto` reads both ways and keeps the one that fits."""
    from lmfleet.posttrain.records import read_preferences, read_sft

    fmt = cfg.dataset.format
    if fmt == "auto":
        return max((read_sft(cfg.dataset, seed), read_preferences(cfg.dataset, seed)), key=lambda r: r.counts()["kept"])
    if fmt in PREFERENCE_FORMATS and fmt != "python_functions":
        return read_preferences(cfg.dataset, seed)
    return read_sft(cfg.dataset, seed)


class PPOTrainer:
    """One worker's share of PPO: generation, scoring, advantages, updates, checkpoints."""

    def __init__(self, cfg: PPOStageConfig, paths: dict, seed: int):
        import ray.train
        import ray.train.torch
        from transformers import AutoModelForCausalLM

        from lmfleet.posttrain.models import load_tokenizer
        from lmfleet.posttrain.reward import load_reward_model

        self.cfg, self.seed = cfg, seed
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if paths["use_gpu"] else torch.device("cpu")
        self.tok = load_tokenizer(Path(paths["model"]))
        self.tok.padding_side = "left"
        torch.manual_seed(seed)
        # fp32 master weights whatever the checkpoint's dtype (transformers loads dtype="auto").
        policy = PolicyWithValue(AutoModelForCausalLM.from_pretrained(paths["model"]).float())
        for m in policy.modules():  # no dropout: the first ratio of every PPO epoch must be exactly 1
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        self.policy = ray.train.torch.prepare_model(policy, move_to_device=self.device)
        self.module = policy
        self.ref = AutoModelForCausalLM.from_pretrained(paths["model"]).float().to(self.device).eval()
        self.ref.requires_grad_(False)
        self.rm, self.rm_tok = load_reward_model(Path(paths["reward_model"]))
        self.rm.to(self.device).eval().requires_grad_(False)
        t = cfg.training
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        self.kl = AdaptiveKL(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.prompts = read_jsonl(paths["prompts"])

    def batch_prompts(self, iteration: int) -> list[list[dict]]:
        """This worker's slice of the iteration's prompts (a seeded order over epochs of the prompt set)."""
        n = self.cfg.ppo.rollout_batch
        order: list[int] = []
        epoch = (iteration * n) // len(self.prompts)
        while len(order) < (iteration * n) % len(self.prompts) + n:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            order += torch.randperm(len(self.prompts), generator=g).tolist()
            epoch += 1
        start = (iteration * n) % len(self.prompts)
        return [self.prompts[i] for i in order[start : start + n][self.rank :: self.world]]

    @torch.no_grad()
    def rollout(self, prompts: list[list[dict]]) -> dict:
        from lmfleet.posttrain.evaluate import encode_chat, reward_scores

        g, t, p = self.cfg.generation, self.cfg.training, self.cfg.ppo
        ids = [encode_chat(self.tok, q)[0][-(t.max_length - g.max_new_tokens):] for q in prompts]
        enc = self.tok.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        self.module.eval()
        seq = self.module.lm.generate(
            **enc, do_sample=g.temperature > 0, max_new_tokens=g.max_new_tokens, pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
            **({"temperature": g.temperature, "top_k": g.top_k or None, "top_p": g.top_p} if g.temperature > 0 else {}),
        )
        prompt_len = enc["input_ids"].shape[1]
        response = seq[:, prompt_len:]
        # Real tokens: up to and including the first EOS.
        is_eos = response == self.tok.eos_token_id
        after_eos = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
        mask = (~after_eos).float()
        attention = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        logprobs, values = response_stats(self.policy, seq, attention, prompt_len, True, g.temperature)
        ref_logprobs, _ = response_stats(self.ref, seq, attention, prompt_len, False, g.temperature)
        texts = [self.tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask,
                                                                                                  strict=True)]
        scores = torch.tensor(reward_scores(self.rm, self.rm_tok, prompts, texts, t.max_length), device=self.device)
        has_eos = is_eos.any(dim=1)
        if p.missing_eos_penalty is not None:
            scores = scores + p.missing_eos_penalty * (~has_eos)
        rewards = shaped_rewards(logprobs, ref_logprobs, scores, mask, self.kl.coef)
        advantages, returns = gae(rewards, values * mask, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return {"seq": seq, "attention": attention, "prompt_len": prompt_len, "mask": mask, "logprobs": logprobs,
                "values": values * mask, "advantages": advantages, "returns": returns, "scores": scores,
                "kl": ((logprobs - ref_logprobs) * mask).sum(dim=1), "length": mask.sum(dim=1),
                "has_eos": has_eos.float()}

    def optimize(self, batch: dict, iteration: int) -> dict:
        p = self.cfg.ppo
        self.module.train()
        local_mb = p.mini_batch // self.world
        n = len(batch["seq"])
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": []}
        g = torch.Generator().manual_seed(self.seed * 104_729 + iteration * 31 + self.rank)
        for _ in range(p.ppo_epochs):
            for idx in torch.randperm(n, generator=g).split(local_mb):
                mb = {k: v[idx] for k, v in batch.items() if isinstance(v, torch.Tensor)}
                logprobs, values = response_stats(self.policy, mb["seq"], mb["attention"], batch["prompt_len"], True,
                                                  self.cfg.generation.temperature)
                pg, clipfrac = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], p.clip_range)
                vf = value_loss(values, mb["values"], mb["returns"], mb["mask"], p.value_clip_range)
                (pg + p.vf_coef * vf).backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.training.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats["policy_loss"].append(float(pg))
                stats["value_loss"].append(float(vf))
                stats["clipfrac"].append(float(clipfrac))
                stats["approx_kl"].append(float(masked_mean(0.5 * (logprobs - mb["logprobs"]) ** 2, mb["mask"])))
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def mean_over_workers(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(values)
        sums = torch.stack([values[k].float().sum() for k in keys] + [torch.tensor(float(len(values[keys[0]])))])
        sums = sums.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        return {k: float(sums[i] / sums[-1]) for i, k in enumerate(keys)}

    def save(self, iteration: int, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                torch.save({"policy": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "iteration": iteration, "kl_coef": self.kl.coef}, Path(d) / "ppo.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"iteration_{iteration:06d}")

    def restore(self) -> int:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "ppo.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.coef = state["kl_coef"]
        return state["iteration"]


def _worker(config: dict) -> None:
    cfg = PPOStageConfig.model_validate(config["cfg"])
    paths = local_models(config["paths"])
    trainer = PPOTrainer(cfg, paths, config["seed"])
    for iteration in range(trainer.restore(), cfg.iterations):
        started = time.perf_counter()
        torch.manual_seed(config["seed"] * 1_000_003 + iteration * 7919 + trainer.rank)  # sampling
        batch = trainer.rollout(trainer.batch_prompts(iteration))
        kl_coef = trainer.kl.coef
        stats = trainer.optimize(batch, iteration)
        rollout = trainer.mean_over_workers({k: batch[k] for k in ("scores", "kl", "length", "has_eos")})
        trainer.kl.update(rollout["kl"], cfg.ppo.rollout_batch)
        metrics = {"iteration": iteration + 1, "score": rollout["scores"], "kl": rollout["kl"],
                   "response_length": rollout["length"], "eos_fraction": rollout["has_eos"], "kl_coef": kl_coef,
                   **stats, "seconds": time.perf_counter() - started}
        if trainer.rank == 0:
            config["metrics"].write(config["stage"], **metrics)
        if (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.iterations:
            trainer.save(iteration + 1, metrics)
    if trainer.rank == 0:
        local = workdir(paths["export"], fresh=True)
        trainer.module.lm.save_pretrained(str(local))
        trainer.tok.padding_side = "right"  # left was for generation; the next stage trains on it
        trainer.tok.save_pretrained(str(local))
        publish(local, paths["export"], move=True)


def evaluate(cfg: PPOStageConfig, paths: dict) -> dict:
    from lmfleet.posttrain.evaluate import compare_policies, device
    from lmfleet.posttrain.models import load_causal_lm, load_tokenizer

    prompts = read_jsonl(paths["val_prompts"])[: cfg.eval.samples]
    if not prompts:
        return {"samples": 0}
    policy = load_causal_lm(Path(paths["trained"])).to(device(paths["use_gpu"])).eval()
    reference = load_causal_lm(Path(paths["model"])).to(device(paths["use_gpu"])).eval()
    tok = load_tokenizer(Path(paths["trained"]))
    return compare_policies(policy, reference, tok, prompts, Path(paths["reward_model"]), cfg.generation,
                            cfg.training.max_length)


def run_ppo_stage(cfg: PPOStageConfig, ctx) -> dict:
    from lmfleet.posttrain.evaluate import policy_line
    from lmfleet.posttrain.hf import fit, quarantine_long_prompts, run_eval_task
    from lmfleet.posttrain.models import load_tokenizer

    check_ppo(cfg, run_dir=ctx.run_dir)
    out = ctx.out_dir
    policy_dir = input_model(cfg.model, ctx.run_dir)
    with ctx.step("read"):
        records = read_prompt_records(cfg, ctx.seed)
        # A prompt must leave room for max_new_tokens: longer ones are quarantined, not cut.
        quarantine_long_prompts(records, load_tokenizer(local_copy(policy_dir)),
                                cfg.training.max_length - cfg.generation.max_new_tokens)
        records.write(out / "data")
        for name, rows in (("prompts", records.train), ("val_prompts", records.val)):
            (out / "data" / f"{name}.jsonl").write_text(
                "".join(json.dumps(prompt_of(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        ctx.publish("data")  # the workers read it, on any node
    if not records.train:
        raise InputError(f"ppo.dataset: no usable prompts ({records.counts()})")
    use_gpu = cfg.scaling.resolve_gpu()
    paths = {
        "model": policy_dir, "reward_model": input_model(cfg.reward_model, ctx.run_dir),
        "prompts": ctx.uri("data", "prompts.jsonl"), "val_prompts": ctx.uri("data", "val_prompts.jsonl"),
        "out": str(ctx.out), "export": ctx.uri("model"), "use_gpu": use_gpu,
    }
    result, history = fit(_worker, {"paths": paths}, cfg, ctx, use_gpu)
    history = [h for h in history if "score" in h]
    with ctx.step("evaluate"):
        evaluation = run_eval_task(evaluate, cfg, paths)
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2), encoding="utf-8")
    first, last = (history[0], history[-1]) if history else ({}, {})
    report = {
        "data": records.counts(), "model": paths["export"], "iterations": cfg.iterations,
        "first_score": first.get("score"), "final_score": last.get("score"), "final_kl": last.get("kl"),
        "checkpoint": checkpoint_uri(result.checkpoint), "eval": evaluation,
    }
    report["summary"] = [
        f"prompts: {len(records.train)} train, {len(records.val)} val, {records.counts()['rejected']} quarantined",
        f"{cfg.iterations} PPO iterations on {cfg.scaling.bounds[0]} worker(s): rollout score "
        f"{report['first_score']:.3f} -> {report['final_score']:.3f}, KL {report['final_kl']:.3f}"
        if history else "no iteration logged",
        policy_line(evaluation) if "win_rate" in evaluation else "evaluation: no held-out prompts",
        f"model: {paths['export']}",
    ]
    (out / "report.json").write_text(json.dumps({**report, "seconds": ctx.seconds}, indent=2), encoding="utf-8")
    return report
