"""The pretraining stage: resolves its input, starts a Ray Train TorchTrainer, collects the results.

Outputs (in the stage dir, a path or URI):
  model/          the exported model (HF LlamaForCausalLM dir when Llama-compatible, else lmfleet format)
  ray/            Ray Train's run dir (checkpoints step_XXXXXXXX/, keep_last), unless the run has a storage_path
  samples.jsonl   with log_samples: the sample ids of every step
  report.json     final loss, val loss / perplexity, tokens/s, MFU, steps, world sizes seen
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from lmfleet import outputs, uri
from lmfleet.errors import InputError
from lmfleet.inputs import Input
from lmfleet.runlog import LineLog, MetricsLog, read_jsonl
from lmfleet.storage import checkpoint_uri
from lmfleet.train.config import PretrainConfig


def packed_dir(cfg: PretrainConfig, run_dir: Path | str | None) -> str:
    """Where the packed data is (an absolute path or a URI): `data` names a stage of this run (its dir under
    the run dir), or is a data stage dir or its packed/ dir, on a disk or an object store."""
    ref = cfg.data if run_dir is None or "/" in cfg.data else str(outputs.child(run_dir, cfg.data))
    if uri.is_uri(ref):
        base = ref.rstrip("/")
        return base if uri.info(uri.join(base, "index.json"), "pretrain.data").is_file else uri.join(base, "packed")
    base = Path(ref)
    packed = base / "packed" if (base / "packed").is_dir() or not (base / "index.json").exists() else base
    return str(packed.resolve())


def read_index(packed: str) -> dict:
    return json.loads(uri.read_bytes(uri.join(packed, "index.json")).decode("utf-8"))


def check_inputs(cfg: PretrainConfig, upstream: set[str] = frozenset(), run_dir: Path | None = None) -> list[Input]:
    path = packed_dir(cfg, run_dir)
    # upstream: an earlier stage writes it
    if cfg.data not in upstream and not uri.info(uri.join(path, "index.json"), "pretrain.data").is_file:
        raise InputError(f"pretrain.data {cfg.data!r}: no packed data at {path} (expected a data stage output dir)")
    return [Input("data", (path if uri.is_uri(path) else Path(path),))]


def _resolved(cfg: PretrainConfig, index: dict) -> PretrainConfig:
    """Fill the model's vocab size from the packed data's index; check the context length and sources fit."""
    model = cfg.model
    if model.vocab_size is None:
        model = model.model_copy(update={"vocab_size": index["vocab_size"]})
    elif model.vocab_size < index["vocab_size"]:
        raise InputError(f"pretrain.model.vocab_size {model.vocab_size} < the tokenizer's {index['vocab_size']}")
    if model.max_seq_len < index["seq_len"]:
        raise InputError(f"pretrain.model.max_seq_len {model.max_seq_len} < packed seq_len {index['seq_len']}")
    if cfg.mixing is not None:
        packed_sources = {s["source"] for s in index["splits"]["train"]["shards"]}
        unknown = sorted(cfg.mixing.source_names() - packed_sources)
        if unknown:
            raise InputError(f"pretrain.mixing: unknown sources {unknown}; the packed data has {sorted(packed_sources)}")
    return cfg.model_copy(update={"model": model})


def launch(cfg: PretrainConfig, out: Path | str, metrics: MetricsLog, seed: int, stage: str, *, storage: str,
           samples: LineLog | None = None, init_checkpoint=None, callbacks=(), export: bool = True,
           steps: int | None = None, tags: dict | None = None):
    """One training run of `cfg` on a Ray Train TorchTrainer, writing to `out` (model/, tensorboard/: a
    path or URI), `metrics` and `samples` (logs of the driver's node, lmfleet.runlog), and its checkpoints
    to `storage`/train (a path or URI); returns its Result. init_checkpoint: where a run without
    checkpoints of its own starts (a Tune trial's donor). steps: stop there instead of at cfg.steps (the
    schedule still spans cfg.steps). tags: added to every metrics record."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lmfleet.train.loop import train_loop_per_worker

    packed = cfg.data  # resolved by the caller (workers run in other working dirs): an absolute path or a URI
    paths = {
        # Workers read a URI through a node-local copy (lmfleet.uri.local_copy).
        "packed": packed, "tokenizer": uri.relative(packed, read_index(packed)["tokenizer"]),
        "export": str(outputs.child(out, "model")) if export else None,
        "tensorboard": str(outputs.child(out, "tensorboard")),
    }
    lo, hi = cfg.scaling.bounds
    use_gpu = cfg.scaling.resolve_gpu()
    paths["use_gpu"] = use_gpu
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "paths": paths, "metrics": metrics,
                           "samples": samples if cfg.log_samples else None, "seed": seed, "stage": stage,
                           "init_checkpoint": init_checkpoint, "stop_at": steps or cfg.steps, "tags": tags or {}},
        scaling_config=ScalingConfig(
            num_workers=hi if lo == hi else (lo, hi), use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            **({} if lo == hi else {"elastic_resize_monitor_interval_s": 3}),
        ),
        run_config=RunConfig(
            name="train", storage_path=storage, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
    )
    return trainer.fit()


