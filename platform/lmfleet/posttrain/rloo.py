"""RLOO (Ahmadian et al. 2024, "Back to Basics"), as TRL's RLOOTrainer: no critic. Each prompt gets
`num_generations` sampled completions; a completion's baseline is the mean reward of the others of its
prompt. With kl_coef (beta) > 0, beta times the completion's summed log-ratio to the frozen reference is
subtracted from its reward first. The loss is the clipped surrogate of one importance ratio per
completion (the sequence's), averaged over completions. Math: lmfleet.posttrain.loss; rollout, rewards,
checkpoints, evaluation: lmfleet.posttrain.rl.
"""

from __future__ import annotations

from lmfleet.posttrain.config import RLOOStageConfig
from lmfleet.posttrain.loss import leave_one_out_advantages, sequence_clipped_loss
from lmfleet.posttrain.rl import RLStage, RLTrainer, response_stats


class RLOOTrainer(RLTrainer):

    def advantages(self, batch: dict) -> dict:
        rewards = batch["scores"]
        if "kl" in batch:
            rewards = rewards - self.hp.kl_coef * batch["kl"]
        return {"advantages": leave_one_out_advantages(rewards, self.cfg.group)}

    def loss(self, mb: dict, prompt_len: int):
        h = self.hp
        logprobs, _ = response_stats(self.policy, mb["seq"], mb["attention"], prompt_len, False,
                                     self.cfg.generation.temperature)
        loss, stats = sequence_clipped_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], h.clip_range,
                                            h.clip_range_high or h.clip_range)
        return loss, {"clipfrac": stats["clipped"]}


class RLOO(RLStage):
    CONFIG = RLOOStageConfig
    TRAINER = RLOOTrainer
