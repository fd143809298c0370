"""A sparse Mixture-of-Experts feed-forward layer (token-choice top-k routing) in plain PyTorch.

Each token's router logits (a linear layer, no bias) go through a softmax over the experts; the token goes to
its `top_k` most probable experts (ties to the lower index), weighted by their probabilities renormalized
over the k (Mixtral; `top_k: 1` keeps the raw probability as the gate, as the Switch Transformer does, so the
router still gets a gradient from the loss). Every expert is the dense model's feed-forward block.

Capacity (`capacity_factor`, GShard / Switch): an expert takes at most ceil(factor x tokens x k / experts)
token assignments per forward pass, first-choice assignments before second ones, each in token order; the
rest are dropped (the residual stream carries the token on). `capacity_factor: null` is dropless.

Auxiliary losses, per forward pass, added to the gradient only (the logged loss stays the language-model
loss): load balancing (Switch eq. 4 for top-k: experts/k x sum_e f_e P_e, f_e the fraction of tokens
assigned to e, P_e its mean router probability; 1.0 when balanced) times `aux_loss_coef`, and the router
z-loss (ST-MoE: mean squared logsumexp of the logits) times `z_loss_coef`. They reach the gradient through
`_AuxGradient`, which passes the layer's output through unchanged and hands the auxiliary loss a gradient of
`grad_scale` (Megatron-LM's MoEAuxLossAutoScaler): the trainer sets `grad_scale` to 1 / micro-batches per
step, so the auxiliary terms are averaged over a step's micro-batches as the loss is. Every expert runs in
every forward pass, on no tokens if none chose it, so each parameter is in the graph (DDP needs no
unused-parameter search).

Statistics for the metrics (training passes only) accumulate in `stats` until `take_stats` reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    experts: torch.Tensor  # (N, k) expert of each token's assignment
    weights: torch.Tensor  # (N, k) gate of each assignment (0 where dropped)
    kept: torch.Tensor  # (N, k) bool: within its expert's capacity
    probs: torch.Tensor  # (N, E) router softmax (fp32)


def route(logits: torch.Tensor, top_k: int, capacity_factor: float | None) -> Routing:
    """Token-choice top-k routing of router `logits` (N, E); see the module docstring."""
    n, e = logits.shape
    probs = F.softmax(logits.float(), dim=-1)
    top, experts = probs.topk(top_k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True) if top_k > 1 else top
    kept = torch.ones_like(experts, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * n * top_k / e)
        # order: all first choices in token order, then all second choices, ...
        one_hot = F.one_hot(experts.t().reshape(-1), e)  # (k*N, E)
        place = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # position in its expert's queue
        kept = (place < capacity).view(top_k, n).t()
    return Routing(experts, weights * kept, kept, probs)


def balance_loss(r: Routing, num_experts: int) -> torch.Tensor:
    """Switch's load-balancing loss for top-k: E / k x sum_e f_e P_e (1.0 at perfect balance)."""
    k = r.experts.shape[1]
    f = F.one_hot(r.experts, num_experts).float().sum(dim=(0, 1)) / r.experts.shape[0]  # assignments per token
    return num_experts / k * (f * r.probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class _AuxGradient(torch.autograd.Function):
    """Identity on `x`; the auxiliary loss gets the gradient `scale` in the backward pass."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class MoE(nn.Module):
    def __init__(self, cfg, make_expert):  # cfg: lmfleet.model.config.ModelConfig; make_expert() -> FeedForward
        super().__init__()
        m = cfg.moe
        self.num_experts, self.top_k, self.capacity_factor = m.num_experts, m.top_k, m.capacity_factor
        self.aux_coef, self.z_coef = m.aux_loss_coef, m.z_loss_coef
        self.router = nn.Linear(cfg.d_model, m.num_experts, bias=False)
        self.experts = nn.ModuleList([make_expert() for _ in range(m.num_experts)])
        self.grad_scale = 1.0  # set by the trainer: 1 / micro-batches per optimizer step
        self.reset_stats()

    def reset_stats(self) -> None:
        # (on the CPU whatever the default device: a model built on the meta device still counts)
        self.stats = torch.zeros(4 + self.num_experts, device="cpu")  # passes, aux, z, dropped fraction, assignments per expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = self.router(h)
        r = route(logits, self.top_k, self.capacity_factor)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where((r.experts == e) & r.kept)
            y = expert(h[token]) * r.weights[token, slot, None].to(h.dtype)
            out = out.index_add(0, token, y)
        if self.training and torch.is_grad_enabled():
            aux, z = balance_loss(r, self.num_experts), z_loss(logits)
            out = _AuxGradient.apply(out, self.aux_coef * aux + self.z_coef * z, self.grad_scale)
            with torch.no_grad():
                load = F.one_hot(r.experts, self.num_experts).sum(dim=(0, 1)).float()
                dropped = 1.0 - r.kept.float().mean()
                self.stats += torch.cat([torch.tensor([1.0, float(aux), float(z), float(dropped)]),
                                         (load / load.sum()).cpu()])
        return out.view(shape)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_micro_batches(model: nn.Module, micro_batches: int) -> None:
    """Average the auxiliary losses over the `micro_batches` forward passes of an optimizer step."""
    for m in moe_layers(model):
        m.grad_scale = 1.0 / micro_batches


def take_stats(model: nn.Module) -> torch.Tensor | None:
    """The MoE layers' statistics since the last call, summed over layers (passes, aux, z, dropped, load per
    expert), and reset; None without MoE layers."""
    layers = moe_layers(model)
    if not layers:
        return None
    total = sum(m.stats for m in layers)
    for m in layers:
        m.reset_stats()
    return total
