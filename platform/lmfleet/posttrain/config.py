"""Configs of the post-training stages: `sft`, `reward`, `dpo`, `kto`, `orpo`, `simpo`, `distill` and the RL stages `ppo`, `grpo`, `rloo`.

Each stage reads a model (a stage name of this run, whose `model/` dir it takes, or a path to a HF
model dir) and a dataset of records in a format users have, and writes `model/` for the next stage.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lmfleet.config import StrictModel
from lmfleet.eval.task_config import TrainingTasksConfig
from lmfleet.train.config import (
    AdamConfig,
    CheckpointConfig,
    EarlyStoppingConfig,
    ScalingConfig,
    WarmupConfig,
    ZeroConfig,
)
from lmfleet.tune.config import PBTConfig, TuneConfig

SFT_FORMATS = ("alpaca", "messages", "python_functions")
PREFERENCE_FORMATS = ("hh", "conversations", "pairs", "python_functions")
PROMPT_FORMATS = ("prompts",)
UNPAIRED_FORMATS = ("unpaired",)


class DatasetConfig(StrictModel):
    """Records for a post-training stage.

    SFT formats: `alpaca` ({instruction, input, output}), `messages` ({messages: [{role, content}]} or
    ShareGPT {conversations: [{from, value}]}). Preference formats: `hh` (Anthropic HH {chosen, rejected}
    transcripts), `conversations` ({conversations, chosen: {from, value}, rejected: {...}}), `pairs`
    ({prompt, chosen, rejected} strings). Prompt format (the RL stages): `prompts` ({prompt: a string or
    messages, ...any other fields, which reward functions receive}). Unpaired feedback (kto): `unpaired`
    ({prompt, completion, label: true | false}). `python_functions` builds SFT or
    preference records offline from Python source (default: the standard library): signature ->
    docstring; rejected: another function's docstring (`negatives: mismatched`) or the true one with its
    words shuffled (`shuffled`). `auto` picks the format from each record's keys.
    """

    paths: list[str] = Field(default_factory=list, description="Files (.json/.jsonl/.jsonl.gz), dirs or globs.")
    format: Literal["auto", "alpaca", "messages", "hh", "conversations", "pairs", "prompts", "unpaired",
                    "python_functions"] = "auto"
    max_records: int | None = Field(None, ge=1, description="Keep a seeded sample of N valid records.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Held out by a seeded hash of each prompt.")
    max_chars: int = Field(16000, ge=1, description="Longer records are quarantined (reason too_long).")
    system_prompt: str | None = Field(None, description="Prepended as a system message to every prompt.")
    negatives: Literal["mismatched", "shuffled"] = Field(
        "mismatched", description="python_functions preference pairs: the rejected answer is another function's "
                                  "docstring, or the true docstring with its words shuffled (seeded).")

    @model_validator(mode="after")
    def _paths(self):
        if self.format != "python_functions" and not self.paths:
            raise ValueError(f"format {self.format!r} needs paths (only python_functions has a default)")
        return self


class TrainingConfig(StrictModel):
    """How long and on what the HF-Trainer stages train (TRL's configs get these fields)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    max_length: int = Field(512, ge=8, description="Tokens per sequence; longer ones are truncated.")
    bf16: bool | None = Field(None, description="None: on when training on GPUs.")


class OptimizerConfig(AdamConfig):
    """AdamW (`optimizer:`, pretraining's keys) with the HF Trainer's defaults."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0, description="Applied to matrices only, not norms or biases.")


class BatchConfig(StrictModel):
    """`batch:` (pretraining's keys): records per forward pass on a worker and per optimizer step."""

    micro_batch: int = Field(4, ge=1, description="Records per forward pass on one worker.")
    global_batch: int | None = Field(None, ge=1, description="Records per optimizer step over all workers "
                                                             "(micro-batches accumulate); None: micro_batch x workers.")


class ParallelConfig(StrictModel):
    """How the workers of a HF-Trainer stage share the model (`parallel:`, pretraining's keys)."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field("ddp", description="fsdp: FSDP2, one unit per layer.")
    deepspeed: ZeroConfig = ZeroConfig()
    activation_checkpointing: bool = False


# Post-training keys spelled apart from pretraining's until Dec 2026, and where they went.
RENAMED = {
    "training.learning_rate": "optimizer.lr", "training.weight_decay": "optimizer.weight_decay",
    "training.max_grad_norm": "optimizer.grad_clip", "training.save_steps": "checkpoint.every",
    "training.keep_last": "checkpoint.keep_last", "training.max_failures": "checkpoint.max_failures",
    "training.strategy": "parallel.strategy", "training.zero_stage": "parallel.deepspeed.zero_stage",
    "training.activation_checkpointing": "parallel.activation_checkpointing",
    "training.lr_scheduler": "lr_schedule.decay", "training.warmup_ratio": "lr_schedule.warmup_steps (a count)",
    "training.per_device_batch": "batch.micro_batch",
    "training.grad_accum": "batch.global_batch (= micro_batch x grad_accum x workers)",
    "training.logging_steps": "log_every", "checkpoint_every": "checkpoint.every",
}


class PeftConfig(StrictModel):
    """Parameter-efficient fine-tuning with PEFT. LoRA and IA3 merge into the model on export;
    prompt and P-tuning keep an adapter (their virtual tokens cannot be merged into weights)."""

    method: Literal["lora", "ia3", "prompt_tuning", "p_tuning"] = "lora"
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    num_virtual_tokens: int = Field(8, ge=1, description="prompt_tuning / p_tuning.")
    encoder_hidden_size: int = Field(64, ge=1, description="p_tuning: prompt encoder MLP width.")


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, description="0: greedy.")
    top_k: int = Field(0, ge=0, description="0: off.")
    top_p: float = Field(1.0, gt=0, le=1)


class EvalConfig(StrictModel):
    """`eval:` of the stages that generate answers to held-out prompts (sft; dpo with a reward_model)."""

    samples: int = Field(32, ge=0, description="Held-out prompts to generate from (BLEU/ROUGE, reward, win rate).")
    generation: GenerationConfig = GenerationConfig(temperature=0.0)


class RLEvalConfig(StrictModel):
    """`eval:` of the RL stages: they sample as in training (`generation`, at temperature 1)."""

    samples: int = Field(32, ge=0, description="Held-out prompts the policy and the input model answer.")


class _Stage(StrictModel):
    """What every post-training stage has. Keys shared with pretraining mean the same there: `optimizer`,
    `checkpoint`, `scaling` (and `lr_schedule`, `batch`, `parallel`, `log_every` of the HF-Trainer stages)."""

    KIND: ClassVar[str] = ""  # the stage kind this configures (lmfleet.stages), in its error messages

    model: str = Field(..., description="Input model: a stage name of this run (its model/ dir) or a HF model dir.")
    dataset: DatasetConfig
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict):
            training = data.get("training") if isinstance(data.get("training"), dict) else {}
            old = [k for k in RENAMED if (k.removeprefix("training.") in training if k.startswith("training.")
                                           else k in data)
                   and RENAMED[k].split(".")[0].split(" ")[0] in cls.model_fields]  # a key this stage has
            if old:
                raise ValueError("renamed keys (one vocabulary with pretraining): " + ", ".join(
                    f"{k} -> {RENAMED[k]}" for k in old))
        return data

    @model_validator(mode="after")
    def _fixed_workers(self):
        lo, hi = self.scaling.bounds
        if lo != hi:
            raise ValueError("scaling.num_workers: post-training stages run on a fixed worker count")
        return self


class _GeneratingStage(StrictModel):
    """A stage whose evaluation generates answers (`eval.generation`)."""

    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _room(self):
        if self.eval.generation.max_new_tokens >= self.training.max_length:
            raise ValueError(f"eval.generation.max_new_tokens {self.eval.generation.max_new_tokens} must be below "
                             f"training.max_length {self.training.max_length} (room for the prompt)")
        return self


class _HFStage(_Stage):
    """A stage on a HF / TRL trainer (lmfleet.posttrain.hf)."""

    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: WarmupConfig = WarmupConfig()
    batch: BatchConfig = BatchConfig()
    parallel: ParallelConfig = ParallelConfig()
    log_every: int = Field(5, ge=1, description="Optimizer steps between metrics records.")
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Evaluated every checkpoint.every steps on the held-out records; metric val_loss (the "
                          "trainer's eval_loss) or an eval_* metric the trainer logs.")

    @property
    def grad_accum(self) -> int:
        """Micro-batches accumulated per optimizer step on each worker."""
        b, workers = self.batch, self.scaling.bounds[0]
        return 1 if b.global_batch is None else b.global_batch // (b.micro_batch * workers)

    @property
    def hf_metric(self) -> str:
        """early_stopping.metric as the HF Trainer names it."""
        m = self.early_stopping.metric
        return "eval_loss" if m == "val_loss" else m

    @model_validator(mode="after")
    def _early_stopping(self):
        e = self.early_stopping
        if e is None:
            return self
        if not self.hf_metric.startswith("eval_"):
            raise ValueError(f"early_stopping.metric {e.metric!r}: val_loss or an evaluation metric the trainer "
                             "logs (eval_loss, eval_accuracy, ...)")
        if not self.dataset.val_fraction:
            raise ValueError("early_stopping needs held-out records: set dataset.val_fraction > 0")
        if getattr(self, "tune", None) is not None:
            raise ValueError("early_stopping with tune: a search stops trials through its scheduler (asha, pbt)")
        return self

    @model_validator(mode="after")
    def _batch(self):
        b, workers = self.batch, self.scaling.bounds[0]
        if b.global_batch is not None and b.global_batch % (b.micro_batch * workers):
            raise ValueError(f"batch.global_batch {b.global_batch} is not divisible by micro_batch {b.micro_batch} "
                             f"x {workers} worker(s)")
        return self


class SFTStageConfig(_HFStage, _GeneratingStage):
    KIND: ClassVar[str] = "sft"
    peft: PeftConfig | None = None
    chat_template: str | None = Field(None, description="Jinja chat template; None: the model's, else lmfleet's.")
    completion_only: bool = Field(True, description="Loss on assistant tokens only (prompt tokens masked).")
    packing: bool = False
    tune: TuneConfig | None = Field(None, description="A hyperparameter search over this config (lmfleet.tune).")
    eval_tasks: TrainingTasksConfig | None = Field(None, description="Eval stage tasks scored on the model every "
                                                   "eval_tasks.every steps (metrics task/<name>/<metric>).")

    @model_validator(mode="after")
    def _eval_tasks(self):
        if self.eval_tasks is not None and self.parallel.strategy != "ddp":
            raise ValueError(f"eval_tasks: the first worker scores the whole model, which parallel.strategy "
                             f"{self.parallel.strategy!r} shards: use ddp")
        return self

    @model_validator(mode="after")
    def _format(self):
        if self.dataset.format not in (*SFT_FORMATS, "auto"):
            raise ValueError(f"dataset.format {self.dataset.format!r} is not an SFT format ({', '.join(SFT_FORMATS)})")
        return self

    @model_validator(mode="after")
    def _tune(self):
        t = self.tune
        if t is None:
            return self
        # Trials report to Tune with each checkpoint: the trainer's last logged loss and its eval_loss.
        if t.metric not in ("loss", "eval_loss"):
            raise ValueError(f"tune.metric {t.metric!r}: SFT reports loss and eval_loss")
        if t.metric == "eval_loss" and not self.dataset.val_fraction:
            raise ValueError("tune.metric eval_loss needs held-out records: set dataset.val_fraction > 0")
        if isinstance(t.scheduler, PBTConfig) and t.scheduler.perturbation_interval % self.checkpoint.every:
            raise ValueError(f"tune.scheduler.perturbation_interval {t.scheduler.perturbation_interval} must be a "
                             f"multiple of checkpoint.every {self.checkpoint.every} (PBT exploits checkpoints)")
        t.check_pbt_keys(("peft.", "model"), allowed=("peft.dropout", "peft.alpha"))
        t.check_against(self)
        return self


class _PreferenceStage(_HFStage):
    @model_validator(mode="after")
    def _format(self):
        if self.dataset.format not in (*PREFERENCE_FORMATS, "auto"):
            raise ValueError(
                f"dataset.format {self.dataset.format!r} is not a preference format ({', '.join(PREFERENCE_FORMATS)})"
            )
        return self


class RewardStageConfig(_PreferenceStage):
    KIND: ClassVar[str] = "reward"
    peft: PeftConfig | None = None

    @model_validator(mode="after")
    def _mergeable(self):
        if self.peft is not None and self.peft.method not in ("lora", "ia3"):
            raise ValueError(f"peft.method {self.peft.method!r}: a reward model needs weights the next stages "
                             "load as a classifier: use lora or ia3 (merged on export)")
        return self


class DPOStageConfig(_PreferenceStage, _GeneratingStage):
    KIND: ClassVar[str] = "dpo"
    peft: PeftConfig | None = None
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    reward_model: str | None = Field(None, description="Optional: score DPO vs its input model with this RM.")


class KTOStageConfig(_HFStage):
    """KTO (Ethayarajh et al. 2024) with TRL's KTOTrainer: preference pairs (unpaired by TRL: chosen is
    desirable, rejected undesirable) or unpaired `{prompt, completion, label}` records."""

    KIND: ClassVar[str] = "kto"

    peft: PeftConfig | None = None
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint.")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable completions.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable completions.")

    @model_validator(mode="after")
    def _format(self):
        if self.dataset.format not in (*PREFERENCE_FORMATS, *UNPAIRED_FORMATS, "auto"):
            raise ValueError(f"dataset.format {self.dataset.format!r}: kto reads preference pairs "
                             f"({', '.join(PREFERENCE_FORMATS)}) or unpaired records (unpaired)")
        return self


class ORPOStageConfig(_PreferenceStage):
    """ORPO (Hong et al. 2024) with TRL's ORPOTrainer (trl.experimental): SFT loss on the chosen answer plus
    beta x an odds-ratio preference term; no reference model."""

    KIND: ClassVar[str] = "orpo"

    peft: PeftConfig | None = None
    beta: float = Field(0.1, gt=0, description="lambda: weight of the odds-ratio term.")


class SimPOStageConfig(_PreferenceStage):
    """SimPO (Meng et al. 2024) with TRL's CPOTrainer (loss_type simpo, trl.experimental): the length-
    normalized log-probability is the implicit reward, with a target margin; no reference model."""

    KIND: ClassVar[str] = "simpo"

    peft: PeftConfig | None = None
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalized reward (the paper: 2-2.5).")
    gamma: float = Field(0.5, ge=0, description="Target reward margin (TRL's simpo_gamma).")
    sft_weight: float = Field(0.0, ge=0, description="CPO's alpha: weight of an SFT loss on the chosen answer "
                                                     "(0: pure SimPO).")


class StudentConfig(StrictModel):
    """A student of the teacher's architecture: the teacher's config with these sizes overridden."""

    n_layers: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=8)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    ffn_dim: int | None = Field(None, ge=8)


class DistillStageConfig(_HFStage):
    """`model` is the teacher. The student is `student_model` (a HF dir / stage) or built from `student`."""

    KIND: ClassVar[str] = "distill"

    student: StudentConfig = StudentConfig()
    student_model: str | None = None
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the LM loss.")

    @model_validator(mode="after")
    def _format(self):
        if self.dataset.format not in (*SFT_FORMATS, "auto"):
            raise ValueError(f"dataset.format {self.dataset.format!r}: distillation reads SFT formats")
        if self.student_model is not None and self.student.model_dump(exclude_none=True):
            raise ValueError("set either student (sizes of a new student) or student_model (an existing one)")
        s = self.student
        if s.d_model and s.n_heads and s.d_model % s.n_heads:
            raise ValueError(f"student.d_model {s.d_model} is not divisible by student.n_heads {s.n_heads}")
        if s.n_heads and s.n_kv_heads and s.n_heads % s.n_kv_heads:
            raise ValueError(f"student.n_heads {s.n_heads} is not divisible by student.n_kv_heads {s.n_kv_heads}")
        if self.parallel.strategy == "deepspeed" and self.parallel.deepspeed.zero_stage == 3:
            # ZeRO-3 would partition the teacher too, outside any engine.
            raise ValueError("distill: the teacher is replicated per worker; use parallel.deepspeed.zero_stage <= 2, "
                             "fsdp or ddp")
        return self


class RLTrainingConfig(StrictModel):
    """`training:` of the RL stages (ppo, grpo, rloo). Their schedule is `iterations` x the algorithm's
    batches at a constant learning rate, and their models are replicated in every worker (DDP), so the
    HF-Trainer stages' epochs / lr_schedule / batch / parallel keys do not apply."""

    max_length: int = Field(512, ge=8, description="Prompt + completion tokens; longer prompts are quarantined.")


class RLOptimizerConfig(OptimizerConfig):
    lr: float = Field(1e-5, gt=0)


class RewardFunctionConfig(StrictModel):
    """A Python reward function (lmfleet.posttrain.rewards): `module:function` (importable on every node)
    or `path/to/file.py:function` (read by the driver and sent to the workers)."""

    function: str = Field(..., description="e.g. lmfleet.posttrain.rewards:regex or rewards.py:my_reward")
    weight: float = Field(1.0, description="Its weight in the sum of rewards.")
    args: dict = Field(default_factory=dict, description="Keyword arguments it is called with.")


class RLHyperConfig(StrictModel):
    """What every RL stage's algorithm section (`ppo:`, `grpo:`, `rloo:`) has."""

    rollout_batch: int = Field(16, ge=1, description="Prompts per iteration, over all workers.")
    mini_batch: int = Field(8, ge=1, description="Completions per gradient step, over all workers.")
    epochs: int = Field(1, ge=1, description="Passes over each iteration's completions.")
    clip_range: float = Field(0.2, gt=0, description="The policy ratio is clipped to [1 - clip_range, 1 + ...].")
    kl_coef: float = Field(0.05, ge=0, description="Weight of the KL to the reference (input) policy; 0: no "
                                                   "reference model is loaded.")
    missing_eos_penalty: float | None = Field(None, description="Added to the reward of completions with no EOS.")


class PPOHyperConfig(RLHyperConfig):
    epochs: int = Field(2, ge=1, description="Passes over each iteration's completions.")
    value_clip_range: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_target: float | None = Field(
        None, gt=0, description="Adapt kl_coef so the rollouts' KL tracks this (Ziegler et al. 2019); None: fixed.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL: samples over which kl_coef adapts.")
    whiten_advantages: bool = True


class _GroupHyperConfig(RLHyperConfig):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    clip_range_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher: 0.28); None: "
                                                                  "clip_range.")


