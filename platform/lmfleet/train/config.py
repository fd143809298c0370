"""Config of the pretraining stage (the `pretrain:` section of a stage YAML)."""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from lmfleet.config import StrictModel
from lmfleet.eval.task_config import TrainingTasksConfig
from lmfleet.model.config import ModelConfig
from lmfleet.tune.config import PBTConfig, TuneConfig

TUNE_METRICS = ("loss", "val_loss", "val_perplexity")
# Dense bf16 peak FLOP/s of known GPUs (datasheets): the MFU the loop logs and `lmfleet plan`'s step time.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class AdamConfig(StrictModel):
    """The optimizer keys every training stage shares (`optimizer:`; post-training has HF's defaults)."""

    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="Applied to matrices only, not norms or biases.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; None: no clipping.")


class ObjectiveConfig(StrictModel):
    """`objective:` of the pretrain stage: what the model learns from each packed sample
    (lmfleet.train.objectives)."""

    kind: Literal["clm", "fim", "span_infill", "sentence_permutation", "document_rotation", "mlm", "mlm_nsp"] = "clm"
    rate: float = Field(0.5, ge=0, le=1, description="fim: the fraction of documents rearranged.")
    spm_rate: float = Field(0.5, ge=0, le=1, description="fim: of those, the fraction in SPM order (else PSM).")
    mask_ratio: float = Field(0.3, gt=0, lt=1, description="span_infill: the fraction of each piece masked.")
    poisson_lambda: float = Field(3.0, gt=0, description="span_infill: the mean span length.")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="mlm / mlm_nsp: the fraction of tokens predicted.")
    nsp_random_fraction: float = Field(0.5, ge=0, le=1, description="mlm_nsp: second segments from another sample.")

    @model_validator(mode="after")
    def _keys_of_the_kind(self):
        own = {"fim": {"rate", "spm_rate"}, "span_infill": {"mask_ratio", "poisson_lambda"}, "mlm": {"mask_prob"},
               "mlm_nsp": {"mask_prob", "nsp_random_fraction"}}.get(self.kind, set())
        # (a key at its default passes: a dumped and re-validated config has every key)
        foreign = sorted(k for k in self.model_fields_set - own - {"kind"}
                         if getattr(self, k) != type(self).model_fields[k].default)
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not a key of objective kind {self.kind!r}"
                             + (f" (it has {', '.join(sorted(own))})" if own else ""))
        return self

    @property
    def bidirectional(self) -> bool:
        return self.kind in ("mlm", "mlm_nsp")


class CurriculumConfig(StrictModel):
    """`curriculum:` of the pretrain stage: easy samples first (lmfleet.train.curriculum)."""

    score: str = Field("length", description="length: a sample's mean document length; loss: `proxy`'s loss on it; "
                                             "column:NAME: the packed data's column NAME (data stage pack.columns).")
    proxy: str | None = Field(None, description="score loss: the model scoring samples: a stage of this run (its "
                                                "model/) or a model dir / URI.")
    order: Literal["easy_first", "hard_first"] = "easy_first"
    pacing: Literal["linear", "step"] = "linear"
    start_fraction: float = Field(0.25, gt=0, le=1, description="The pool at step 0: this fraction of the samples.")
    steps: int | None = Field(None, ge=1, description="Steps until every sample is in the pool; None: half the stage's.")
    buckets: int = Field(4, ge=2, description="pacing step: the pool grows in this many equal jumps.")

    @model_validator(mode="after")
    def _score(self):
        if self.score not in ("length", "loss") and not re.fullmatch(r"column:[A-Za-z0-9_-]+", self.score):
            raise ValueError(f"score {self.score!r}: length, loss or column:NAME (a column the data stage packed: "
                             "pack.columns)")
        if (self.score == "loss") != (self.proxy is not None):
            raise ValueError("score loss needs proxy (the model that scores the samples); proxy is only for loss")
        return self

    @property
    def column(self) -> str | None:
        """score column:NAME: NAME."""
        return self.score.removeprefix("column:") if self.score.startswith("column:") else None


