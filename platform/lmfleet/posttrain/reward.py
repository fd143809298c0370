"""Reward model with TRL's RewardTrainer: a sequence-classification head (one score) on the SFT model,
trained on chosen / rejected pairs (Bradley-Terry loss). Evaluation: pairwise accuracy on held-out pairs."""

from __future__ import annotations

from pathlib import Path

from lmfleet.posttrain.config import RewardStageConfig
from lmfleet.posttrain.evaluate import encode_chat
from lmfleet.posttrain.hf import HFStage
from lmfleet.posttrain.models import load_reward_model
from lmfleet.posttrain.records import read_preferences
from lmfleet.runlog import read_jsonl


class Reward(HFStage):
    CONFIG = RewardStageConfig
    TASK = "SEQ_CLS"

    @classmethod
    def read(cls, cfg: RewardStageConfig, seed: int):
        return read_preferences(cfg.dataset, seed)

    @classmethod
    def quarantine(cls, cfg: RewardStageConfig, records, tokenizer) -> None:
        # TRL's RewardTrainer silently drops pairs longer than max_length: count them here instead.
        n = cfg.training.max_length
        records.quarantine("too_many_tokens", lambda r: any(
            len(encode_chat(tokenizer, r["prompt"], r[k][0]["content"])[0]) > n for k in ("chosen", "rejected")))

    @classmethod
    def build_trainer(cls, cfg: RewardStageConfig, inputs, args: dict):
        from trl import RewardConfig, RewardTrainer

        model, _ = load_reward_model(Path(inputs.model))
        return cls.build(RewardTrainer, RewardConfig, cfg, inputs, args, model=model)

    @classmethod
    def evaluate(cls, cfg: RewardStageConfig, inputs, trained: str) -> dict:
        from lmfleet.posttrain.evaluate import device, pairwise_accuracy

        model, tok = load_reward_model(Path(trained))
        model.to(device(inputs.use_gpu)).eval()
        n = cfg.training.max_length
        return {"train": pairwise_accuracy(model, tok, read_jsonl(inputs.train)[:200], n),
                "val": pairwise_accuracy(model, tok, read_jsonl(inputs.val), n)}

    @classmethod
    def summary(cls, e: dict, report: dict) -> list[str]:
        return [f"pairwise accuracy: {e[s]['accuracy']:.3f} on {e[s]['pairs']} {s} pairs"
                for s in ("train", "val") if e[s]["pairs"]]
