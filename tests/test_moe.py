"""Mixture of Experts: routing and capacity on hand-made logits, the auxiliary losses by hand, the
load-balancing loss doing its job, and the HF Mixtral export."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmfleet.model import ModelConfig, Transformer
from lmfleet.model.export import export_model, load_model
from lmfleet.model.moe import balance_loss, moe_layers, route, set_micro_batches, take_stats, z_loss

L = torch.log  # logits whose softmax is the given probabilities


def test_top2_routing_renormalizes_the_gates():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    r = route(L(probs), top_k=2, capacity_factor=None)
    assert r.experts.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.625, 0.375], [0.7 / 0.9, 0.2 / 0.9]]))
    assert r.kept.all()
    one = route(L(probs), top_k=1, capacity_factor=None)  # Switch: the raw probability is the gate
    torch.testing.assert_close(one.weights, torch.tensor([[0.5], [0.7]]))


def test_capacity_keeps_first_choices_first_in_token_order():
    """4 tokens, 2 experts, top-1 ... capacity ceil(0.5 x 4 x 2 / 2) = 2 assignments per expert with top 2."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    r = route(L(probs), top_k=2, capacity_factor=0.5)
    # expert 0's queue: first choices of tokens 0, 1, 2 (token 2 dropped), then token 3's second choice (dropped)
    # expert 1's queue: token 3's first choice, then the second choices of tokens 0, 1, 2: token 0's kept
    assert r.experts.tolist() == [[0, 1], [0, 1], [0, 1], [1, 0]]
    assert r.kept.tolist() == [[True, True], [True, False], [False, False], [True, False]]
    assert (r.weights[~r.kept] == 0).all() and (r.weights[r.kept] > 0).all()
    top1 = route(L(probs), top_k=1, capacity_factor=1.0)  # capacity 2: expert 0 takes tokens 0 and 1 only
    assert top1.kept.flatten().tolist() == [True, True, False, True]


def test_auxiliary_losses_by_hand():
    balanced = route(L(torch.tensor([[0.5, 0.5], [0.5, 0.5]])), top_k=1, capacity_factor=None)
    balanced = balanced.__class__(torch.tensor([[0], [1]]), balanced.weights, balanced.kept, balanced.probs)
    assert balance_loss(balanced, 2).item() == pytest.approx(1.0)  # f = [0.5, 0.5], P = [0.5, 0.5]: 2 x 0.5
    skewed = route(L(torch.tensor([[0.9, 0.1], [0.7, 0.3]])), top_k=1, capacity_factor=None)
    assert balance_loss(skewed, 2).item() == pytest.approx(2 * (1.0 * 0.8 + 0.0 * 0.2))  # both to expert 0
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    want = (math.log(math.e + math.e**2) ** 2 + math.log(2) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(want)


def _moe_model(**moe):
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      moe={"num_experts": 4, "top_k": 2, **moe})
    return Transformer(cfg, seed=0)


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_the_balancing_loss_spreads_the_tokens(coef):
    """A router pushed toward expert 0 (its row plus 20 x the unit mean of the tokens' hidden states) starts
    unbalanced (balancing loss 1.22; 1.0 is balanced): with the loss at 0.5 it is balanced within 10 steps
    (0.99 at step 60), without it stays unbalanced (1.20; measured)."""
    torch.manual_seed(0)
    model = _moe_model(aux_loss_coef=coef, z_loss_coef=0.0)
    data = torch.randint(0, 64, (16, 4)).repeat(1, 5)
    seen = []
    hook = moe_layers(model)[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model(data[:, :-1])
    hook.remove()
    mean = seen[0].reshape(-1, 32).mean(dim=0)
    with torch.no_grad():
        for m in moe_layers(model):
            m.router.weight[0] += 20 * mean / mean.norm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    set_micro_batches(model, 1)
    aux = []
    for _ in range(60):
        loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, 64), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = take_stats(model)
        aux.append(float(stats[1] / stats[0]))
    assert aux[0] > 1.15
    if coef:
        assert max(aux[10:]) < 1.03, aux
    else:
        assert min(aux[10:]) > 1.1, aux


def test_every_expert_is_in_the_graph():
    """Experts that no token chose still get a (zero) gradient: DDP needs no unused-parameter search."""
    model = _moe_model(num_experts=8, top_k=1)
    model(torch.randint(0, 64, (1, 3))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mixtral_export_has_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _moe_model().eval()
    assert export_model(model.state_dict(), model.cfg, tmp_path) == "hf_mixtral"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model(tmp_path).eval()(x), model(x), atol=0, rtol=0)
    for moe in ({"capacity_factor": 1.0}, {"top_k": 1}, {"every_n_layers": 2}):  # what Mixtral cannot express
        assert export_model(_moe_model(**moe).state_dict(), _moe_model(**moe).cfg, tmp_path / str(moe)) == "lmfleet"