def run_pretrain_stage(cfg: PretrainConfig, ctx) -> dict:
    check_inputs(cfg, run_dir=ctx.run_dir)
    packed = packed_dir(cfg, ctx.run_dir)
    cfg = _resolved(cfg, read_index(packed)).model_copy(update={"data": packed})
    if cfg.tune is not None:
        from lmfleet.tune.search import run_search

        return run_search(cfg, ctx, launch)
    with ctx.step("train"):
        log = ctx.metrics.for_workers()
        result = launch(cfg, ctx.out, log, ctx.seed, ctx.name, storage=ctx.storage, export=cfg.export,
                        samples=log.child(ctx.out_dir / "samples.jsonl"))
    # metrics.jsonl is the run's log across re-runs: keep this run's records (a resumed run's since its first start).
    history = [h for h in read_jsonl(ctx.metrics.path)
               if h.get("stage") == ctx.name and "loss" in h and h["time"] >= ctx.started]
    final = history[-1] if history else {}
    report = {
        "steps": cfg.steps, "final_loss": final.get("loss"), "val_loss": final.get("val_loss"),
        "val_perplexity": final.get("val_perplexity"),
        # the first step pays for warm-up; the median of the rest is the steady state
        "tokens_per_s": statistics.median([h["tokens_per_s"] for h in history[1:]] or [final.get("tokens_per_s", 0.0)]),
        "mfu": final.get("mfu"), "world_sizes": sorted({h["world_size"] for h in history}),
        "checkpoint": checkpoint_uri(result.checkpoint),
    }
    export = outputs.read_json(outputs.child(ctx.out, "model", "export.json"))  # written by rank 0, on any node
    if export:
        report["export"] = {"path": ctx.uri("model"), **export}
    report["summary"] = [
        f"trained {cfg.steps} steps ({cfg.parallel.strategy}, tp {cfg.parallel.tp_size}, pp {cfg.parallel.pp_size}, "
        f"workers {report['world_sizes']}): loss {report['final_loss']:.4f}",
        f"validation: loss {report['val_loss']:.4f}, perplexity {report['val_perplexity']:.2f}"
        if report["val_loss"] is not None else "validation: no val split",
        f"throughput: {report['tokens_per_s']:.0f} tokens/s" + (f", MFU {100 * report['mfu']:.1f}%" if report["mfu"] else ""),
    ] + ([f"model: {report['export']['path']} ({report['export']['format']})"] if "export" in report else [])
    (ctx.out_dir / "report.json").write_text(json.dumps({**report, "seconds": ctx.seconds}, indent=2), encoding="utf-8")
    return report