class EarlyStoppingConfig(StrictModel):
    """`early_stopping:` of every training stage that evaluates: stop after `patience` evaluations without an
    improvement of more than `min_delta`; the best evaluated weights are the ones exported."""

    metric: str = Field("val_loss", description="An evaluated metric of the stage (pretrain: val_loss, val_perplexity).")
    patience: int = Field(3, ge=1, description="Evaluations in a row without an improvement before stopping.")
    min_delta: float = Field(0.0, ge=0)
    mode: Literal["min", "max"] | None = Field(None, description="min: lower is better; None: min for losses and "
                                                                 "perplexities, max for the rest (accuracies).")

    @property
    def minimize(self) -> bool:
        return self.mode == "min" if self.mode else ("loss" in self.metric or "perplexity" in self.metric)


class OptimizerConfig(AdamConfig):
    name: Literal["adamw", "adafactor", "lion", "lamb", "adamw_8bit"] = Field(
        "adamw", description="lamb: per-tensor trust ratio (not with DeepSpeed ZeRO); adamw_8bit: bitsandbytes' "
                             "blockwise 8-bit states (lmfleet[8bit]; not with FSDP / TP shards).")

    @model_validator(mode="after")
    def _installed(self):
        if self.name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("adamw_8bit needs the 'bitsandbytes' package: pip install 'lmfleet[8bit]'")
        return self


class WarmupConfig(StrictModel):
    """The schedule keys every scheduled training stage shares (`lr_schedule:`)."""

    warmup_steps: int = Field(0, ge=0)
    decay: Literal["linear", "cosine", "constant"] = "linear"


class LRScheduleConfig(WarmupConfig):
    decay: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: final fraction of steps that decays.")


class BatchConfig(StrictModel):
    global_batch: int = Field(8, ge=1, description="Samples per optimizer step, whatever the worker count.")
    micro_batch: int = Field(4, ge=1, description="Samples per forward pass on one worker.")


class FSDPConfig(StrictModel):
    reshard_after_forward: bool = Field(True, description="True: full sharding (ZeRO-3); False: grad/optimizer sharding.")
    cpu_offload: bool = False
    param_dtype: Literal["float32", "bfloat16"] | None = Field(None, description="Mixed precision; None: auto.")
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"


class ZeroConfig(StrictModel):
    zero_stage: int = Field(2, ge=0, le=3)


class DeepSpeedConfig(ZeroConfig):
    offload_optimizer: bool = False
    offload_param: bool = False
    config: dict[str, Any] = Field(default_factory=dict, description="Merged over the generated DeepSpeed config.")

    def zero_optimization(self, d_model: int) -> dict:
        """The `zero_optimization` section: lmfleet's settings, `config.zero_optimization` over them. DeepSpeed's own
        bucket defaults (5e8 gradient elements, 5e7 prefetched, parameters under 1e5 elements never
        partitioned) are sized for billion-parameter models: below that one bucket holds every gradient at
        once. Sized by the hidden size instead, as HF's DeepSpeed integration does for "auto"."""
        zero: dict[str, Any] = {"stage": self.zero_stage, "reduce_bucket_size": d_model * d_model}
        if self.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=int(0.9 * d_model * d_model),
                        stage3_param_persistence_threshold=10 * d_model)
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.offload_param:
            zero["offload_param"] = {"device": "cpu"}
        return {**zero, **self.config.get("zero_optimization", {})}


