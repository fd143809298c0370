"""A configurable decoder-only transformer in plain PyTorch (nanoGPT-sized).

Inputs are token ids and, for packed sequences, the position of each token within its document
segment (0 starts a segment; see lmfleet.data.packing). Attention is causal (or, with `causal: false`,
both ways: an encoder for masked-token objectives), restricted to the token's own segment (so packed documents never see each other) and, on `local` layers, to the last
`sliding_window` tokens. `attention_impl: sdpa` runs `F.scaled_dot_product_attention` with a dense
boolean mask; `flex` runs FlexAttention with the same rules as a block mask (blocks no token may see
are skipped; compiled on GPU). torch 2.13 has no FlexAttention backward on CPU, so on CPU `flex` runs
only without gradients (evaluation) and training there takes the SDPA path with the same mask (a
warning says so): the same YAML runs on a laptop and on a GPU cluster. On either, a batch whose every
row holds one document takes SDPA's `is_causal` path (no mask: flash kernels on GPU).

Parallelism is applied from outside (lmfleet.train.parallel): layers live in a ModuleDict keyed by
index so pipeline stages can drop layers, and the embedding / norm / output may be None on stages
that do not own them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.model.config import ModelConfig
from lmfleet.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as HF Llama does) so exported models give identical logits.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model, cfg.norm_eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, T, head_dim) in the half-rotation layout HF Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Geometric slopes of Press et al. (2022), extended to non-powers of two as in their code."""
    def powers(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(p) + (powers(2 * p)[0::2][: n_heads - p] if p < n_heads else [])
    return torch.tensor(slopes)


def segment_ids(positions: torch.Tensor) -> torch.Tensor:
    return torch.cumsum((positions == 0).int(), dim=1)


def attention_mask(positions: torch.Tensor, window: int | None, causal: bool = True) -> torch.Tensor:
    """Boolean (B, 1, T, T): same segment, causal (else both ways), within `window` tokens when given."""
    seg = segment_ids(positions)
    t = positions.shape[1]
    i = torch.arange(t, device=positions.device)
    allowed = seg[:, :, None] == seg[:, None, :]
    distance = i[:, None] - i[None, :]
    if causal:
        allowed = allowed & (distance >= 0)[None]
    if window is not None:
        allowed = allowed & (distance.abs() < window)[None]
    return allowed[:, None]


@dataclass
class FlexMask:
    """A FlexAttention block mask, and the ALiBi bias as a score modification where used."""

    block_mask: object
    score_mod: Callable | None = None


def flex_mask(positions: torch.Tensor, window: int | None, slopes: torch.Tensor | None,
              causal: bool = True) -> FlexMask:
    """`attention_mask`'s rule (same segment, causal or not, within `window`) as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(positions)

    def mask_mod(b, h, q, kv):
        allowed = seg[b, q] == seg[b, kv]
        if causal:
            allowed = allowed & (q >= kv)
        return allowed & ((q - kv).abs() < window) if window is not None else allowed

    def alibi(score, b, h, q, kv):
        return score - slopes[h] * (q - kv).abs()

    b, t = positions.shape
    block_mask = create_block_mask(mask_mod, b, None, t, t, device=positions.device)
    return FlexMask(block_mask, alibi if slopes is not None else None)


@functools.cache
def _flex_attention():
    """FlexAttention, compiled where torch generates fused kernels for it (CUDA); elsewhere torch's
    reference implementation (same numbers within fp32 tolerance, scores materialized)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def _flex_runs(device: torch.device) -> bool:
    """Whether FlexAttention can run here: not with gradients on CPU (torch raises NotImplementedError)."""
    if device.type != "cpu" or not torch.is_grad_enabled():
        return True
    # Python's default filter shows it once per process.
    warnings.warn("attention_impl 'flex': torch has no FlexAttention backward on CPU; training here uses "
                  "SDPA with the same masks (flex runs on GPU and for evaluation)", stacklevel=3)
    return False


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.cfg, self.window = cfg, window
        hd = cfg.dim_per_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | FlexMask | None, rope: tuple | None) -> torch.Tensor:
        """mask: boolean or additive (SDPA), a FlexMask, or None: causal only (SDPA's is_causal), or no mask
        at all for an encoder (`causal: false`)."""
        b, t, _ = x.shape
        hd = self.cfg.dim_per_head
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(mask, FlexMask):
            y = _flex_attention()(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask,
                                  enable_gqa=k.shape[1] != q.shape[1])
            return self.wo(y.transpose(1, 2).reshape(b, t, -1))
        if k.shape[1] != q.shape[1]:  # GQA / MQA: each kv head serves a group of query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and self.cfg.causal,
            dropout_p=self.cfg.dropout if self.training else 0.0,
        )
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        self.w1 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False) if cfg.activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)) if self.activation == "gelu" else F.relu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.local = cfg.layer_kind(layer) == "local"
        self.pre_norm = cfg.norm_placement == "pre"
        self.attention = Attention(cfg, cfg.sliding_window if self.local else None)
        self.feed_forward = MoE(cfg, lambda: FeedForward(cfg)) if cfg.is_moe_layer(layer) else FeedForward(cfg)
        self.attention_norm = make_norm(cfg)
        self.ffn_norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, masks: dict, rope: tuple | None) -> torch.Tensor:
        mask = masks["local" if self.local else "global"]
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.attention_norm(x), mask, rope))
            return x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, mask, rope)))
        return self.ffn_norm(x + self.dropout(self.feed_forward(x)))


