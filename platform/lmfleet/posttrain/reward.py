"""Reward model with TRL's RewardTrainer: a sequence-classification head (one score) on the SFT model,
trained on chosen / rejected pairs (Bradley-Terry loss). Evaluation: pairwise accuracy on held-out pairs."""

from __future__ import annotations

from pathlib import Path

from lmfleet.errors import InputError
from lmfleet.posttrain.config import RewardStageConfig
from lmfleet.posttrain.evaluate import encode_chat
from lmfleet.posttrain.hf import peft_config, read_jsonl, run_hf_stage, split_datasets
from lmfleet.posttrain.inputs import check_reward
from lmfleet.posttrain.models import input_model, load_reward_model, load_tokenizer
from lmfleet.posttrain.records import read_preferences
from lmfleet.uri import local_copy

CONFIG = RewardStageConfig


def build_trainer(cfg: RewardStageConfig, paths: dict, args: dict):
    from trl import RewardConfig, RewardTrainer

    model, tok = load_reward_model(Path(paths["model"]))
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**args, max_length=cfg.training.max_length),
        **split_datasets(paths),
        processing_class=tok,
        peft_config=peft_config(cfg.peft, "SEQ_CLS"),
    )
    return trainer, tok, "SEQ_CLS"


def evaluate(cfg: RewardStageConfig, paths: dict) -> dict:
    from lmfleet.posttrain.evaluate import device, pairwise_accuracy

    model, tok = load_reward_model(Path(paths["trained"]))
    model.to(device(paths["use_gpu"])).eval()
    n = cfg.training.max_length
    return {"train": pairwise_accuracy(model, tok, read_jsonl(paths["train"])[:200], n),
            "val": pairwise_accuracy(model, tok, read_jsonl(paths["val"]), n)}


def summary(e: dict, report: dict) -> list[str]:
    return [f"pairwise accuracy: {e[s]['accuracy']:.3f} on {e[s]['pairs']} {s} pairs"
            for s in ("train", "val") if e[s]["pairs"]]


def run_reward_stage(cfg: RewardStageConfig, ctx) -> dict:
    check_reward(cfg, run_dir=ctx.run_dir)
    path = input_model(cfg.model, ctx.run_dir)
    with ctx.step("read"):
        records = read_preferences(cfg.dataset, ctx.seed)
        # TRL's RewardTrainer silently drops pairs longer than max_length: count them here instead.
        tok, n = load_tokenizer(local_copy(path)), cfg.training.max_length
        records.quarantine("too_many_tokens", lambda r: any(
            len(encode_chat(tok, r["prompt"], r[k][0]["content"])[0]) > n for k in ("chosen", "rejected")))
    if not records.train:
        raise InputError(f"reward.dataset: no pairs left to train on ({records.counts()}); "
                         f"raise training.max_length ({n}) or check the records")
    return run_hf_stage("reward", cfg, ctx, records, {"model": path})
