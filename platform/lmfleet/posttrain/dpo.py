"""Direct preference optimization with TRL's DPOTrainer: the alternative to reward model + PPO.

The frozen reference is the input model. Evaluation: the log-probability margin of chosen over
rejected answers on held-out pairs, before and after; with `reward_model`, the reward model's mean
score and win rate of the DPO policy's answers against the input model's, and the KL between them.
"""

from __future__ import annotations

from pathlib import Path

from lmfleet.posttrain.config import DPOStageConfig
from lmfleet.posttrain.preference import PreferenceStage


class DPO(PreferenceStage):
    CONFIG = DPOStageConfig

    @classmethod
    def build_trainer(cls, cfg: DPOStageConfig, inputs, args: dict):
        from trl import DPOConfig, DPOTrainer

        return cls.build(DPOTrainer, DPOConfig, cfg, inputs, args, beta=cfg.beta, loss_type=[cfg.loss_type])

    @classmethod
    def evaluate(cls, cfg: DPOStageConfig, inputs, trained: str) -> dict:
        from lmfleet.posttrain.evaluate import compare_policies, preference_evaluation

        result, before, after, tok, val = preference_evaluation(cfg, inputs, trained)
        if cfg.reward_model is not None and cfg.eval.samples:
            prompts = [r["prompt"] for r in val[: cfg.eval.samples]]
            result.update(compare_policies(after, before, tok, prompts, Path(inputs.local("reward_model")),
                                           cfg.eval.generation, cfg.training.max_length))
        return result

    @classmethod
    def summary(cls, e: dict, report: dict) -> list[str]:
        from lmfleet.posttrain.evaluate import policy_line

        return [*super().summary(e, report), *([policy_line(e)] if "win_rate" in e else [])]
