"""Pruning of a model's state dict (pure torch, no Ray): magnitude masks and structured removal of attention
head groups and feed-forward channels.

Prunable: the matrices of the transformer blocks (attention and feed-forward projections, MoE experts); not
the embeddings, the output layer, norms or an MoE router.

- Magnitude (unstructured; Han et al. 2015): the weights of smallest |w| are set to zero, exactly
  round(sparsity x n) of them, over all prunable matrices together (`scope: global`) or in each one
  (`layer`). The model keeps its shapes (dense storage with zeros).
- Structured: in every layer, the same number of key/value head groups (a KV head with the query heads that
  read it) and of feed-forward channels are removed, those of lowest L2 norm of their weights (the group's
  rows of wq, wk, wv and columns of wo; a channel's row of w1 and w3 and column of w2). The result is a
  smaller dense model of the same family (fewer heads at the same head_dim, a smaller ffn_dim), which HF
  Llama loads. Removing a head group or channel is the same as zeroing its output weights (wo columns, w2
  columns), which the tests check.
"""

from __future__ import annotations

import re

import torch

from lmfleet.model.config import ModelConfig

_MATRIX = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.(experts\.\d+\.)?w[123])\.weight$")


def prunable(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in state if _MATRIX.match(k))


def magnitude(state: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """A copy of `state` with the smallest-magnitude fraction `sparsity` of the prunable weights set to 0."""
    out = dict(state)
    names = prunable(state)
    groups = [names] if scope == "global" else [[n] for n in names]
    for group in groups:
        flat = torch.cat([state[n].detach().abs().flatten().float() for n in group])
        k = int(round(sparsity * flat.numel()))
        if k == 0:
            continue
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.argsort(flat, stable=True)[:k]] = True  # exactly k, ties in storage order
        start = 0
        for n in group:
            size = state[n].numel()
            out[n] = state[n].masked_fill(drop[start : start + size].view_as(state[n]), 0.0)
            start += size
    return out


def sparsity_of(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(zero fraction of the prunable weights, zero fraction of all parameters)."""
    names = prunable(state)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    total = sum(state[n].numel() for n in names)
    every = sum(v.numel() for v in state.values())
    all_zeros = sum(int((v == 0).sum()) for v in state.values())
    return zeros / max(total, 1), all_zeros / max(every, 1)


def _keep(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices kept (in their order) after removing the `remove` lowest scores (ties: the later one goes)."""
    order = torch.argsort(scores, stable=True)
    return torch.sort(order[remove:]).values


def structured(state: dict[str, torch.Tensor], cfg: ModelConfig, heads: float, ffn: float
               ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Remove round(heads x kv_heads) head groups and round(ffn x ffn_dim) channels from every layer (at least one
    of each left); returns the smaller state and its config."""
    if cfg.moe is not None:
        raise ValueError("structured pruning of MoE layers is not supported (use method: magnitude)")
    hd, kv, group = cfg.dim_per_head, cfg.kv_heads, cfg.n_heads // cfg.kv_heads
    drop_groups = min(kv - 1, int(round(heads * kv)))
    drop_channels = min(cfg.hidden_dim - 1, int(round(ffn * cfg.hidden_dim)))
    out = dict(state)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        wq, wk, wv, wo = (state[p + f"attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo"))
        q_heads = wq.view(kv, group, hd, -1)  # query head h reads kv head h // group
        score = (wk.view(kv, hd, -1).pow(2).sum(dim=(1, 2)) + wv.view(kv, hd, -1).pow(2).sum(dim=(1, 2))
                 + q_heads.pow(2).sum(dim=(1, 2, 3)) + wo.view(-1, kv, group, hd).pow(2).sum(dim=(0, 2, 3)))
        keep = _keep(score, drop_groups)
        out[p + "attention.wq.weight"] = q_heads[keep].reshape(-1, wq.shape[1])
        out[p + "attention.wk.weight"] = wk.view(kv, hd, -1)[keep].reshape(-1, wk.shape[1])
        out[p + "attention.wv.weight"] = wv.view(kv, hd, -1)[keep].reshape(-1, wv.shape[1])
        out[p + "attention.wo.weight"] = wo.view(wo.shape[0], kv, group, hd)[:, keep].reshape(wo.shape[0], -1)
        w1, w2 = state[p + "feed_forward.w1.weight"], state[p + "feed_forward.w2.weight"]
        w3 = state.get(p + "feed_forward.w3.weight")
        score = w1.pow(2).sum(dim=1) + w2.pow(2).sum(dim=0) + (w3.pow(2).sum(dim=1) if w3 is not None else 0)
        keep = _keep(score, drop_channels)
        out[p + "feed_forward.w1.weight"] = w1[keep]
        out[p + "feed_forward.w2.weight"] = w2[:, keep]
        if w3 is not None:
            out[p + "feed_forward.w3.weight"] = w3[keep]
    left = kv - drop_groups
    new = cfg.model_copy(update={"n_heads": left * group, "n_kv_heads": left, "head_dim": hd,
                                 "ffn_dim": cfg.hidden_dim - drop_channels})
    return {k: v.contiguous() for k, v in out.items()}, ModelConfig.model_validate(new.model_dump())
