"""The prune stage: a Ray task prunes the input model (lmfleet.prune.methods) and measures its validation
loss before and after; with `recovery.steps` the pretraining loop fine-tunes the pruned model (magnitude:
its zeros held at zero, `keep_zeros`) and exports it.

Outputs (in the stage dir, a path or URI):
  model/        the pruned (and recovered) model: HF Llama / Mixtral when the config maps, else lmfleet's format
  pruned/       with recovery: the pruned model before it
  report.json   parameters, sparsity, validation loss and perplexity before / after pruning / after recovery
"""

from __future__ import annotations

import math

import numpy as np

from lmfleet import outputs, uri
from lmfleet.errors import InputError
from lmfleet.inputs import Input
from lmfleet.model.hf_config import checkpoint_model_config, input_model, loss_model
from lmfleet.prune.config import PruneStageConfig


def check_inputs(cfg: PruneStageConfig, upstream: set[str] = frozenset(), run_dir=None) -> list[Input]:
    from pathlib import Path

    from lmfleet.train.stage import packed_dir

    path = packed_dir(cfg, run_dir)
    if cfg.data not in upstream and not uri.info(uri.join(path, "index.json"), "prune.data").is_file:
        raise InputError(f"prune.data {cfg.data!r}: no packed data at {path} (expected a data stage output dir)")
    location = input_model(cfg.model, run_dir)
    if cfg.model not in upstream:
        checkpoint_model_config(location, "prune.model")  # InputError when there is no model
    return [Input("data", (path if uri.is_uri(path) else Path(path),)),
            Input("model", (location if uri.is_uri(location) else Path(location),))]


def val_loss(model, packed: str, batches: int, global_batch: int, pad: int) -> float:
    """Mean token loss on the first batches x global_batch validation samples (the pretraining loop's set)."""
    import torch

    from lmfleet.data.packing import PackedDataset
    from lmfleet.train.data import load_batch
    from lmfleet.train.loss import per_sample_ce

    ds = PackedDataset(packed, "val")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in range(batches):
            idx = np.arange(b * global_batch, (b + 1) * global_batch) % len(ds)
            inputs, positions, targets = load_batch(ds, idx, pad, torch.device("cpu"))
            total += float(per_sample_ce(model(inputs, positions), targets).sum())
            tokens += int((targets != -100).sum())
    return total / tokens


def prune_task(cfg: PruneStageConfig, location: str, packed: str, index: dict, target: str) -> dict:
    """In a Ray task: load, measure, prune, measure, export to `target` (a path or URI)."""
    import json

    import torch

    from lmfleet.model.export import export_model, load_model
    from lmfleet.model.transformer import Transformer
    from lmfleet.prune import methods
    from lmfleet.uri import local_copy

    local = local_copy(packed, "prune.data")
    model = load_model(local_copy(location, "prune.model")).eval()
    gb, pad = cfg.recovery.batch.global_batch, index["pad_id"]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {"params": sum(p.numel() for p in model.parameters()), "sparsity": methods.sparsity_of(state)[0],
              "val_loss": val_loss(model, str(local), cfg.eval_batches, gb, pad)}
    if cfg.method == "magnitude":
        state, new_cfg = methods.magnitude(state, cfg.sparsity, cfg.scope), model.cfg
    else:
        state, new_cfg = methods.structured(state, model.cfg, cfg.structured.heads, cfg.structured.ffn)
    with torch.device("meta"):
        pruned = Transformer(new_cfg)
    pruned.load_state_dict(state, strict=not new_cfg.tie_embeddings, assign=True)
    if new_cfg.tie_embeddings:
        pruned.output.weight = pruned.tok_embeddings.weight
    prunable, overall = methods.sparsity_of(state)
    after = {"params": sum(p.numel() for p in pruned.parameters()), "sparsity": prunable, "sparsity_all": overall,
             "val_loss": val_loss(pruned.eval(), str(local), cfg.eval_batches, gb, pad)}
    work = outputs.workdir(target, fresh=True)
    tokenizer = local_copy(uri.relative(packed, index["tokenizer"]), "prune.data")
    fmt = export_model(pruned.state_dict(), new_cfg, work, tokenizer, eos_id=index["eos_id"], pad_id=pad)
    (work / "export.json").write_text(json.dumps({"format": fmt, "pruned": cfg.method}))
    outputs.publish(work, target, move=True)
    return {"before": before, "pruned": after, "format": fmt, "model": new_cfg.model_dump()}


