"""What the offline preference stages on TRL trainers share (dpo, kto, orpo, simpo): records, evaluation
(the chosen - rejected log-probability margin, before and after) and its summary."""

from __future__ import annotations

from typing import ClassVar

from lmfleet.posttrain.hf import HFStage
from lmfleet.posttrain.records import read_preferences


class PreferenceStage(HFStage):
    TRACKED: ClassVar[tuple[str, ...]] = ("rewards/margins", "rewards/accuracies")  # what TRL logs

    @classmethod
    def read(cls, cfg, seed: int):
        return read_preferences(cfg.dataset, seed)

    @classmethod
    def evaluate(cls, cfg, inputs, trained: str) -> dict:
        from lmfleet.posttrain.evaluate import preference_evaluation

        return preference_evaluation(cfg, inputs, trained)[0]

    @classmethod
    def summary(cls, e: dict, report: dict) -> list[str]:
        from lmfleet.posttrain.evaluate import preference_line

        return [preference_line(e)]