class GRPOHyperConfig(_GroupHyperConfig):
    kl_coef: float = Field(0.0, ge=0, description="beta: weight of the per-token k3 KL to the reference in the "
                                                  "loss (TRL's default 0: no reference model).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide each advantage by its group's reward std, the batch's, or nothing (Dr. GRPO).")
    loss_aggregation: Literal["sequence", "token", "constant"] = Field(
        "token", description="sequence: mean of per-sequence token means (GRPO paper); token: mean over all tokens "
                             "(DAPO, TRL's default); constant: sum / (completions x max_new_tokens) (Dr. GRPO).")


class RLOOHyperConfig(_GroupHyperConfig):
    num_generations: int = Field(2, ge=2, description="Completions sampled per prompt (the group).")
    kl_coef: float = Field(0.05, ge=0, description="beta: the sequence's summed log-ratio to the reference, times "
                                                   "beta, is subtracted from its reward (as TRL's RLOOTrainer).")


class SplitPlacementConfig(StrictModel):
    """`placement: split`: the frozen models (reference, reward model and reward functions) run in Ray actors
    of their own, which the training workers send their batches to (worker rank r uses actor r % actors)."""

    actors: int = Field(1, ge=1, description="Actors holding the frozen models.")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="> 0: the actors' models on a GPU (other nodes allowed).")