class ParallelConfig(StrictModel):
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "ddp"
    tp_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    fsdp: FSDPConfig = FSDPConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    activation_checkpointing: bool = False
    compile: bool = False

    def fsdp_over_dp(self, dp: int) -> bool:
        """Whether the data-parallel ranks hold the model through FSDP2 (lmfleet.train.parallel): `fsdp`, and
        `ddp` with tp or pp > 1 on more than one dp rank (FSDP2 is DTensor-aware; with dp 1 there is nothing
        to replicate over, and it would only add a second, unsharded copy of weights and gradients)."""
        return self.strategy == "fsdp" or (self.strategy == "ddp" and (self.tp_size > 1 or self.pp_size > 1) and dp > 1)

    @property
    def fsdp_reshards(self) -> bool:
        """FSDP2 frees each layer's gathered parameters after its forward: `fsdp` as configured; `ddp` with
        tp / pp uses FSDP2 to replicate, so the parameters stay whole."""
        return self.strategy == "fsdp" and self.fsdp.reshard_after_forward


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage` of `pp`: an even split, earlier stages take the remainder
    (lmfleet.train.parallel splits the model so; lmfleet.train.plan counts them)."""
    per, extra = divmod(n_layers, pp)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (1 if stage < extra else 0))


class ScalingConfig(StrictModel):
    num_workers: int | tuple[int, int] = Field(1, description="A count, or [min, max] for elastic training.")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them.")
    cpus_per_worker: float = Field(1.0, gt=0)

    def resolve_gpu(self) -> bool:
        """use_gpu, or (None) whether the Ray cluster has GPUs."""
        import ray

        return self.use_gpu if self.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.bounds
        if lo < 1 or hi < lo:
            raise ValueError(f"num_workers {self.num_workers}: need 1 <= min <= max")
        return self


class CheckpointConfig(StrictModel):
    """`checkpoint:` of every training stage (steps: optimizer steps; the RL stages: iterations)."""

    every: int = Field(50, ge=1, description="Steps between checkpoints (and the last step).")
    keep_last: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (last checkpoint).")


class EvalConfig(StrictModel):
    every: int = Field(50, ge=1)
    batches: int = Field(4, ge=1, description="Global batches of the val split per evaluation.")


class MixingScheduleConfig(StrictModel):
    """Per-source sampling during training. None in the stage config: one stream over all sources
    in the proportions the data stage packed."""

    kind: Literal["static", "piecewise", "adaptive"] = "static"
    weights: dict[str, float] | None = Field(None, description="static/adaptive start; default: packed sizes.")
    milestones: list[tuple[int, dict[str, float]]] = Field(default_factory=list, description="piecewise: (step, weights).")
    lr: float = Field(1.0, gt=0, description="adaptive: step size of the exponentiated-gradient update.")
    smoothing: float = Field(0.1, ge=0, le=1, description="adaptive: mix with uniform.")
    update_every: int = Field(10, ge=1, description="adaptive: steps between weight updates.")

    @model_validator(mode="after")
    def _milestones(self):
        steps = [s for s, _ in self.milestones]
        if steps != sorted(set(steps)):
            raise ValueError(f"milestones: steps must be increasing and distinct, got {steps}")
        if self.kind == "piecewise" and not steps:
            raise ValueError("kind 'piecewise' needs milestones: [[step, {source: weight}], ...]")
        return self

    def source_names(self) -> set[str]:
        return set(self.weights or {}) | {k for _, w in self.milestones for k in w}


class PretrainConfig(StrictModel):
    data: str = Field(..., description="The data stage's output: a stage name of this run, or a path.")
    init_from: str | None = Field(
        None, description="Continue pretraining from this checkpoint: a HF Llama dir (LlamaForCausalLM "
                          "safetensors), an lmfleet model export, or a stage name of this run (its model/); a path "
                          "or URI. Its architecture fills `model` (keys set there must match).")
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    batch: BatchConfig = BatchConfig()
    steps: int = Field(100, ge=1)
    parallel: ParallelConfig = ParallelConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    mixing: MixingScheduleConfig | None = None
    curriculum: CurriculumConfig | None = None
    early_stopping: EarlyStoppingConfig | None = None
    eval_tasks: TrainingTasksConfig | None = Field(None, description="Eval stage tasks scored on the whole model "
                                                   "every eval_tasks.every steps (metrics task/<name>/<metric>).")
    keep_zeros: bool = Field(False, description="Hold the weights that are zero in init_from at zero (recovery "
                                                "after magnitude pruning: the prune stage sets it).")
    log_every: int = Field(10, ge=1)
    log_samples: bool = Field(False, description="Write the sample ids of every step to samples.jsonl.")
    peak_flops: float | None = Field(None, gt=0, description="Per-device peak FLOP/s for MFU; None: known GPUs only.")
    export: bool = True
    tune: TuneConfig | None = Field(None, description="A hyperparameter search over this config (lmfleet.tune).")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "tensorboard" in data:  # a stage key before the run's tracking block
            raise ValueError("tensorboard: moved to the run's `tracking: {tensorboard: true}` (every stage; "
                             "event files in the run dir's tensorboard/<stage>/)")
        return data

    @model_validator(mode="after")
    def _parallel_fits(self):
        p, m = self.parallel, self.model
        lo, hi = self.scaling.bounds
        if p.strategy == "none" and (hi > 1 or p.tp_size > 1 or p.pp_size > 1):
            raise ValueError("parallel.strategy 'none' is the single-process reference: use 1 worker, tp_size=pp_size=1")
        if m.n_heads % p.tp_size or m.kv_heads % p.tp_size:
            raise ValueError(f"parallel.tp_size {p.tp_size} must divide n_heads {m.n_heads} and n_kv_heads {m.kv_heads}")
        if p.tp_size > 1 and m.positions == "alibi":
            raise ValueError("positions 'alibi' is not supported with tp_size > 1 (per-head slopes are not sharded)")
        if p.pp_size > m.n_layers:
            raise ValueError(f"parallel.pp_size {p.pp_size} is larger than model.n_layers {m.n_layers}")
        if p.pp_size > 1 and m.tie_embeddings:
            raise ValueError("tie_embeddings needs the embedding and output on one stage: not with pp_size > 1")
        if p.strategy == "deepspeed" and (p.tp_size > 1 or p.pp_size > 1):
            raise ValueError("strategy 'deepspeed' runs ZeRO data parallelism only: set tp_size=pp_size=1")
        if self.optimizer.name == "lamb" and p.strategy == "deepspeed" and p.deepspeed.zero_stage >= 1:
            raise ValueError("optimizer 'lamb' with DeepSpeed ZeRO: ZeRO hands the optimizer flat partitions of many "
                             "tensors, so there is no per-tensor trust ratio; use fsdp or ddp (or zero_stage 0)")
        if self.optimizer.name == "adamw_8bit" and (p.tp_size > 1 or any(p.fsdp_over_dp(w // (p.tp_size * p.pp_size))
                                                                          for w in range(lo, hi + 1))):
            raise ValueError("optimizer 'adamw_8bit' takes whole tensors, not FSDP / TP shards (DTensor): use ddp, or "
                             "deepspeed with zero_stage 1-2 to shard its 8-bit states")
        if p.strategy == "deepspeed" and lo != hi:
            raise ValueError("strategy 'deepspeed' cannot resume ZeRO state on another worker count: fix num_workers")
        for world in range(lo, hi + 1):
            if world % (p.tp_size * p.pp_size):
                raise ValueError(f"{world} workers is not divisible by tp_size*pp_size = {p.tp_size * p.pp_size}")
            dp = world // (p.tp_size * p.pp_size)
            if self.batch.global_batch % (dp * self.batch.micro_batch):
                raise ValueError(
                    f"batch.global_batch {self.batch.global_batch} is not divisible by data-parallel size {dp} x "
                    f"micro_batch {self.batch.micro_batch} (at {world} workers)"
                )
            if p.pp_size > 1 and self.batch.global_batch // (dp * self.batch.micro_batch) < p.pp_size:
                raise ValueError(
                    f"pipeline: {self.batch.global_batch // (dp * self.batch.micro_batch)} micro-batches per step "
                    f"(at {world} workers) is fewer than pp_size {p.pp_size}: raise global_batch or lower micro_batch"
                )
        return self

    @model_validator(mode="after")
    def _keep_zeros(self):
        if self.keep_zeros and (self.init_from is None or self.parallel.strategy == "deepspeed"):
            raise ValueError("keep_zeros needs init_from (the zeros to keep) and not deepspeed (its fp32 master "
                             "weights would bring them back)")
        return self

    @model_validator(mode="after")
    def _moe(self):
        p = self.parallel
        if self.model.moe is None:
            return self
        if p.tp_size > 1 or p.pp_size > 1:
            raise ValueError("model.moe runs with data parallelism (none, ddp, fsdp, deepspeed): tp_size and pp_size 1")
        if p.activation_checkpointing:
            raise ValueError("model.moe: not with activation_checkpointing (recomputing a layer would route twice)")
        return self

    @model_validator(mode="after")
    def _curriculum(self):
        c = self.curriculum
        if c is not None and c.steps is not None and c.steps > self.steps:
            raise ValueError(f"curriculum.steps {c.steps} is more than the stage's steps {self.steps}")
        return self

    @model_validator(mode="after")
    def _objective_fits_the_model(self):
        o, m = self.objective, self.model
        if o.bidirectional and m.causal:
            raise ValueError(f"objective {o.kind!r} trains a bidirectional encoder: set model.causal: false")
        if not o.bidirectional and not m.causal:
            raise ValueError(f"objective {o.kind!r} predicts the next token: model.causal: false needs mlm or mlm_nsp")
        return self

    @model_validator(mode="after")
    def _eval_tasks(self):
        if self.eval_tasks is not None and not self.model.causal:
            raise ValueError("eval_tasks: an encoder (model.causal false) has no left-to-right likelihood to score")
        return self

    @model_validator(mode="after")
    def _early_stopping(self):
        e = self.early_stopping
        if e is None:
            return self
        if e.metric not in ("val_loss", "val_perplexity"):
            raise ValueError(f"early_stopping.metric {e.metric!r}: pretraining evaluates val_loss and val_perplexity")
        if not e.minimize:
            raise ValueError(f"early_stopping.mode {e.mode!r}: {e.metric} is better when lower (min)")
        if self.tune is not None:
            raise ValueError("early_stopping with tune: a search stops trials through its scheduler (asha, pbt)")
        if self.parallel.strategy == "deepspeed" and self.parallel.deepspeed.zero_stage == 3:
            raise ValueError("early_stopping keeps the best weights, which ZeRO-3 holds as flat partitions: use "
                             "zero_stage 1-2 or fsdp")
        return self

    @model_validator(mode="after")
    def _tune(self):
        t = self.tune
        if t is None:
            return self
        if t.metric not in TUNE_METRICS and not t.metric.startswith("loss/"):
            raise ValueError(f"tune.metric {t.metric!r}: pretraining reports {', '.join(TUNE_METRICS)} and loss/<source>")
        every = self.checkpoint.every  # trials report to Tune with each checkpoint
        if t.metric.startswith("val_") and every % self.eval.every:
            raise ValueError(f"tune.metric {t.metric!r} is reported at each checkpoint: eval.every {self.eval.every} "
                             f"must divide checkpoint.every {every}")
        if isinstance(t.scheduler, PBTConfig) and t.scheduler.perturbation_interval % every:
            raise ValueError(f"tune.scheduler.perturbation_interval {t.scheduler.perturbation_interval} must be a "
                             f"multiple of checkpoint.every {every} (PBT exploits checkpoints)")
        t.check_pbt_keys(("model.",), allowed=("model.dropout",))
        t.check_against(self)
        return self
