"""PPO math of the PPO stage against hand-computed numbers (no models, no Ray).

Every expected value below is written out by hand (or by a small pure-Python loop that follows the
textbook definition), never produced by the function under test.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from lmfleet.posttrain.loss import (
    AdaptiveKL,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)
from lmfleet.posttrain.rl import response_stats, token_logprobs


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), T(expected), atol=tol, rtol=tol)


# -- masked mean / whitening --


def test_masked_mean():
    x, mask = T([[1, 2, 3], [4, 5, 6]]), T([[1, 1, 0], [1, 0, 0]])
    assert float(masked_mean(x, mask)) == pytest.approx(7 / 3)
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0


def test_masked_whiten_hand_numbers():
    # Masked entries 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3.
    x, mask = T([[1, 2, 3], [4, 99, -99]]), T([[1, 1, 1], [1, 0, 0]])
    s = math.sqrt(3 / 5)  # 1 / std
    close(masked_whiten(x, mask), [[-1.5 * s, -0.5 * s, 0.5 * s], [1.5 * s, 0, 0]])


def test_masked_whiten_moments():
    torch.manual_seed(0)
    x = 3 + 5 * torch.randn(4, 7, dtype=torch.float64)
    mask = (torch.arange(7) < torch.tensor([[7], [5], [2], [6]])).double()
    w = masked_whiten(x, mask)
    real = w[mask.bool()]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(real.std(unbiased=True)) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[~mask.bool()] == 0)


# -- GAE --

GAMMA, LAM = 0.9, 0.8  # gamma * lam = 0.72


def test_gae_hand_numbers_with_padding():
    rewards = T([[1.0, 0.0, -1.0, 2.0], [0.5, 3.0, 100.0, 100.0]])
    values = T([[0.5, 1.0, 1.5, -0.5], [2.0, 1.0, 50.0, 50.0]])  # junk on row 1's padding
    mask = T([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    # Row 0, delta_t = r_t + 0.9 V_{t+1} - V_t (V_4 = 0), A_t = delta_t + 0.72 A_{t+1}:
    #   t=3: delta = 2 - (-0.5) = 2.5                      A = 2.5
    #   t=2: delta = -1 + 0.9 * -0.5 - 1.5 = -2.95         A = -2.95 + 0.72 * 2.5 = -1.15
    #   t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35            A = 0.35 + 0.72 * -1.15 = -0.478
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4             A = 1.4 + 0.72 * -0.478 = 1.05584
    # Row 1 ends at t=1, so the value after it is 0 (not the padding's 50):
    #   t=1: delta = 3 + 0 - 1 = 2                         A = 2
    #   t=0: delta = 0.5 + 0.9 * 1 - 2 = -0.6              A = -0.6 + 0.72 * 2 = 0.84
    close(adv, [[1.05584, -0.478, -1.15, 2.5], [0.84, 2.0, 0.0, 0.0]])
    close(ret, [[1.55584, 0.522, 0.35, 2.0], [2.84, 3.0, 0.0, 0.0]])  # A + V on real tokens, 0 on padding


def test_gae_matches_discounted_sum_of_deltas():
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the real tokens (the closed form, not the recursion)."""
    torch.manual_seed(1)
    rewards, values = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lengths = [5, 3, 1]
    mask = T([[1.0 if t < n else 0.0 for t in range(5)] for n in lengths])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    r, v = rewards.tolist(), values.tolist()
    expected_adv, expected_ret = [], []
    for b, n in enumerate(lengths):
        vs = v[b][:n] + [0.0]
        deltas = [r[b][t] + GAMMA * vs[t + 1] - vs[t] for t in range(n)]
        a = [sum((GAMMA * LAM) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
        expected_adv.append(a + [0.0] * (5 - n))
        expected_ret.append([a[t] + v[b][t] for t in range(n)] + [0.0] * (5 - n))
    close(adv, expected_adv)
    close(ret, expected_ret)


# -- clipped policy loss (clip 0.2) --


@pytest.mark.parametrize("ratio, adv, loss, clipped", [
    (1.1, 2.0, -2.2, 0.0),   # inside [0.8, 1.2]: -A r
    (1.5, 1.0, -1.2, 1.0),   # above 1 + eps, A > 0: clipped to -A (1 + eps)
    (0.5, -1.0, 0.8, 1.0),   # below 1 - eps, A < 0: clipped to -A (1 - eps)
    (1.5, -1.0, 1.5, 0.0),   # above 1 + eps, A < 0: unclipped (the pessimistic term)
    (0.5, 1.0, -0.5, 0.0),   # below 1 - eps, A > 0: unclipped
])
def test_policy_loss_cases(ratio, adv, loss, clipped):
    old = T([[-1.0]])
    pg, clipfrac = policy_loss(old + math.log(ratio), old, T([[adv]]), T([[1.0]]), clip=0.2)
    assert float(pg) == pytest.approx(loss)
    assert float(clipfrac) == clipped


def test_policy_loss_masked_batch():
    ratios = T([[1.1, 1.5, 0.5], [1.5, 0.5, 3.0]])  # the five cases above; the 3.0 is padding
    adv = T([[2.0, 1.0, -1.0], [-1.0, 1.0, 5.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    old = T([[-0.5, -1.0, -2.0], [-0.1, -3.0, -1.0]])
    pg, clipfrac = policy_loss(old + ratios.log(), old, adv, mask, clip=0.2)
    assert float(pg) == pytest.approx((-2.2 - 1.2 + 0.8 + 1.5 - 0.5) / 5)  # -0.32
    assert float(clipfrac) == pytest.approx(2 / 5)


# -- clipped value loss (clip 0.2) --


@pytest.mark.parametrize("v, old, ret, loss", [
    (2.0, 1.0, 2.0, 0.5 * 0.64),  # (v - R)^2 = 0 < (1.2 - 2)^2 = 0.64: the clipped term wins
    (2.0, 1.0, 0.0, 0.5 * 4.0),   # (v - R)^2 = 4 > 1.2^2 = 1.44: the unclipped term wins
    (1.1, 1.0, 0.5, 0.5 * 0.36),  # inside old +- 0.2: both are 0.6^2
    (0.5, 1.0, 0.4, 0.5 * 0.16),  # 0.1^2 < (0.8 - 0.4)^2 = 0.16: clipped from below wins
])
def test_value_loss_cases(v, old, ret, loss):
    assert float(value_loss(T([[v]]), T([[old]]), T([[ret]]), T([[1.0]]), clip=0.2)) == pytest.approx(loss)


def test_value_loss_masked_batch():
    values, old = T([[2.0, 2.0, 1.1], [0.5, 9.0, 9.0]]), T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    returns, mask = T([[2.0, 0.0, 0.5], [0.4, -9.0, -9.0]]), T([[1, 1, 1], [1, 0, 0]])
    assert float(value_loss(values, old, returns, mask, clip=0.2)) == pytest.approx(0.5 * 5.16 / 4)


# -- per-token KL penalty shaping --


def test_shaped_rewards():
    logp = T([[-1.0, -2.0, -0.5], [-0.3, -0.2, -1.5]])
    ref = T([[-1.5, -1.0, -9.0], [-0.1, -0.7, -1.0]])
    mask = T([[1, 1, 0], [1, 1, 1]])  # row 0 ends at t=1, row 1 at t=2
    rewards = shaped_rewards(logp, ref, T([2.0, -1.0]), mask, kl_coef=0.1)
    # row 0: logp - ref = [0.5, -1.0] -> -0.1 * that = [-0.05, 0.1]; + score 2 at t=1
    # row 1: logp - ref = [-0.2, 0.5, -0.5] -> [0.02, -0.05, 0.05]; + score -1 at t=2
    close(rewards, [[-0.05, 2.1, 0.0], [0.02, -0.05, -0.95]])


# -- adaptive KL coefficient (Ziegler et al.): coef *= 1 + clip(kl / target - 1, +-0.2) * n / horizon --


def test_adaptive_kl_fixed_without_target():
    kl = AdaptiveKL(0.1, None, 100)
    kl.update(kl=50.0, samples=64)
    assert kl.coef == 0.1


@pytest.mark.parametrize("observed, coef", [
    (6.6, 0.2 * 1.05),   # error 0.1 -> 1 + 0.1 * 50 / 100
    (12.0, 0.2 * 1.1),   # error 1.0 clipped to 0.2
    (5.4, 0.2 * 0.95),   # error -0.1
    (0.0, 0.2 * 0.9),    # error -1.0 clipped to -0.2
    (6.0, 0.2),          # on target
])
def test_adaptive_kl_update(observed, coef):
    kl = AdaptiveKL(0.2, target=6.0, horizon=100)
    kl.update(observed, samples=50)
    assert kl.coef == pytest.approx(coef)


def test_adaptive_kl_compounds():
    kl = AdaptiveKL(0.2, target=6.0, horizon=100)
    kl.update(12.0, samples=50)
    kl.update(12.0, samples=50)
    assert kl.coef == pytest.approx(0.2 * 1.1 * 1.1)


# -- log-probs of the sampled tokens --


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2)]]])
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    close(token_logprobs(logits, torch.tensor([[2, 0]])), [[3 - lse0, math.log(1 / 4)]])
    assert token_logprobs(logits.bfloat16(), torch.tensor([[2, 0]])).dtype == torch.float32


