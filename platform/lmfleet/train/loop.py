"""The training loop every strategy runs inside a Ray Train worker (`train_loop_per_worker`).

Loss normalization makes every layout compute the same numbers: each micro-batch contributes
sum(token CE) / (real target tokens in the *global* batch), times the data-parallel size because
DDP / FSDP / ZeRO average gradients over dp ranks. So the gradient is that of the mean token loss of
the global batch whatever the worker count, accumulation or pipeline schedule.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lmfleet.data.mixing import LossAdaptiveSchedule, MixingSchedule, PiecewiseSchedule
from lmfleet.data.packing import PackedDataset
from lmfleet.model import moe
from lmfleet.model.export import load_weights, parameter_shapes
from lmfleet.model.transformer import initial_value
from lmfleet.outputs import publish, workdir
from lmfleet.runtime import WorkerRun, latest_checkpoint, save_checkpoint, step_seed, worker_device
from lmfleet.train import checkpoint
from lmfleet.train.config import PEAK_FLOPS, PretrainConfig
from lmfleet.train.curriculum import Curriculum
from lmfleet.train.data import BatchPlan, dp_slice, load_batch
from lmfleet.train.early_stopping import EarlyStopping
from lmfleet.train.loss import per_sample_ce
from lmfleet.train.memory import PeakMemory, gather_record
from lmfleet.train.objectives import IGNORE
from lmfleet.train.optim import apply_hyperparams, build_optimizer, lr_multiplier
from lmfleet.train.parallel import (
    Layout,
    PipelineStageModule,
    build_layout,
    build_model,
    clip_grad_norm,
    full_state_dict,
)
from lmfleet.uri import local_copy


def build_schedule(cfg: PretrainConfig, sizes: dict[str, int]) -> MixingSchedule | None:
    m = cfg.mixing
    if m is None:
        return None
    start = m.weights or {k: float(v) for k, v in sizes.items()}
    if m.kind == "piecewise":
        return PiecewiseSchedule(m.milestones or [(0, start)])
    if m.kind == "adaptive":
        return LossAdaptiveSchedule(start, lr=m.lr, smoothing=m.smoothing)
    return MixingSchedule(start)


class Trainer:
    """Holds the parallel model, optimizer and data plan of one worker; steps and checkpoints them."""

    def __init__(self, cfg: PretrainConfig, inputs, seed: int):  # inputs: lmfleet.train.stage.PretrainInputs
        import ray.train

        self.cfg, self.seed, self.inputs = cfg, seed, inputs
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = worker_device(inputs.use_gpu)
        self.layout: Layout = build_layout(cfg.parallel, self.device)
        packed = local_copy(inputs.packed, "pretrain.data")  # itself when local
        self.train_ds = PackedDataset(packed, "train")
        self.index = index = self.train_ds.index
        self.pad_id = index["pad_id"]
        self.val_ds = PackedDataset(packed, "val") if "val" in index["splits"] else None
        self.sources = sorted(self.train_ds.source_ranges())
        sizes = {k: sum(b - a for a, b in r) for k, r in self.train_ds.source_ranges().items()}
        curriculum = None
        if inputs.curriculum_scores is not None:
            scores = np.load(local_copy(inputs.curriculum_scores, "pretrain.curriculum") / "scores.npy")
            curriculum = Curriculum(cfg.curriculum, scores, cfg.steps)
        self.plan = BatchPlan(self.train_ds.source_ranges(), cfg.batch.global_batch, seed, build_schedule(cfg, sizes),
                              curriculum)
        self.local_batch = cfg.batch.global_batch // self.layout.dp
        self.accum = self.local_batch // cfg.batch.micro_batch

        if cfg.parallel.strategy == "deepspeed":
            import deepspeed  # noqa: F401  (loaded before the measure starts: its import is not the model's)
        self.memory = PeakMemory(self.device)
        self.memory.start()  # from here: the model, its gradients and optimizer states, activations, buffers
        if inputs.init_from is not None:  # continued pretraining (a run's own checkpoint still wins: restore)
            weights = load_weights(local_copy(inputs.init_from, "pretrain.init_from"), cfg.model)
            values = lambda name, shape: weights[name]  # noqa: E731
        else:
            values = partial(initial_value, cfg.model, seed=seed)
        ds_config = self._deepspeed_config() if cfg.parallel.strategy == "deepspeed" else None
        zero3 = ds_config if ds_config is not None and cfg.parallel.deepspeed.zero_stage == 3 else None
        self.model = build_model(cfg.model, cfg.parallel, self.layout, values, zero3)
        self.memory.mark("init")  # the model in place on every rank, before any step
        shapes = parameter_shapes(cfg.model)
        params = cfg.model.flops_params(sum(math.prod(s) for s in shapes.values()),
                                        math.prod(shapes["tok_embeddings.weight"]))
        self.flops_per_token = cfg.model.flops_per_token(params, index["seq_len"])
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.engine = None
        if ds_config is not None:
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, config=ds_config)
            self.model = self.engine
        self.schedule = self._pipeline_schedule() if self.layout.pp > 1 else None
        moe.set_micro_batches(self._module(), self.accum)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # keep_zeros: the block matrices' zeros of init_from (pruned weights) stay zero after every step
        self.zeros = [(p, p.detach() == 0) for n, p in self.model.named_parameters()
                      if cfg.keep_zeros and p.dim() == 2 and "layers." in n]
        self.stopping = EarlyStopping(cfg.early_stopping) if cfg.early_stopping else None
        self.objective_tokens = inputs.objective_tokens
        self._nsp = None  # mlm_nsp evaluation: [right, pairs] of this rank's next-sentence predictions
        self.best: dict | None = None  # early stopping: this rank's part of the best evaluated weights
        self._task_tokenizer = None  # eval_tasks: the first rank's tokenizer (score_tasks)

    # -- set-up helpers --

    def _deepspeed_config(self) -> dict:
        ds = self.cfg.parallel.deepspeed
        config = {
            "train_micro_batch_size_per_gpu": self.cfg.batch.micro_batch,
            "gradient_accumulation_steps": self.accum,
            "zero_optimization": ds.zero_optimization(self.cfg.model.d_model),
            "gradient_clipping": self.cfg.optimizer.grad_clip or 0.0,
            "bf16": {"enabled": self.device.type == "cuda"},
            "steps_per_print": 2**31,
            "zero_allow_untested_optimizer": True,
        }
        return _merge(config, ds.config)

    def _pipeline_schedule(self):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage_module = PipelineStageModule(self.model)
        stage = PipelineStage(stage_module, self.layout.pp_rank, self.layout.pp, self.device,
                              group=self.layout.group("pp"))
        kind = Schedule1F1B if self.cfg.parallel.pp_schedule == "1f1b" else ScheduleGPipe
        self._pp_sample_ce: list[torch.Tensor] = []

        def loss_fn(logits, targets):
            ce = per_sample_ce(logits, targets)
            self._pp_sample_ce.append(ce.detach())
            return ce.sum() * self._loss_scale

        return kind(stage, n_microbatches=self.accum, loss_fn=loss_fn, scale_grads=False)

    # -- one step --

    def _forward_backward(self, inputs, positions, targets, train: bool) -> torch.Tensor:
        """Per-sample CE sums of this rank's slice (zeros on pipeline stages without the loss)."""
        if self.schedule is not None:
            self._pp_sample_ce = []
            pp_rank, last = self.layout.pp_rank, self.layout.pp - 1
            args = (inputs, positions) if pp_rank == 0 else ()
            kwargs = {"target": targets, "losses": []} if pp_rank == last else {}
            if train:
                self.schedule.step(*args, **kwargs)
            else:
                self.schedule.eval(*args, **kwargs)
            if pp_rank != last:
                return torch.zeros(len(targets), device=self.device)
            # The schedule's first step also runs loss_fn during shape inference: keep the real ones.
            return torch.cat(self._pp_sample_ce[-self.accum:])
        out = []
        mb = self.cfg.batch.micro_batch
        for k in range(0, len(inputs), mb):
            sync = k + mb >= len(inputs)
            self._set_sync(sync)
            with self.amp or nullcontext():
                logits = self.model(inputs[k : k + mb], positions[k : k + mb])
            ce = per_sample_ce(logits, targets[k : k + mb])
            out.append(ce.detach())
            if self._nsp is not None:
                self._count_nsp(logits[:, 0].detach().float(), targets[k : k + mb, 0])
            if train:
                loss = ce.sum() * self._loss_scale
                if self.engine is not None:
                    self.engine.backward(loss * self.accum)  # DeepSpeed divides by its accumulation steps
                    self.engine.step()  # applies the update only at the accumulation boundary
                else:
                    loss.backward()
        return torch.cat(out)

    def _set_sync(self, sync: bool) -> None:
        """Skip DDP's gradient all-reduce on all but the last micro-batch (no_sync). FSDP2 reduce-scatters
        after every micro-batch instead: skipping it (`set_requires_gradient_sync(False)`) would keep every
        layer's gradient unsharded until the last one, the memory FSDP is there to save (measured on the
        105M-parameter model of benchmarks/plan_vs_measured.py, 2 ranks, 2 micro-batches: 1392 -> 1213 MiB
        peak per rank)."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = sync

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks and pipeline stages; TP ranks hold copies, so count one."""
        if not dist.is_initialized() or self.world == 1:
            return values
        values = values.clone() if self.layout.coords[2] == 0 else torch.zeros_like(values)
        dist.all_reduce(values)
        return values

    def run_batch(self, indices: np.ndarray, train: bool, epochs: np.ndarray | None = None
                  ) -> tuple[float, dict[str, float], int]:
        """Mean token loss of a global batch, per-source mean losses, and its real target tokens. `epochs`: each
        sample's (its corruption's seed with the objective; evaluation: 0)."""
        mine = dp_slice(indices, self.layout.dp_rank, self.layout.dp)
        inputs, positions, targets = load_batch(
            self.ds(train), mine, self.pad_id, self.device, self.cfg.objective, self.objective_tokens, self.seed,
            None if epochs is None else dp_slice(epochs, self.layout.dp_rank, self.layout.dp), split=0 if train else 1)
        tokens = self._reduce(torch.tensor([float((targets != IGNORE).sum())], device=self.device))
        # TP copies were counted once; pipeline stages all hold the same slice: divide them out.
        n_tokens = float(tokens) / self.layout.pp
        self._loss_scale = self.layout.dp / n_tokens
        with torch.enable_grad() if train else torch.no_grad():
            sample_ce = self._forward_backward(inputs, positions, targets, train)
        keys = self.sources if train else ["val"]
        source = torch.tensor([keys.index(n) for n in self.plan.sources(mine)] if train else [0] * len(mine),
                              device=self.device)
        # Token counts only where the loss is (the last pipeline stage), so sums stay exact.
        has_loss = self.layout.pp_rank == self.layout.pp - 1
        sample_tokens = (targets != IGNORE).sum(dim=1).float() * has_loss
        stats = torch.zeros(2, len(keys), device=self.device)
        stats[0].index_add_(0, source, sample_ce.float())
        stats[1].index_add_(0, source, sample_tokens)
        stats = self._reduce(stats)
        per_source = {k: float(stats[0, i] / stats[1, i]) for i, k in enumerate(keys) if stats[1, i] > 0}
        total = float(stats[0].sum() / stats[1].sum())
        return total, per_source, int(n_tokens)

    def ds(self, train: bool) -> PackedDataset:
        return self.train_ds if train else self.val_ds

    def step(self, step: int) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optimizer.lr * lr_multiplier(step, self.cfg.steps, self.cfg.lr_schedule)
        lr = self.optimizer.param_groups[0]["lr"]
        # Dropout masks depend only on (seed, step, dp rank, pp stage): no RNG state to checkpoint, and
        # TP ranks, which hold copies of the same activations, draw the same masks.
        torch.manual_seed(step_seed(self.seed, step, self.layout.dp_rank, stream=self.layout.pp_rank))
        batch = self.plan.next_batch(step)
        start = time.perf_counter()
        loss, per_source, n_tokens = self.run_batch(batch, train=True, epochs=self.plan.epochs)
        if self.engine is not None:
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        else:
            grad_norm = clip_grad_norm(self.params, self.cfg.optimizer.grad_clip, self.layout)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, zero in self.zeros:
                    p.masked_fill_(zero, 0.0)
        if self.plan.schedule is not None and self.cfg.mixing and (step + 1) % self.cfg.mixing.update_every == 0:
            self.plan.schedule.update(step, per_source)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens_per_s = n_tokens / seconds
        peak = self.cfg.peak_flops or _known_peak(self.device)
        metrics = {
            "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
            "tokens_per_s": tokens_per_s, "step_seconds": seconds, "world_size": self.world,
            "dp": self.layout.dp, "accum": self.accum, "global_batch": self.cfg.batch.global_batch,
            "mfu": self.flops_per_token * tokens_per_s / (peak * self.world) if peak else None,
            "peak_memory": self.memory.peak(),  # this rank's (lmfleet.train.memory)
            **{f"loss/{k}": v for k, v in per_source.items()},
        }
        if self.plan.schedule is not None:
            metrics.update({f"weight/{k}": v for k, v in self.plan.schedule.weights(step + 1).items()})
        metrics.update(self._moe_metrics())
        if self.plan.curriculum is not None and step < self.plan.curriculum.steps:
            metrics["curriculum_fraction"] = self.plan.curriculum.fraction(step)
        return metrics, batch

    def _count_nsp(self, first: torch.Tensor, labels: torch.Tensor) -> None:
        """mlm_nsp: the next-sentence prediction at <CLS> is the larger of the two label tokens' logits."""
        t = self.objective_tokens
        pred = torch.where(first[:, t.isnext] > first[:, t.notnext], t.isnext, t.notnext)
        self._nsp += torch.tensor([float((pred == labels).sum()), float(len(labels))], device=self._nsp.device)

    def _moe_metrics(self) -> dict:
        """The MoE layers' auxiliary losses, dropped fraction and each expert's share of the assignments over this
        step's forward passes (mean over layers and micro-batches, all ranks)."""
        stats = moe.take_stats(self._module())
        if stats is None:
            return {}
        stats = self._reduce(stats.to(self.device)).cpu()
        passes = float(stats[0])
        out = {"moe_aux_loss": float(stats[1]) / passes, "moe_z_loss": float(stats[2]) / passes,
               "moe_dropped": float(stats[3]) / passes}
        return out | {f"expert_load/{e}": float(v) / passes for e, v in enumerate(stats[4:])}

    def evaluate(self) -> dict:
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        n = self.cfg.eval.batches * self.cfg.batch.global_batch
        was_training = self.model.training
        self.model.eval()
        # (the pipeline's last stage holds the logits inside its schedule: no NSP accuracy there)
        if self.cfg.objective.kind == "mlm_nsp" and self.layout.pp == 1:
            self._nsp = torch.zeros(2, device=self.device)
        losses, tokens = 0.0, 0
        for start in range(0, n, self.cfg.batch.global_batch):
            idx = np.arange(start, start + self.cfg.batch.global_batch) % len(self.val_ds)
            loss, _, t = self.run_batch(idx, train=False)
            losses, tokens = losses + loss * t, tokens + t
        self.model.train(was_training)
        val = losses / tokens
        out = {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))}
        if self._nsp is not None:
            right, pairs = self._reduce(self._nsp).tolist()
            out["val_nsp_accuracy"] = right / pairs
            self._nsp = None
        return out

    # -- early stopping's best weights --

    def _module(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self.model

    def snapshot_best(self) -> None:
        """Copy this rank's part of the weights (its shard, TP slice or pipeline stage): one more copy of
        them held until the end, exported if no later evaluation beats it."""
        self.best = {k: v.detach().clone() for k, v in checkpoint.model_state(self._module()).items()}

    def restore_best(self) -> None:
        checkpoint.set_model_state(self._module(), self.best)

    def score_tasks(self, step: int) -> dict:
        """eval_tasks on the whole model: every rank hands in its weights (full_state_dict), the first scores
        the tasks on a copy while the others go on to the next step's collectives, where they wait for it.
        The metrics (task/<name>/<metric>) on the first rank, {} on the others."""
        import torch

        from lmfleet.eval.lm import EvalModel
        from lmfleet.eval.tasks import score_tasks
        from lmfleet.model.transformer import Transformer
        from lmfleet.posttrain.models import load_tokenizer

        sd = full_state_dict(self.model, self.layout, self.engine)
        if sd is None:
            return {}
        with torch.device("meta"):
            model = Transformer(self.cfg.model, seed=None)
        model.load_state_dict(sd, strict=False, assign=True)  # tied embeddings: one tensor under two names
        if self.cfg.model.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.to(self.device).eval()
        t = self.cfg.eval_tasks
        if self._task_tokenizer is None:  # loaded once, at the first evaluation
            self._task_tokenizer = load_tokenizer(local_copy(self.inputs.tokenizer, "pretrain.data"))
        em = EvalModel(model, self._task_tokenizer, False, t.max_length or self.cfg.model.max_seq_len, t.batch_size,
                       self.device)
        with torch.no_grad():
            return score_tasks(em, self.inputs.tasks, self.seed)

    def evaluated(self, step: int, metrics: dict) -> None:
        """Early stopping's bookkeeping after an evaluation at `step` (adds best_<metric>, best_step)."""
        metric = self.cfg.early_stopping.metric
        if self.stopping.update(step, metrics[metric]):
            self.snapshot_best()
        metrics.update({f"best_{metric}": self.stopping.best, "best_step": self.stopping.best_step})

    # -- checkpoints and export --

    def save(self, step: int, metrics: dict) -> None:
        state = {"step": step, "plan": self.plan.state_dict()}
        if self.stopping is not None:
            state["early_stopping"] = self.stopping.state_dict()

        def write(d: Path) -> None:  # every rank writes its shards
            checkpoint.save(d, self.model, self.optimizer, state, self.rank, self.engine, best=self.best)

        save_checkpoint(metrics, f"step_{step:08d}", write)

    def restore(self, init_checkpoint=None) -> int:
        """Load the run's latest checkpoint, else `init_checkpoint` (a Tune trial's donor); returns its step."""
        with latest_checkpoint(init_checkpoint) as d:
            if d is None:
                return 0
            state = checkpoint.load(d, self.model, self.optimizer, self.engine)
            if self.stopping is not None and (state.get("early_stopping") or {}).get("best_step") is not None:
                self.stopping.load_state_dict(state["early_stopping"])
                self.snapshot_best()  # a template of the right shards for the saved copy
                checkpoint.load_best(d, self.best)
        # The loaded optimizer state carries the saved weight decay / betas: this run's config rules.
        apply_hyperparams(self.optimizer, self.cfg.optimizer)
        self.plan.load_state_dict(state["plan"])
        return state["step"]


def _known_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker (lmfleet.runtime.launch)."""
    run: WorkerRun = config["run"]
    cfg: PretrainConfig = run.cfg
    inputs = run.inputs
    trainer = Trainer(cfg, inputs, run.seed)
    start = trainer.restore(run.init_checkpoint)
    stop_at = run.stop_at or cfg.steps
    stopping = trainer.stopping
    if stopping is not None and stopping.stopped:  # resumed after it stopped early: nothing left to train
        stop_at = start
    metrics_log = run.metrics if trainer.rank == 0 else None  # lmfleet.runlog: to the driver's node
    samples = inputs.samples if trainer.rank == 0 else None
    if metrics_log:  # each start of the worker group: the report marks restarts (a fault, a resize, a resume)
        metrics_log.write(run.stage, **run.tags, event="workers_started", from_step=start, world_size=trainer.world)
    for step in range(start, stop_at):
        metrics, batch = trainer.step(step)
        done = step + 1
        if samples:
            samples.append(json.dumps({"step": done, "samples": batch.tolist(), "world_size": trainer.world}) + "\n")
        if done % cfg.eval.every == 0 or done == cfg.steps:
            metrics.update(trainer.evaluate())
            if stopping is not None:
                trainer.evaluated(done, metrics)
        if inputs.tasks and (done % cfg.eval_tasks.every == 0 or done == cfg.steps):
            metrics.update(trainer.score_tasks(done))
        stopped = stopping is not None and stopping.stopped
        if metrics_log and (done % cfg.log_every == 0 or done == cfg.steps or "val_loss" in metrics or done == start + 1):
            metrics_log.write(run.stage, **run.tags, **metrics)
        # Reports to Ray Train go with checkpoints only: each is a barrier through the controller
        # (measured ~1.9 s with Ray 2.60 here); metrics.jsonl gets every logged step.
        if done % cfg.checkpoint.every == 0 or done == cfg.steps or stopped:
            trainer.save(done, metrics)
        if stopped:
            break
    memory = gather_record(trainer.memory)
    if metrics_log:
        metrics_log.write(run.stage, **run.tags, **memory)
        if stopping is not None:
            metrics_log.write(run.stage, **run.tags, event="early_stopping", **stopping.summary())
    last = stopping.stopped_at if stopping is not None and stopping.stopped else max(start, stop_at)
    exported_step = last
    if stopping is not None and stopping.best_step not in (None, last) and inputs.export:
        trainer.restore_best()  # the best evaluated weights are the model, not the last ones
        exported_step = stopping.best_step
    sd = full_state_dict(trainer.model, trainer.layout, trainer.engine) if inputs.export else None
    if sd is not None:
        from lmfleet.model.export import export_model

        local = workdir(inputs.export, fresh=True)
        fmt = export_model(sd, cfg.model, local, local_copy(inputs.tokenizer, "pretrain.data"),
                           eos_id=trainer.index["eos_id"], pad_id=trainer.index["pad_id"])
        (local / "export.json").write_text(json.dumps({"format": fmt, "step": exported_step}))
        publish(local, inputs.export, move=True)