def exported_sparsity(model_dir: str) -> float:
    """The prunable weights' zero fraction of an exported model (a Ray task: it reads every tensor)."""
    from lmfleet.model.export import load_model
    from lmfleet.prune.methods import sparsity_of
    from lmfleet.uri import local_copy

    return sparsity_of(load_model(local_copy(model_dir, "prune")).state_dict())[0]


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def run_prune_stage(cfg: PruneStageConfig, ctx) -> dict:
    import ray

    from lmfleet.train.config import PretrainConfig
    from lmfleet.train.stage import _resolved, launch, packed_dir, read_index

    check_inputs(cfg, run_dir=ctx.run_dir)
    packed = packed_dir(cfg, ctx.run_dir)
    index = read_index(packed)
    location = input_model(cfg.model, ctx.run_dir)
    found = loss_model(location, index["vocab_size"], "prune.model", "perplexity")
    if cfg.method == "structured" and found.moe is not None:
        raise InputError(f"prune.model {location}: structured pruning of MoE layers is not supported: use method "
                         "magnitude")
    recover = cfg.recovery.steps > 0
    target = outputs.child(ctx.out, "pruned" if recover else "model")
    with ctx.step("prune"):
        task = ray.remote(num_cpus=1)(prune_task)
        result = ray.get(task.remote(cfg, location, packed, index, str(target)))
    report = {"method": cfg.method, **({"sparsity_target": cfg.sparsity, "scope": cfg.scope}
                                       if cfg.method == "magnitude" else {"structured": cfg.structured.model_dump()}),
              "before": result["before"], "pruned": result["pruned"]}
    if recover:
        r = cfg.recovery
        with ctx.step("recover"):
            pcfg = PretrainConfig.model_validate({
                "data": packed, "init_from": str(target), "steps": r.steps, "optimizer": r.optimizer.model_dump(),
                "lr_schedule": r.lr_schedule.model_dump(), "batch": r.batch.model_dump(),
                "parallel": r.parallel.model_dump(), "scaling": r.scaling.model_dump(),
                "eval": {"every": r.steps, "batches": cfg.eval_batches}, "checkpoint": {"every": r.steps},
                "log_every": max(1, r.steps // 10), "keep_zeros": cfg.method == "magnitude"})
            pcfg = _resolved(pcfg, index, packed, ctx.run_dir).model_copy(update={"data": packed})
            launch(pcfg, ctx.out, ctx.metrics.for_workers(), ctx.seed, ctx.name, storage=ctx.storage)
            final = [h for h in ctx.history("val_loss") if "loss" in h][-1]
            sparsity = ray.get(ray.remote(num_cpus=1)(exported_sparsity).remote(str(outputs.child(ctx.out, "model"))))
        report["recovered"] = {"steps": r.steps, "val_loss": final["val_loss"], "sparsity": sparsity,
                               "params": result["pruned"]["params"]}
    for part in ("before", "pruned", "recovered"):
        if part in report:
            report[part]["val_perplexity"] = _perplexity(report[part]["val_loss"])
    b, p = report["before"], report["pruned"]
    report["export"] = {"path": ctx.uri("model"), "format": result["format"]}
    report["summary"] = [
        f"{cfg.method} pruning: parameters {b['params']:,} -> {p['params']:,}, prunable weights at zero "
        f"{b['sparsity']:.1%} -> {p['sparsity']:.1%}",
        f"validation perplexity {b['val_perplexity']:.2f} -> {p['val_perplexity']:.2f} pruned"
        + (f" -> {report['recovered']['val_perplexity']:.2f} after {cfg.recovery.steps} recovery steps (zeros "
           f"{report['recovered']['sparsity']:.1%})" if recover else ""),
        f"model: {report['export']['path']} ({result['format']})",
    ]
    return ctx.write_report(report)