class RLGenerationConfig(GenerationConfig):
    """Sampling of the RL stages' completions."""

    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the policy's distribution: > 0).")
    engine: Literal["hf"] = Field("hf", description="hf: the policy's transformers generate() in each training "
                                                   "worker (the only engine so far; RLTrainer.generate is the seam).")


class _RLStage(_Stage):
    """`model` is the policy to improve (and its frozen reference); prompts come from `dataset` (prompt,
    SFT or preference records); the reward is the reward model's score times `reward_model_weight` plus
    the weighted reward functions."""


    training: RLTrainingConfig = RLTrainingConfig()
    eval: RLEvalConfig = RLEvalConfig()
    optimizer: RLOptimizerConfig = RLOptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=10)
    reward_model: str | None = Field(None, description="A reward stage (its model/ dir) or a HF sequence-"
                                                       "classification dir.")
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score in the reward.")
    reward_functions: list[RewardFunctionConfig] = Field(default_factory=list)
    iterations: int = Field(20, ge=1, description="Rollout + optimization rounds.")
    generation: RLGenerationConfig = RLGenerationConfig()
    placement: Literal["colocated", "split"] = Field(
        "colocated", description="colocated: every model in every training worker; split: the frozen ones in "
                                 "Ray actors of their own (`split`).")
    split: SplitPlacementConfig = SplitPlacementConfig()

    @property
    def algorithm(self) -> RLHyperConfig:
        return getattr(self, self.KIND)  # its section: ppo, grpo or rloo

    @property
    def group(self) -> int:
        """Completions sampled per prompt."""
        return getattr(self.algorithm, "num_generations", 1)

    def extra_bundles(self) -> list[dict]:
        """Resources the stage needs beyond its training workers (lmfleet.resources checks they fit)."""
        if self.placement != "split":
            return []
        s = self.split
        return [{"CPU": s.cpus_per_actor, **({"GPU": s.gpus_per_actor} if s.gpus_per_actor else {})}] * s.actors

    @model_validator(mode="after")
    def _rl(self):
        # Any record format works: the RL stages take the prompts (and pass the records to reward functions).
        if self.reward_model is None and not self.reward_functions:
            raise ValueError("no reward: set reward_model, reward_functions, or both")
        g = self.generation
        if g.max_new_tokens >= self.training.max_length:
            raise ValueError(f"generation.max_new_tokens {g.max_new_tokens} must be below training.max_length "
                             f"{self.training.max_length} (room for the prompt)")
        if g.top_k or g.top_p < 1:
            # Ratios and KL use the sampling distribution (logits / temperature): it must be the policy's.
            raise ValueError(f"generation: {self.KIND} samples from the policy: temperature > 0, top_k 0, top_p 1")
        a, workers = self.algorithm, self.scaling.bounds[0]
        if a.rollout_batch % workers or a.mini_batch % workers or (a.rollout_batch * self.group) % a.mini_batch:
            raise ValueError(
                f"{self.KIND}: rollout_batch {a.rollout_batch} and mini_batch {a.mini_batch} must divide by "
                f"num_workers {workers}, and mini_batch must divide the completions per iteration "
                f"({a.rollout_batch} x {self.group})")
        return self


class PPOStageConfig(_RLStage):
    """PPO with a value head (GAE advantages), one completion per prompt."""

    KIND: ClassVar[str] = "ppo"
    ppo: PPOHyperConfig = PPOHyperConfig()


class GRPOStageConfig(_RLStage):
    """GRPO: `num_generations` completions per prompt, advantages normalized within each group, no critic."""

    KIND: ClassVar[str] = "grpo"
    grpo: GRPOHyperConfig = GRPOHyperConfig()


class RLOOStageConfig(_RLStage):
    """RLOO: `num_generations` completions per prompt, each one's baseline the mean of the others'."""

    KIND: ClassVar[str] = "rloo"
    rloo: RLOOHyperConfig = RLOOHyperConfig()
