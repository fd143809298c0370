"""Optimizers, weight-decay groups and learning-rate schedules."""

import pytest
import torch
import torch.nn.functional as F

from lmfleet.model import ModelConfig, Transformer
from lmfleet.train.config import LRScheduleConfig, OptimizerConfig
from lmfleet.train.optim import build_optimizer, lr_multiplier, param_groups


@pytest.mark.parametrize("name, lr", [("adamw", 1e-2), ("adafactor", 1.0), ("lion", 3e-3)])
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