def initial_value(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value of one parameter (by its name in the whole model), on CPU in fp32.

    Each matrix draws from its own generator seeded by (seed, name), so a rank that holds a shard, a
    pipeline stage or a TP slice computes the same numbers as the single process, without building or
    drawing the rest of the model. Matrices: N(0, init_std), residual output projections scaled by
    1/sqrt(2 n_layers) (GPT-2); norm weights 1, norm biases 0.
    """
    if len(shape) == 1:
        return torch.zeros(shape) if name.endswith(".bias") else torch.ones(shape)
    scale = 1 / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.empty(shape).normal_(0.0, cfg.init_std * scale, generator=generator)


class Transformer(nn.Module):
    """Built on the meta device (`with torch.device("meta")`), it holds no memory until
    lmfleet.train.parallel.materialize gives each rank its part; built anywhere else, it is initialized
    at once from `seed` with the same values (`initial_value`); `seed=None` leaves torch's constructor
    init for the caller to overwrite (DeepSpeed's zero.Init partitions each layer as it is built)."""

    def __init__(self, cfg: ModelConfig, seed: int | None = 0):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg) if cfg.norm_placement == "pre" else None
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if seed is not None and self.output.weight.device.type != "meta":
            self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(initial_value(self.cfg, name, tuple(p.shape), seed))

    def masks(self, positions: torch.Tensor) -> dict:
        """Attention masks for global and local layers: None (causal only) where every row is one
        document and no bias applies; else a FlexMask (flex) or a dense mask, bool or float with ALiBi."""
        out = {}
        alibi = self.cfg.positions == "alibi"
        one_document = not bool((positions[:, 1:] == 0).any())  # a row may continue a document: no 0 at all
        for kind in {self.cfg.layer_kind(i) for i in range(self.cfg.n_layers)}:
            window = self.cfg.sliding_window if kind == "local" else None
            if one_document and window is None and not alibi:
                out[kind] = None
                continue
            slopes = alibi_slopes(self.cfg.n_heads).to(positions.device) if alibi else None  # not a buffer: nothing to materialize
            if self.cfg.attention_impl == "flex" and _flex_runs(positions.device):
                out[kind] = flex_mask(positions, window, slopes, self.cfg.causal)
                continue
            allowed = attention_mask(positions, window, self.cfg.causal)
            if alibi:  # (symmetric for an encoder)
                t = positions.shape[1]
                i = torch.arange(t, device=positions.device)
                dist = (i[:, None] - i[None, :]).abs().float()
                bias = -slopes[:, None, None] * dist  # (H, T, T)
                allowed = torch.where(allowed, bias[None], torch.tensor(float("-inf"), device=positions.device))
            out[kind] = allowed
        return out

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) ids, or (B, T, d) hidden states on a later pipeline stage -> logits or hidden."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        h = tokens
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(positions)
            h = self.dropout(h)
        rope = rope_cos_sin(positions, self.cfg.dim_per_head, self.cfg.rope_theta) if self.cfg.positions == "rope" else None
        masks = self.masks(positions)
        for layer in self.layers.values():
            h = layer(h, masks, rope)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h
