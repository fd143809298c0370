"""ORPO (Hong et al. 2024) with TRL's ORPOTrainer (trl.experimental in TRL 1.16): the SFT loss on the
chosen answer plus beta x the log odds ratio of chosen over rejected; no reference model, so it can
start from a base model. Evaluation: the chosen - rejected log-probability margin on held-out pairs."""

from __future__ import annotations

from lmfleet.posttrain.config import ORPOStageConfig
from lmfleet.posttrain.preference import PreferenceStage


class ORPO(PreferenceStage):
    CONFIG = ORPOStageConfig

    @classmethod
    def build_trainer(cls, cfg: ORPOStageConfig, inputs, args: dict):
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return cls.build(ORPOTrainer, ORPOConfig, cfg, inputs, args, beta=cfg.beta)
