"""SimPO (Meng et al. 2024) with TRL's CPOTrainer, loss_type simpo (trl.experimental in TRL 1.16): the
implicit reward is beta x the length-normalized log-probability of an answer, pushed past a target
margin gamma between chosen and rejected; no reference model. `sft_weight` (CPO's alpha) adds an SFT
loss on the chosen answer. Evaluation: the chosen - rejected log-probability margin on held-out pairs."""

from __future__ import annotations

from lmfleet.posttrain.config import SimPOStageConfig
from lmfleet.posttrain.preference import TRACKED, build, evaluate, run_preference_stage, summary
from lmfleet.posttrain.records import read_preferences

CONFIG = SimPOStageConfig
__all__ = ["CONFIG", "TRACKED", "build_trainer", "evaluate", "run_simpo_stage", "summary"]


def build_trainer(cfg: SimPOStageConfig, paths: dict, args: dict):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return build(CPOTrainer, CPOConfig, cfg, paths, args, loss_type="simpo", beta=cfg.beta,
                 simpo_gamma=cfg.gamma, cpo_alpha=cfg.sft_weight)


def run_simpo_stage(cfg: SimPOStageConfig, ctx) -> dict:
    return run_preference_stage("simpo", cfg, ctx, read_preferences)
