"""Parallelism, applied to the plain model in one place and a fixed order (torchtitan's shape):

    pipeline split -> tensor parallel -> activation checkpointing -> torch.compile -> data parallel

The device mesh is (pp, dp, tp). Data parallelism is DDP for `ddp` with tp = pp = 1, FSDP2
`fully_shard` over the dp dimension for `fsdp` and whenever tp or pp > 1 (DTensor-aware), and a
DeepSpeed ZeRO engine for `deepspeed` (dp only). `none` is the single-process reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmfleet.model.transformer import Transformer
from lmfleet.train.config import ParallelConfig, stage_layers


@dataclass
class Layout:
    """Where this rank sits: sizes and coordinates on the (pp, dp, tp) mesh."""

    world: int
    rank: int
    dp: int
    tp: int
    pp: int
    device: torch.device
    mesh: object | None = None  # torch DeviceMesh, None without a process group

    @property
    def coords(self) -> tuple[int, int, int]:
        pp_rank, rest = divmod(self.rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return pp_rank, dp_rank, tp_rank

    @property
    def dp_rank(self) -> int:
        return self.coords[1]

    @property
    def pp_rank(self) -> int:
        return self.coords[0]

    def group(self, dim: str):
        return self.mesh[dim].get_group() if self.mesh is not None else None


def build_layout(cfg: ParallelConfig, device: torch.device) -> Layout:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    tp, pp = cfg.tp_size, cfg.pp_size
    dp = world // (tp * pp)
    mesh = None
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    return Layout(world, rank, dp, tp, pp, device, mesh)


# ---- pipeline ---------------------------------------------------------------------------------


def split_for_stage(model: Transformer, pp: int, stage: int) -> Transformer:
    """Keep only this stage's layers; the embedding on the first stage, norm and output on the last.
    Parameter names stay those of the full model, so checkpoints reshard across pipeline sizes."""
    keep = {str(i) for i in stage_layers(model.cfg.n_layers, pp, stage)}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if stage > 0:
        model.tok_embeddings = None
        model.pos_embeddings = None
    if stage < pp - 1:
        model.norm = None
        model.output = None
    return model


class PipelineStageModule(nn.Module):
    """Passes positions along with the hidden states, since every stage builds its attention masks."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor, positions: torch.Tensor):
        out = self.model(h, positions)
        return out if self.model.output is not None else (out, positions)


# ---- tensor parallel --------------------------------------------------------------------------


def apply_tp(model: Transformer, tp_mesh) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(),
            **({"feed_forward.w3": ColwiseParallel()} if block.feed_forward.w3 is not None else {}),
        })
    if model.tok_embeddings is not None:
        parallelize_module(model, tp_mesh, {"tok_embeddings": RowwiseParallel(input_layouts=Replicate())})
    if model.output is not None:
        # Full logits on every TP rank: the loss is computed as in the single-process model.
        parallelize_module(model, tp_mesh, {"output": ColwiseParallel(output_layouts=Replicate())})


# ---- the one entry point ----------------------------------------------------------------------


def parallelize(model: Transformer, cfg: ParallelConfig, layout: Layout) -> nn.Module:
    """Apply the configured parallelism to a freshly built model; returns the module to train
    (for pipelines: this stage's module). DeepSpeed is wrapped separately, with the optimizer."""
    if layout.pp > 1:
        model = split_for_stage(model, layout.pp, layout.pp_rank)
    if layout.tp > 1:
        apply_tp(model, layout.mesh["tp"])
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for key, block in list(model.layers.items()):
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=True)
    if cfg.compile:
        for block in model.layers.values():
            block.compile()
    if cfg.strategy == "fsdp" or (cfg.strategy == "ddp" and (layout.tp > 1 or layout.pp > 1)):
        _apply_fsdp(model, cfg, layout, reshard=cfg.fsdp.reshard_after_forward if cfg.strategy == "fsdp" else False)
    elif cfg.strategy == "ddp" and layout.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[layout.device.index] if layout.device.type == "cuda" else None)
    return model


def _apply_fsdp(model: Transformer, cfg: ParallelConfig, layout: Layout, reshard: bool) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    param_dtype = cfg.fsdp.param_dtype or ("bfloat16" if layout.device.type == "cuda" else "float32")
    kwargs = {
        "mesh": layout.mesh["dp"],
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtypes[param_dtype], reduce_dtype=dtypes[cfg.fsdp.reduce_dtype]),
    }
    if cfg.fsdp.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside DDP / pipeline / DeepSpeed wrappers (FSDP2 and TP modify in place)."""
    while hasattr(model, "module") or isinstance(model, PipelineStageModule):
        model = model.module if hasattr(model, "module") else model.model
    return model


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None, layout: Layout) -> float:
    """Global grad norm over all ranks' shards, then clipping.

    Gradients are DTensors on different meshes (dp only for replicated norms, dp x tp for TP
    weights): the norm is taken per mesh, made whole, then combined, and summed over pipeline stages.
    """
    from torch.distributed.tensor import DTensor

    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    sq = torch.zeros((), device=layout.device)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        sq = sq + (norm.full_tensor() if isinstance(norm, DTensor) else norm).pow(2)
    if layout.pp > 1:
        dist.all_reduce(sq, group=layout.group("pp"))
    norm = sq.sqrt()
    if max_norm is not None:
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return float(norm)
