"""GRPO (Shao et al. 2024, DeepSeekMath; the RL of DeepSeek-R1): no critic. Each prompt gets
`num_generations` sampled completions; a completion's advantage is its reward minus its group's mean,
divided by the group's std (`scale_rewards`), the same for all its tokens. The loss is PPO's clipped
surrogate per token (DAPO's asymmetric clip with clip_range_high), plus kl_coef (beta) times the k3 KL
to the frozen reference per token, aggregated per `loss_aggregation`. Math: lmfleet.posttrain.loss;
rollout, rewards, checkpoints, evaluation: lmfleet.posttrain.rl.
"""

from __future__ import annotations

from lmfleet.posttrain.config import GRPOStageConfig
from lmfleet.posttrain.loss import clipped_group_loss, group_advantages
from lmfleet.posttrain.rl import RLStage, RLTrainer, response_stats


class GRPOTrainer(RLTrainer):

    def advantages(self, batch: dict) -> dict:
        scores, batch_std = batch["scores"], None
        if self.hp.scale_rewards == "batch":  # the std of the whole iteration's rewards, over all workers
            n, total, squares = self.all_sum([float(len(scores)), scores.sum(), (scores.double() ** 2).sum()])
            batch_std = max((squares - total * total / n) / max(n - 1, 1), 0.0) ** 0.5
        return {"advantages": group_advantages(scores, self.cfg.group, self.hp.scale_rewards, batch_std=batch_std)}

    def loss(self, mb: dict, prompt_len: int):
        h = self.hp
        logprobs, _ = response_stats(self.policy, mb["seq"], mb["attention"], prompt_len, False,
                                     self.cfg.generation.temperature)
        loss, stats = clipped_group_loss(
            logprobs, mb["logprobs"], mb["advantages"], mb["mask"], h.clip_range, h.clip_range_high or h.clip_range,
            ref_logprobs=mb.get("ref_logprobs"), beta=h.kl_coef, how=h.loss_aggregation,
            max_tokens=self.cfg.generation.max_new_tokens)
        return loss, {"clipfrac": stats["clipped"], **({"k3_kl": stats["kl"]} if "kl" in stats else {})}


class GRPO(RLStage):
    CONFIG = GRPOStageConfig
    TRAINER = GRPOTrainer
