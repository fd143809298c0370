"""Optimizers (AdamW, Adafactor, Lion, LAMB, 8-bit AdamW) with weight-decay groups, and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from lmfleet.train.config import LRScheduleConfig, OptimizerConfig

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep fp32 states
BLOCK_8BIT = 256  # elements per absmax (bitsandbytes' 8-bit blockwise optimizers)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; decoupled weight decay."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning", Algorithm 2): Adam's
    bias-corrected step plus decoupled weight decay, scaled per tensor by the trust ratio
    ||w|| / ||step|| (1 where either is 0). Tensors without weight decay (norms, biases) take the plain
    Adam step, as NVIDIA's and timm's LAMB do by default.

    Works on DTensor shards (FSDP2, TP): the norms are of the whole tensor (a sharded norm is gathered
    as a scalar), so every layout takes the single process's step. Not under DeepSpeed ZeRO, which hands
    the optimizer flat partitions of many tensors (the config refuses it)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # a tensor step count, as torch's Adam keeps: DCP saves tensors
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
                ratio = 1.0
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = _norm(p), _norm(update)
                    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
                p.add_(update, alpha=-group["lr"] * ratio)


def _norm(x: torch.Tensor) -> float:
    """The L2 norm of the whole tensor, also when `x` is a DTensor shard (gathered as one scalar)."""
    n = torch.linalg.vector_norm(x)
    return float(n.full_tensor() if hasattr(n, "full_tensor") else n)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never norms, biases or other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr, eps=(None, 1e-3), foreach=False)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "adamw_8bit":
        # bitsandbytes' blockwise 8-bit states (Dettmers et al. 2022: 256-element blocks, dynamic quantization
        # maps): its CPU kernels run here. Tensors under min_8bit_size (4096) elements keep fp32 states.
        import bitsandbytes  # (its CPU warning about 4-bit kernels is silenced in lmfleet/__init__.py)

        return bitsandbytes.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                            min_8bit_size=MIN_8BIT_SIZE)
    return Lion(groups, lr=cfg.lr, betas=cfg.betas)


def apply_hyperparams(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> None:
    """Set the config's weight decay and betas / eps on `optimizer`'s groups (decay, no-decay), e.g. after
    loading a state dict, which restores the saved ones. The lr is set every step."""
    for group, weight_decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0), strict=False):
        group["weight_decay"] = weight_decay
        if "betas" in group:
            group["betas"] = cfg.betas
        if "eps" in group and cfg.name != "adafactor":
            group["eps"] = cfg.eps


def lr_multiplier(step: int, total: int, cfg: LRScheduleConfig) -> float:
    """Factor on the peak lr at `step` (0-based): linear warmup, then the chosen decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.decay == "wsd":  # warmup-stable-decay: flat, then linear decay over the final fraction
        decay_start = total - max(1, int(cfg.wsd_decay_fraction * total))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total - 1 - decay_start)
        return 1.0 - (1.0 - lo) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - 1 - cfg.warmup_steps))
    if cfg.decay == "linear":
        return 1.0 - (1.0 - lo) * progress
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
