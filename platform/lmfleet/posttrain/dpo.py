"""Direct preference optimization with TRL's DPOTrainer: the alternative to reward model + PPO.

The frozen reference is the input model. Evaluation: the log-probability margin of chosen over
rejected answers on held-out pairs, before and after; with `reward_model`, the reward model's mean
score and win rate of the DPO policy's answers against the input model's, and the KL between them.
"""

from __future__ import annotations

from pathlib import Path

from lmfleet.posttrain.config import DPOStageConfig
from lmfleet.posttrain.hf import (
    peft_config,
    quarantine_long_prompts,
    run_hf_stage,
    split_datasets,
)
from lmfleet.posttrain.inputs import check_dpo
from lmfleet.posttrain.models import input_model, load_tokenizer
from lmfleet.posttrain.records import read_preferences
from lmfleet.uri import local_copy

CONFIG = DPOStageConfig
TRACKED = ("rewards/margins", "rewards/accuracies")


def build_trainer(cfg: DPOStageConfig, paths: dict, args: dict):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(Path(paths["model"]))
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(paths["model"]),
        args=DPOConfig(**args, max_length=cfg.training.max_length, beta=cfg.beta, loss_type=[cfg.loss_type]),
        **split_datasets(paths),
        processing_class=tok,
        peft_config=peft_config(cfg.peft, "CAUSAL_LM"),
    )
    return trainer, tok, "CAUSAL_LM"


def evaluate(cfg: DPOStageConfig, paths: dict) -> dict:
    from lmfleet.posttrain.evaluate import compare_policies, preference_evaluation

    result, before, after, tok, val = preference_evaluation(cfg, paths)
    if cfg.reward_model is not None and cfg.eval.samples:
        prompts = [r["prompt"] for r in val[: cfg.eval.samples]]
        result.update(compare_policies(after, before, tok, prompts, Path(paths["reward_model"]), cfg.eval.generation,
                                       cfg.training.max_length))
    return result


def summary(e: dict, report: dict) -> list[str]:
    from lmfleet.posttrain.evaluate import policy_line, preference_line

    return [preference_line(e), *([policy_line(e)] if "win_rate" in e else [])]


def run_dpo_stage(cfg: DPOStageConfig, ctx) -> dict:
    check_dpo(cfg, run_dir=ctx.run_dir)
    paths = {"model": input_model(cfg.model, ctx.run_dir)}
    with ctx.step("read"):
        records = read_preferences(cfg.dataset, ctx.seed)
        quarantine_long_prompts(records, load_tokenizer(local_copy(paths["model"])), cfg.training.max_length)
    if cfg.reward_model is not None:
        paths["reward_model"] = input_model(cfg.reward_model, ctx.run_dir)
    return run_hf_stage("dpo", cfg, ctx, records, paths)
