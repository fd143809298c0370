"""KTO (Ethayarajh et al. 2024) with TRL's KTOTrainer: a prospect-theory loss on single completions
labelled desirable or not, against the frozen input model. Reads unpaired `{prompt, completion, label}`
records, or preference pairs (TRL unpairs them: chosen desirable, rejected undesirable). Evaluation:
the log-probability margin of desirable over undesirable (chosen over rejected) held-out completions."""

from __future__ import annotations

from lmfleet.posttrain.config import PREFERENCE_FORMATS, KTOStageConfig
from lmfleet.posttrain.preference import PreferenceStage
from lmfleet.posttrain.records import read_preferences, read_unpaired


class KTO(PreferenceStage):
    CONFIG = KTOStageConfig

    @classmethod
    def read(cls, cfg: KTOStageConfig, seed: int):
        """Pairs or unpaired records (`auto`: whichever way keeps more of them; one kind per stage, as TRL
        needs)."""
        dataset = cfg.dataset
        if dataset.format == "unpaired":
            return read_unpaired(dataset, seed)
        if dataset.format in PREFERENCE_FORMATS:
            return read_preferences(dataset, seed)
        return max((read_unpaired(dataset, seed), read_preferences(dataset, seed)), key=lambda r: r.counts()["kept"])

    @classmethod
    def build_trainer(cls, cfg: KTOStageConfig, inputs, args: dict):
        from trl import KTOConfig, KTOTrainer

        return cls.build(KTOTrainer, KTOConfig, cfg, inputs, args, beta=cfg.beta,
                         desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
