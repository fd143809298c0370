"""Configs of the post-training stages: `sft`, `reward`, `ppo`, `dpo`, `distill`.

Each stage reads a model (a stage name of this run, whose `model/` dir it takes, or a path to a HF
model dir) and a dataset of records in a format users have, and writes `model/` for the next stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmfleet.config import StrictModel
from lmfleet.train.config import ScalingConfig
from lmfleet.tune.config import PBTConfig, TuneConfig

SFT_FORMATS = ("alpaca", "messages", "python_functions")
PREFERENCE_FORMATS = ("hh", "conversations", "pairs", "python_functions")


class DatasetConfig(StrictModel):
    """Records for a post-training stage.

    SFT formats: `alpaca` ({instruction, input, output}), `messages` ({messages: [{role, content}]} or
    ShareGPT {conversations: [{from, value}]}). Preference formats: `hh` (Anthropic HH {chosen, rejected}
    transcripts), `conversations` ({conversations, chosen: {from, value}, rejected: {...}}), `pairs`
    ({prompt, chosen, rejected} strings). `python_functions` builds either kind offline from Python
    source (default: the standard library): signature -> docstring, a mismatched docstring rejected.
    `auto` picks the format from each record's keys.
    """

    paths: list[str] = Field(default_factory=list, description="Files (.json/.jsonl/.jsonl.gz), dirs or globs.")
    format: Literal["auto", "alpaca", "messages", "hh", "conversations", "pairs", "python_functions"] = "auto"
    max_records: int | None = Field(None, ge=1, description="Keep a seeded sample of N valid records.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Held out by a seeded hash of each prompt.")
    max_chars: int = Field(16000, ge=1, description="Longer records are quarantined (reason too_long).")
    system_prompt: str | None = Field(None, description="Prepended as a system message to every prompt.")

    @model_validator(mode="after")
    def _paths(self):
        if self.format != "python_functions" and not self.paths:
            raise ValueError(f"format {self.format!r} needs paths (only python_functions has a default)")
        return self


class TrainingConfig(StrictModel):
    """Optimization settings shared by the HF-Trainer stages (TRL's configs get these fields)."""

    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    per_device_batch: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8, description="Tokens per sequence; longer ones are truncated.")
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1, description="Checkpoint (reported to Ray Train) every N optimizer steps.")
    keep_last: int = Field(2, ge=1)
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field("ddp", description="How workers share the model.")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (last checkpoint).")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    activation_checkpointing: bool = False
    bf16: bool | None = Field(None, description="None: on when training on GPUs.")


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
    samples: int = Field(32, ge=0, description="Held-out prompts to generate from (BLEU/ROUGE, reward, win rate).")
    generation: GenerationConfig = GenerationConfig(temperature=0.0)


class _Stage(StrictModel):
    model: str = Field(..., description="Input model: a stage name of this run (its model/ dir) or a HF model dir.")
    dataset: DatasetConfig
    training: TrainingConfig = TrainingConfig()
    scaling: ScalingConfig = ScalingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _fixed_workers(self):
        lo, hi = self.scaling.bounds
        if lo != hi:
            raise ValueError("scaling.num_workers: post-training stages run on a fixed worker count")
        if self.eval.generation.max_new_tokens >= self.training.max_length:
            raise ValueError(f"eval.generation.max_new_tokens {self.eval.generation.max_new_tokens} must be below "
                             f"training.max_length {self.training.max_length} (room for the prompt)")
        return self


class SFTStageConfig(_Stage):
    peft: PeftConfig | None = None
    chat_template: str | None = Field(None, description="Jinja chat template; None: the model's, else lmfleet's.")
    completion_only: bool = Field(True, description="Loss on assistant tokens only (prompt tokens masked).")
    packing: bool = False
    tune: TuneConfig | None = Field(None, description="A hyperparameter search over this config (lmfleet.tune).")

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
        if isinstance(t.scheduler, PBTConfig) and t.scheduler.perturbation_interval % self.training.save_steps:
            raise ValueError(f"tune.scheduler.perturbation_interval {t.scheduler.perturbation_interval} must be a "
                             f"multiple of training.save_steps {self.training.save_steps} (PBT exploits checkpoints)")
        t.check_pbt_keys(("peft.", "model"), allowed=("peft.dropout", "peft.alpha"))
        t.check_against(self)
        return self


