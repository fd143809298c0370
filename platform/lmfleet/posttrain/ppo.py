"""PPO for RLHF (InstructGPT, Ouyang et al. 2022), our own: TRL no longer ships a PPOTrainer.

The policy (the input model) carries a value head on its last hidden state (trained with it); the
frozen reference copy gives a per-token KL penalty; the reward (a reward model's score and / or reward
functions) comes at the last token. Every iteration: sample one response per prompt for `rollout_batch`
prompts, score them, shape per-token rewards (score at the last token minus kl_coef * (log pi - log ref)
at every token), GAE advantages (whitened over each worker's share) and returns, then `epochs` passes of
clipped policy + clipped value loss. The rollout, checkpoints and evaluation: lmfleet.posttrain.rl.
"""

from __future__ import annotations

from lmfleet.posttrain.config import PPOStageConfig
from lmfleet.posttrain.loss import (
    AdaptiveKL,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)
from lmfleet.posttrain.rl import RLStage, RLTrainer, response_stats


class PPOTrainer(RLTrainer):
    value_head = True

    def __init__(self, cfg: PPOStageConfig, inputs, seed: int):
        super().__init__(cfg, inputs, seed)
        self.kl = AdaptiveKL(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)

    @classmethod
    def uses_reference(cls, hp) -> bool:
        return hp.kl_coef > 0 or hp.kl_target is not None

    def advantages(self, batch: dict) -> dict:
        p, mask = self.hp, batch["mask"]
        ref = batch.get("ref_logprobs", batch["logprobs"])
        rewards = shaped_rewards(batch["logprobs"], ref, batch["scores"], mask, self.kl.coef)
        advantages, returns = gae(rewards, batch["values"], mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return {"advantages": advantages, "returns": returns}

    def loss(self, mb: dict, prompt_len: int):
        p = self.hp
        logprobs, values = response_stats(self.policy, mb["seq"], mb["attention"], prompt_len, True,
                                          self.cfg.generation.temperature)
        pg, clipfrac = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], p.clip_range)
        vf = value_loss(values, mb["values"], mb["returns"], mb["mask"], p.value_clip_range)
        return pg + p.vf_coef * vf, {
            "policy_loss": pg, "value_loss": vf, "clipfrac": clipfrac,
            "approx_kl": masked_mean(0.5 * (logprobs - mb["logprobs"]) ** 2, mb["mask"])}

    def state(self) -> dict:
        return {"kl_coef": self.kl.coef}

    def load_state(self, state: dict) -> None:
        self.kl.coef = state["kl_coef"]

    def after_iteration(self, rollout: dict) -> None:
        if "kl" in rollout:
            self.kl.update(rollout["kl"], self.hp.rollout_batch)


class PPO(RLStage):
    CONFIG = PPOStageConfig
    TRAINER = PPOTrainer
