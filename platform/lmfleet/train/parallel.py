"""Parallelism, applied to the plain model in one place and a fixed order (torchtitan's shape):

    pipeline split -> tensor parallel -> activation checkpointing -> torch.compile -> FSDP2
    -> materialize -> DDP

The model arrives built on the meta device (no memory); once every parameter has its final placement,
`materialize` allocates each rank's part only and fills it from the whole parameter's values (the
seeded init or a checkpoint), so a model that only fits sharded can start, with the same initial
weights as the single process. DDP needs real tensors, so it comes last.

The device mesh is (pp, dp, tp). Data parallelism is DDP for `ddp` with tp = pp = 1, FSDP2
`fully_shard` over the dp dimension for `fsdp` and for `ddp` with tp or pp > 1 (DTensor-aware), and a
DeepSpeed ZeRO engine for `deepspeed` (dp only). `none` is the single-process reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# Imported here, not where used: a Trainer loads them before it starts measuring its memory (~47 MB).
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lmfleet.model.config import ModelConfig
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


def build_model(cfg: ModelConfig, parallel: ParallelConfig, layout: Layout, values: Values,
                zero3: dict | None = None) -> nn.Module:
    """The model to train, each rank holding only its part from the start; `values` gives each whole
    parameter (`initial_value` or a checkpoint's). With DeepSpeed ZeRO-3 (`zero3`: its config) the
    model is built under `deepspeed.zero.Init`, which partitions each layer as it is constructed, and
    filled one gathered parameter at a time; the engine itself is made with the optimizer."""
    if zero3 is None:
        with torch.device("meta"):
            model = Transformer(cfg)
        return parallelize(model, parallel, layout, values)
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=zero3):
        model = Transformer(cfg, seed=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if layout.rank == 0:
                    p.copy_(values(name, tuple(p.shape)))
    return parallelize(model, parallel, layout, None)


def parallelize(model: Transformer, cfg: ParallelConfig, layout: Layout, values: Values | None) -> nn.Module:
    """Apply the configured parallelism to a model built on the meta device and materialize it from
    `values` (None: the model is allocated already); returns the module to train (for pipelines: this
    stage's module). DeepSpeed is wrapped separately, with the optimizer."""
    if layout.pp > 1:
        model = split_for_stage(model, layout.pp, layout.pp_rank)
    if layout.tp > 1:
        apply_tp(model, layout.mesh["tp"])
    if cfg.activation_checkpointing:
        for key, block in list(model.layers.items()):
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=True)
    if cfg.compile:
        for block in model.layers.values():
            block.compile()
    if cfg.fsdp_over_dp(layout.dp):
        _apply_fsdp(model, cfg, layout, reshard=cfg.fsdp_reshards)
    if values is not None:
        materialize(model, layout.device, values)
    if cfg.strategy == "ddp" and layout.world > 1 and layout.tp == layout.pp == 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[layout.device.index] if layout.device.type == "cuda" else None)
    return model


# ---- materialization ---------------------------------------------------------------------------

Values = Callable[[str, tuple[int, ...]], torch.Tensor]  # (name in the whole model, shape) -> whole tensor


def materialize(model: nn.Module, device: torch.device, values: Values) -> None:
    """Allocate a meta-device model on `device` and fill this rank's part of every parameter.

    A DTensor parameter (FSDP2 shard, TP slice, or both) keeps its local piece of the whole tensor
    (`distribute_tensor` with no source rank slices locally, no communication); others take it all.
    Peak memory: this rank's part plus one whole parameter at a time.
    """
    model.to_empty(device=device)
    base = unwrap(model)
    if base.cfg.tie_embeddings and base.output is not None:  # to_empty makes new Parameters: tie again
        base.output.weight = base.tok_embeddings.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            whole = values(name.replace("._checkpoint_wrapped_module", ""), tuple(p.shape)).to(device, p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(whole)


def _apply_fsdp(model: Transformer, cfg: ParallelConfig, layout: Layout, reshard: bool) -> None:
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


def full_state_dict(model: nn.Module, layout: Layout, engine=None) -> dict | None:
    """The whole model's weights (fp32, CPU) on rank 0, gathered over shards and pipeline stages; None
    on other ranks. Every rank must call it."""
    if engine is not None:
        sd = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 \
            else engine.module.state_dict()
    elif dist.is_initialized():
        # No cpu_offload: with it only global rank 0 gets the weights, and under pipeline
        # parallelism every stage's first rank must hand over its stage's layers.
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        sd = unwrap(model).state_dict()
    if layout.pp > 1:
        parts = [None] * layout.world if layout.rank == 0 else None
        dist.gather_object(sd if layout.coords[1:] == (0, 0) else {}, parts, dst=0)
        sd = {k: v for p in parts or [] for k, v in p.items()}
    return {k: v.float().cpu() for k, v in sd.items()} if layout.rank == 0 else None


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None, layout: Layout) -> float:
    """Global grad norm over all ranks' shards, then clipping.

    Gradients are DTensors on different meshes (dp only for replicated norms, dp x tp for TP
    weights): the norm is taken per mesh, made whole, then combined, and summed over pipeline stages.
    """
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
