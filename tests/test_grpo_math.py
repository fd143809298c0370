"""GRPO / RLOO math (lmfleet.posttrain.loss) against hand-computed numbers (no models, no Ray).

Every expected value is written out by hand from the papers' definitions (and TRL's GRPOTrainer /
RLOOTrainer, which lmfleet follows), never produced by the function under test.
"""

import math

import pytest
import torch

from lmfleet.posttrain.loss import (
    aggregate,
    clipped_group_loss,
    group_advantages,
    k3_kl,
    leave_one_out_advantages,
    sequence_clipped_loss,
)
from test_ppo_math import T, close


def test_group_advantages_by_group_std():
    # Two prompts x 3 completions. Group 1: mean 2, Bessel std 1. Group 2: mean 5, std 0 (all equal).
    scores = T([1, 2, 3, 5, 5, 5])
    close(group_advantages(scores, 3, "group", eps=0.0 + 1e-4), [-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0])


def test_group_advantages_batch_std_and_none():
    scores = T([0, 2, 4, 6])  # groups of 2: means 1 and 5
    # none (Dr. GRPO): centred only.
    close(group_advantages(scores, 2, "none"), [-1, 1, -1, 1])
    # batch: the std of all four (Bessel): var = ((9+1+1+9)/3) = 20/3.
    std = math.sqrt(20 / 3)
    close(group_advantages(scores, 2, "batch", eps=0.0), [-1 / std, 1 / std, -1 / std, 1 / std])
    # The std of a batch that spans workers is passed in.
    close(group_advantages(scores, 2, "batch", eps=0.0, batch_std=2.0), [-0.5, 0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="scale"):
        group_advantages(scores, 2, "bogus")


def test_leave_one_out_baseline():
    # Group [1, 2, 6]: baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5. Group [0, 4, 8]: 6, 4, 2.
    close(leave_one_out_advantages(T([1, 2, 6, 0, 4, 8]), 3), [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 6, 4 - 4, 8 - 2])
    # Two completions: each one's baseline is the other's reward.
    close(leave_one_out_advantages(T([3, 1]), 2), [2, -2])
    with pytest.raises(ValueError, match="2 completions"):
        leave_one_out_advantages(T([1.0]), 1)


def test_k3_kl_by_hand():
    # d = ref - logp: 0 -> 0; d = 1 -> e - 2; d = -1 -> e^-1.
    logp, ref = T([[0.0, 0.0, 1.0]]), T([[0.0, 1.0, 0.0]])
    close(k3_kl(logp, ref), [[0.0, math.e - 2, math.exp(-1)]])
    assert bool((k3_kl(torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)) >= 0).all())


def test_aggregations():
    x = T([[1, 2, 3, 4], [10, 0, 0, 0]])
    mask = T([[1, 1, 1, 1], [1, 0, 0, 0]])
    # sequence: mean(2.5, 10); token: (1+2+3+4+10)/5; constant: 20 / (2 * 8).
    assert float(aggregate(x, mask, "sequence")) == pytest.approx(6.25)
    assert float(aggregate(x, mask, "token")) == pytest.approx(4.0)
    assert float(aggregate(x, mask, "constant", max_tokens=8)) == pytest.approx(20 / 16)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, mask, "bogus")


def test_clipped_group_loss_by_hand():
    # One sequence of 3 tokens, advantage +1; ratios e^0 = 1, e^0.5 = 1.6487 (clipped at 1.2 when clip_high
    # 0.2, at 1.28 with clip_high 0.28), e^-0.5 = 0.6065 (below 1 - 0.2 but with A > 0 min() keeps it).
    old = T([[0.0, 0.0, 0.0]])
    new = T([[0.0, 0.5, -0.5]])
    mask = T([[1, 1, 1]])
    adv = T([1.0])
    loss, stats = clipped_group_loss(new, old, adv, mask, 0.2, 0.2, how="token")
    assert float(loss) == pytest.approx(-(1 + 1.2 + math.exp(-0.5)) / 3)
    assert float(stats["clipped"]) == pytest.approx(1 / 3)
    loss_hi, _ = clipped_group_loss(new, old, adv, mask, 0.2, 0.28, how="token")
    assert float(loss_hi) == pytest.approx(-(1 + 1.28 + math.exp(-0.5)) / 3)
    # Negative advantage: -min(-r, -clip(r)) = max(r, clip(r)): 1, e^0.5, 0.8 (the clip binds from below).
    loss_neg, _ = clipped_group_loss(new, old, -adv, mask, 0.2, 0.2, how="token")
    assert float(loss_neg) == pytest.approx((1 + math.exp(0.5) + 0.8) / 3)


def test_clipped_group_loss_with_kl_and_sequence_mean():
    # Two sequences (lengths 2 and 1), ratio 1 everywhere: the surrogate is -A per token.
    lp = T([[0.0, 0.0], [0.0, 0.0]])
    mask = T([[1, 1], [1, 0]])
    ref = T([[1.0, 0.0], [0.0, 0.0]])  # k3 at the first token: e - 2
    loss, stats = clipped_group_loss(lp, lp, T([2.0, -1.0]), mask, 0.2, 0.2, ref_logprobs=ref, beta=0.5,
                                     how="sequence")
    seq1 = ((-2 + 0.5 * (math.e - 2)) + (-2)) / 2
    seq2 = 1.0
    assert float(loss) == pytest.approx((seq1 + seq2) / 2)
    assert float(stats["kl"]) == pytest.approx((math.e - 2) / 3)


def test_sequence_clipped_loss_by_hand():
    # Sequence ratios: exp(0.1 + 0.2) = e^0.3 (clipped to 1.2 with A = +2), exp(-0.1) (A = -1: max(r, 0.8) = r).
    old = T([[0.0, 0.0], [0.0, 0.0]])
    new = T([[0.1, 0.2], [-0.1, 5.0]])  # the 5.0 is padding (masked)
    mask = T([[1, 1], [1, 0]])
    loss, stats = sequence_clipped_loss(new, old, T([2.0, -1.0]), mask, 0.2, 0.2)
    assert float(loss) == pytest.approx((-2 * 1.2 + math.exp(-0.1)) / 2)
    assert float(stats["clipped"]) == pytest.approx(0.5)
