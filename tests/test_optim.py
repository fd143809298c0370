"""Optimizers, weight-decay groups and learning-rate schedules."""

import pytest
import torch
import torch.nn.functional as F

from lmfleet.model import ModelConfig, Transformer
from lmfleet.train import checkpoint
from lmfleet.train.config import LRScheduleConfig, OptimizerConfig
from lmfleet.train.optim import Lamb, build_optimizer, lr_multiplier, param_groups
from lmfleet.train.plan import Tensor, optimizer_bytes


@pytest.mark.parametrize("name, lr", [("adamw", 1e-2), ("adafactor", 1.0), ("lion", 3e-3), ("lamb", 5e-2),
                                      ("adamw_8bit", 1e-2)])
def test_optimizers_train(name, lr):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=32))
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=lr))
    data = torch.randint(0, 64, (16, 4)).repeat(1, 5)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, 64), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], (name, losses[0], losses[-1])


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=4, norm="layernorm"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 2  # two LayerNorms per block (weight, bias) + final norm


def test_lr_schedules():
    total = 100
    cos = LRScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, total, cos) == pytest.approx(0.1)
    assert lr_multiplier(9, total, cos) == pytest.approx(1.0)
    assert lr_multiplier(10, total, cos) == pytest.approx(1.0)
    assert lr_multiplier(99, total, cos) == pytest.approx(0.1)
    mid = lr_multiplier(54, total, cos)
    assert 0.5 < mid < 0.6  # halfway through the cosine: (1 + 0.1) / 2 = 0.55
    lin = LRScheduleConfig(decay="linear", min_lr_ratio=0.0)
    assert lr_multiplier(0, total, lin) == 1.0 and lr_multiplier(99, total, lin) == 0.0
    wsd = LRScheduleConfig(decay="wsd", wsd_decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(79, total, wsd) == 1.0 and lr_multiplier(99, total, wsd) == pytest.approx(0.0)
    assert 0.0 < lr_multiplier(90, total, wsd) < 1.0
    assert lr_multiplier(50, total, LRScheduleConfig(decay="constant")) == 1.0


def test_lamb_step_by_hand():
    """One LAMB step: Adam's first step is g / (|g| + eps) ~ sign(g); a decayed matrix's step adds wd * w and is
    scaled by ||w|| / ||step||, a vector without decay takes the plain Adam step."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = Lamb([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.1, eps=1e-12)
    w.grad, b.grad = torch.tensor([[1.0, -2.0]]), torch.tensor([0.5])
    opt.step()
    # step = [1, -1] + 0.1 * [3, 4] = [1.3, -0.6]; ||step|| = sqrt(1.69 + 0.36) = 1.431782; ratio = 3.492151
    assert w.detach().tolist()[0] == pytest.approx([3 - 0.1 * 3.492151 * 1.3, 4 + 0.1 * 3.492151 * 0.6], rel=1e-6)
    assert b.item() == pytest.approx(0.9, rel=1e-6)


def _problem():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, n_layers=2, d_model=64, n_heads=4, max_seq_len=32))
    data = torch.randint(0, 128, (16, 4)).repeat(1, 5)
    return model, data


def _steps(model, opt, data, n):
    losses = []
    for _ in range(n):
        loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, 128), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_8bit_adamw_tracks_fp32_adamw_in_a_quarter_of_the_memory():
    runs = {}
    for name in ("adamw", "adamw_8bit"):
        model, data = _problem()
        opt = build_optimizer(model, OptimizerConfig(name=name, lr=3e-3))
        runs[name] = (_steps(model, opt, data, 40), opt)
    fp32, q8 = runs["adamw"][0], runs["adamw_8bit"][0]
    assert q8[-1] < 0.5 * q8[0] and abs(q8[-1] - fp32[-1]) < 0.05 * fp32[0], (fp32[-1], q8[-1])
    nbytes = {k: sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor)) for k, (_, opt) in runs.items()}
    assert nbytes["adamw_8bit"] < 0.3 * nbytes["adamw"], nbytes
    # lmfleet plan counts them the same way
    model, _ = _problem()
    tensors = [Tensor(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert optimizer_bytes("adamw_8bit", tensors, 1) == pytest.approx(nbytes["adamw_8bit"], rel=0.02)
    assert optimizer_bytes("adamw", tensors, 1) == nbytes["adamw"] - 4 * len(tensors)  # less AdamW's step counts


@pytest.mark.parametrize("name", ["lamb", "adamw_8bit"])
def test_checkpoint_resume_is_exact(name, tmp_path):
    """Through the sharded checkpoint (DCP, as the training loop saves and loads it): 5 steps, save, a new model
    and optimizer load it, 5 more steps = 10 steps uninterrupted."""
    cfg = OptimizerConfig(name=name, lr=3e-3)
    model, data = _problem()
    want = _steps(model, build_optimizer(model, cfg), data, 10)
    model, data = _problem()
    opt = build_optimizer(model, cfg)
    got = _steps(model, opt, data, 5)
    checkpoint.save(tmp_path, model, opt, {"step": 5}, rank=0)
    torch.manual_seed(1)
    model = Transformer(model.cfg, seed=7)  # other weights: the checkpoint must bring them back
    opt = build_optimizer(model, cfg)
    assert checkpoint.load(tmp_path, model, opt) == {"step": 5}
    got += _steps(model, opt, data, 5)
    assert got == want
