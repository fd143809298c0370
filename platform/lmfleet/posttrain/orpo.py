"""ORPO (Hong et al. 2024) with TRL's ORPOTrainer (trl.experimental in TRL 1.16): the SFT loss on the
chosen answer plus beta x the log odds ratio of chosen over rejected; no reference model, so it can
start from a base model. Evaluation: the chosen - rejected log-probability margin on held-out pairs."""

from __future__ import annotations

from lmfleet.posttrain.config import ORPOStageConfig
from lmfleet.posttrain.preference import TRACKED, build, evaluate, run_preference_stage, summary
from lmfleet.posttrain.records import read_preferences

CONFIG = ORPOStageConfig
__all__ = ["CONFIG", "TRACKED", "build_trainer", "evaluate", "run_orpo_stage", "summary"]


def build_trainer(cfg: ORPOStageConfig, paths: dict, args: dict):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return build(ORPOTrainer, ORPOConfig, cfg, paths, args, beta=cfg.beta)


def run_orpo_stage(cfg: ORPOStageConfig, ctx) -> dict:
    return run_preference_stage("orpo", cfg, ctx, read_preferences)