class _PreferenceStage(_Stage):
    @model_validator(mode="after")
    def _format(self):
        if self.dataset.format not in (*PREFERENCE_FORMATS, "auto"):
            raise ValueError(
                f"dataset.format {self.dataset.format!r} is not a preference format ({', '.join(PREFERENCE_FORMATS)})"
            )
        return self


class RewardStageConfig(_PreferenceStage):
    peft: PeftConfig | None = None

    @model_validator(mode="after")
    def _mergeable(self):
        if self.peft is not None and self.peft.method not in ("lora", "ia3"):
            raise ValueError(f"peft.method {self.peft.method!r}: a reward model needs weights the next stages "
                             "load as a classifier: use lora or ia3 (merged on export)")
        return self


class DPOStageConfig(_PreferenceStage):
    peft: PeftConfig | None = None
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    reward_model: str | None = Field(None, description="Optional: score DPO vs its input model with this RM.")


class StudentConfig(StrictModel):
    """A student of the teacher's architecture: the teacher's config with these sizes overridden."""

    n_layers: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=8)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    ffn_dim: int | None = Field(None, ge=8)


class DistillStageConfig(_Stage):
    """`model` is the teacher. The student is `student_model` (a HF dir / stage) or built from `student`."""

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
        if self.training.strategy == "deepspeed" and self.training.zero_stage == 3:
            # ZeRO-3 would partition the teacher too, outside any engine.
            raise ValueError("distill: the teacher is replicated per worker; use zero_stage <= 2, fsdp or ddp")
        return self


class PPOHyperConfig(StrictModel):
    rollout_batch: int = Field(16, ge=1, description="Prompts per rollout, over all workers.")
    mini_batch: int = Field(8, ge=1, description="Samples per PPO gradient step, over all workers.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty to the reference (SFT) policy.")
    kl_target: float | None = Field(
        None, gt=0, description="Adapt kl_coef so the rollouts' KL tracks this (Ziegler et al. 2019); None: fixed.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL: samples over which kl_coef adapts.")
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = Field(None, description="Added to the score of responses with no EOS.")


class PPOStageConfig(_Stage):
    """`model` is the policy to improve (the SFT model); prompts come from `dataset` (SFT or preference
    records). Of `training`, PPO uses learning_rate, weight_decay, max_grad_norm, max_length, keep_last,
    max_failures (its schedule is `iterations` x `ppo`)."""

    reward_model: str = Field(..., description="The reward stage (its model/ dir) or a HF sequence-classification dir.")
    iterations: int = Field(20, ge=1, description="Rollout + optimization rounds.")
    ppo: PPOHyperConfig = PPOHyperConfig()
    generation: GenerationConfig = GenerationConfig()
    checkpoint_every: int = Field(10, ge=1, description="Iterations between checkpoints.")

    @model_validator(mode="after")
    def _batches(self):
        # Any record format works: PPO only takes the prompts.
        if self.training.strategy != "ddp":
            raise ValueError("training.strategy: PPO replicates its four models per worker (ddp only)")
        g = self.generation
        if g.max_new_tokens >= self.training.max_length:
            raise ValueError(f"generation.max_new_tokens {g.max_new_tokens} must be below training.max_length "
                             f"{self.training.max_length} (room for the prompt)")
        if g.temperature == 0 or g.top_k or g.top_p < 1:
            # PPO's ratios and KL use the sampling distribution (logits / temperature): it must be the policy's.
            raise ValueError("generation: PPO samples from the policy: temperature > 0, top_k 0, top_p 1")
        p = self.ppo
        lo, _ = self.scaling.bounds
        if p.rollout_batch % lo or p.mini_batch % lo or p.rollout_batch % p.mini_batch:
            raise ValueError(
                f"ppo: rollout_batch {p.rollout_batch} and mini_batch {p.mini_batch} must divide by num_workers "
                f"{lo}, and mini_batch must divide rollout_batch"
            )
        return self
