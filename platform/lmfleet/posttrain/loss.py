"""The RL stages' math (OpenRLHF's models/loss.py): pure functions on [batch, response_len] tensors, where
`mask` marks real response tokens. Tested against hand-computed numbers (tests/test_ppo_math.py,
tests/test_grpo_math.py); the trainers (lmfleet.posttrain.rl) only move tensors in and out.
"""

from __future__ import annotations

import torch

# -- PPO (and shared): masked statistics, GAE, clipped policy and value losses, adaptive KL --


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); zeros outside the mask."""
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (log pi - log ref) at every token, plus the score at the last one."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = mask.sum(dim=1).long() - 1
    rows = torch.arange(len(scores))
    rewards[rows, last.clamp(min=0)] += scores * (last >= 0)
    return rewards


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016); the value after the last token is 0."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m  # padding after the response has no value
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (negated, to minimize) and the fraction of clipped tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2), masked mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKL:
    """kl_coef follows the rollouts' KL towards a target (Ziegler et al. 2019), or stays fixed."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, samples: int) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * samples / self.horizon


# -- critic-free RL (GRPO, RLOO): scores of G completions per prompt, laid out prompt by prompt --


def group_advantages(scores: torch.Tensor, group: int, scale: str = "group", eps: float = 1e-4,
                     batch_std: float | None = None) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each score minus its prompt group's mean, divided by the group's standard
    deviation (Bessel-corrected, as TRL's GRPOTrainer; `scale: batch` divides by the whole batch's,
    `batch_std` when the batch spans workers, `none` does not divide: Dr. GRPO, Liu et al. 2025).
    `scores`: [prompts * group], the completions of each prompt next to each other."""
    grouped = scores.view(-1, group)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = (scores.std() if batch_std is None else torch.tensor(batch_std, dtype=scores.dtype)).expand_as(scores)
    else:
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    return centred / (std + eps)


def leave_one_out_advantages(scores: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each score minus the mean of the other completions of its prompt."""
    if group < 2:
        raise ValueError("the leave-one-out baseline needs 2 completions per prompt or more")
    grouped = scores.view(-1, group)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group - 1)
    return (grouped - others).reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - log pi) - (ref - log pi) - 1 (Schulman's k3: unbiased,
    never negative), as GRPO adds it to the loss."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None) -> torch.Tensor:
    """One loss from per-token losses [batch, len]: `sequence` = mean over sequences of each one's token
    mean (GRPO's paper; short answers weigh more per token), `token` = mean over every token of the batch
    (DAPO), `constant` = sum / (batch * max_tokens) (Dr. GRPO: no length bias either way)."""
    if how == "sequence":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if how == "token":
        return masked_mean(per_token, mask)
    if how == "constant":
        return (per_token * mask).sum() / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    raise ValueError(f"aggregation must be sequence, token or constant, not {how!r}")


def clipped_group_loss(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float,
                       ref_logprobs=None, beta: float = 0.0, how: str = "sequence",
                       max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO / RLOO policy loss: the clipped surrogate with one advantage per sequence ([batch]),
    ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO's asymmetric clip when they differ), plus
    beta * k3 KL to the reference per token; aggregated by `how`. Also: clipped fraction, mean KL."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.min(unclipped, clipped)
    stats = {"clipped": masked_mean((clipped < unclipped).float(), mask)}
    if beta:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl, mask)
    return aggregate(per_token, mask, how, max_tokens), stats


def sequence_clipped_loss(logprobs, old_logprobs, advantages, mask, clip_low: float,
                          clip_high: float) -> tuple[torch.Tensor, dict]:
    """RLOO's policy loss (as TRL's RLOOTrainer): one importance ratio per sequence, exp(sum_t log pi -
    sum_t log pi_old), clipped to [1 - clip_low, 1 + clip_high]; the mean over sequences of the negated
    clipped surrogate. Also: the fraction of clipped sequences."""
    ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(dim=1))
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return -torch.min(unclipped, clipped).mean(), {"clipped": (clipped < unclipped).float().mean()}