def test_response_stats_aligns_logits_with_next_token():
    torch.manual_seed(2)
    batch, length, vocab, prompt_len = 2, 5, 4, 3
    logits = torch.randn(batch, length, vocab)
    seq = torch.randint(0, vocab, (batch, length))
    values = torch.tensor([[0.0, 1, 2, 3, 4], [100, 101, 102, 103, 104]])
    attention = torch.ones(batch, length, dtype=torch.long)
    with_values = lambda ids, att, position_ids: (logits, values)  # noqa: E731  (a PolicyWithValue stand-in)
    plain = lambda input_ids, attention_mask, position_ids: SimpleNamespace(logits=logits)  # noqa: E731
    # Response token at position p (p >= prompt_len) is predicted by the logits at p - 1.
    expected = [[logits[b, p - 1, seq[b, p]].item() - math.log(sum(math.exp(z) for z in logits[b, p - 1].tolist()))
                 for p in range(prompt_len, length)] for b in range(batch)]
    lp, v = response_stats(with_values, seq, attention, prompt_len, with_values=True)
    close(lp, expected, tol=1e-5)
    close(v, [[2, 3], [102, 103]])
    lp, v = response_stats(plain, seq, attention, prompt_len, with_values=False)
    close(lp, expected, tol=1e-5)
    assert v is None
    # Sampling at temperature T draws from softmax(logits / T): the log-probs PPO uses are those.
    lp, _ = response_stats(plain, seq, attention, prompt_len, with_values=False, temperature=2.0)
    scaled = [[logits[b, p - 1, seq[b, p]].item() / 2 - math.log(sum(math.exp(z / 2) for z in logits[b, p - 1].tolist()))
               for p in range(prompt_len, length)] for b in range(batch)]
    close(lp, scaled, tol=1e-5)
