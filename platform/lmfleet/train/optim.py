"""Optimizers (AdamW, Adafactor, Lion) with weight-decay groups, and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from lmfleet.train.config import LRScheduleConfig, OptimizerConfig


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
    return Lion(groups, lr=cfg.lr, betas=cfg.betas)


def apply_hyperparams(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> None:
    """Set the config's weight decay and betas / eps on `optimizer`'s groups (decay, no-decay), e.g. after
    loading a state dict, which restores the saved ones. The lr is set every step."""
    for group, weight_decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0), strict=False):
        group["weight_decay"] = weight_decay
        if "betas" in group:
            group["betas"] = cfg.betas
        if cfg.name == "adamw":
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
