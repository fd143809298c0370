"""SimPO (Meng et al. 2024) with TRL's CPOTrainer, loss_type simpo (trl.experimental in TRL 1.16): the
implicit reward is beta x the length-normalized log-probability of an answer, pushed past a target
margin gamma between chosen and rejected; no reference model. `sft_weight` (CPO's alpha) adds an SFT
loss on the chosen answer. Evaluation: the chosen - rejected log-probability margin on held-out pairs."""

from __future__ import annotations

from lmfleet.posttrain.config import SimPOStageConfig
from lmfleet.posttrain.preference import PreferenceStage


class SimPO(PreferenceStage):
    CONFIG = SimPOStageConfig

    @classmethod
    def build_trainer(cls, cfg: SimPOStageConfig, inputs, args: dict):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return cls.build(CPOTrainer, CPOConfig, cfg, inputs, args, loss_type="simpo", beta=cfg.beta,
                         simpo_gamma=cfg.gamma, cpo_alpha=cfg.sft_weight)
