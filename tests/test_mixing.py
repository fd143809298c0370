"""Static mixing rates, seeded sampling, and the schedule API the pretraining stage consumes."""

import numpy as np
import pyarrow as pa
import pytest

from lmfleet.data.config import MixingConfig
from lmfleet.data.mixing import (
    LossAdaptiveSchedule,
    MixingSchedule,
    PiecewiseSchedule,
    apply_rates,
    mixing_rates,
    temperature_weights,
)


def test_temperature_weights():
    sizes = {"big": 900.0, "small": 100.0}
    assert temperature_weights(sizes, 1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    t2 = temperature_weights(sizes, 2.0)  # sqrt: 30 vs 10
    assert t2 == pytest.approx({"big": 0.75, "small": 0.25})
    assert temperature_weights(sizes, 1e9) == pytest.approx({"big": 0.5, "small": 0.5}, abs=1e-6)


def test_rates_from_weights_caps_and_epochs():
    sizes = {"a": 1000, "b": 100}
    plan = mixing_rates(sizes, MixingConfig(weights={"a": 0.5, "b": 0.5}, max_epochs=3.0))
    assert plan["a"]["rate"] == pytest.approx(0.55)  # 550 of 1000 chars
    assert plan["b"]["rate"] == 3.0  # wants 5.5 epochs, capped at 3
    plan = mixing_rates(sizes, MixingConfig(weights={"a": 0.5, "b": 0.5}, max_epochs={"b": 10.0}, caps={"a": 200}))
    assert plan["a"]["rate"] == pytest.approx(0.2) and plan["b"]["rate"] == pytest.approx(5.5)
    assert mixing_rates(sizes, MixingConfig())["a"]["rate"] == pytest.approx(1.0)


def _table(n, source="a"):
    return pa.table({"uid": pa.array(np.arange(1, n + 1, dtype=np.uint64) * 0x9E3779B97F4A7C15),
                     "source": [source] * n})


def test_apply_rates_upsamples_downsamples_deterministically():
    t = _table(20000)
    up = apply_rates(t, {"a": 2.5}, seed=3, val_fraction=0.0)
    epochs = np.bincount(up["epoch"].to_numpy())
    assert epochs[0] == epochs[1] == 20000 and abs(epochs[2] - 10000) < 300
    down = apply_rates(t, {"a": 0.3}, seed=3, val_fraction=0.0)
    assert abs(len(down) - 6000) < 250
    assert apply_rates(t, {"a": 0.3}, seed=3, val_fraction=0.0).equals(down)
    assert not apply_rates(t, {"a": 0.3}, seed=4, val_fraction=0.0).equals(down)


def test_val_split_is_by_document_and_independent_of_rates():
    t = _table(5000)
    a = apply_rates(t, {"a": 2.0}, seed=1, val_fraction=0.1)
    b = apply_rates(t, {"a": 0.5}, seed=1, val_fraction=0.1)
    val_a = set(a.filter(pa.compute.equal(a["split"], "val"))["uid"].to_pylist())
    val_b = set(b.filter(pa.compute.equal(b["split"], "val"))["uid"].to_pylist())
    train_a = set(a.filter(pa.compute.equal(a["split"], "train"))["uid"].to_pylist())
    assert val_a == val_b and 400 < len(val_a) < 600 and not (val_a & train_a)


def test_schedules():
    static = MixingSchedule({"a": 3, "b": 1})
    assert static.weights(0) == static.weights(10**6) == {"a": 0.75, "b": 0.25}

    pw = PiecewiseSchedule([(0, {"a": 1.0, "b": 0.0}), (100, {"a": 0.0, "b": 1.0})])
    assert pw.weights(-5) == {"a": 1.0, "b": 0.0}
    assert pw.weights(25) == pytest.approx({"a": 0.75, "b": 0.25})
    assert pw.weights(1000) == {"a": 0.0, "b": 1.0}

    ad = LossAdaptiveSchedule({"a": 0.5, "b": 0.5}, lr=2.0, smoothing=0.0)
    ad.update(0, {"a": 3.0, "b": 3.0})
    assert ad.weights(1) == pytest.approx({"a": 0.5, "b": 0.5})
    ad.update(1, {"a": 3.5, "b": 2.5})  # a lags behind its reference: upweighted
    w = ad.weights(2)
    assert w["a"] > 0.8 and sum(w.values()) == pytest.approx(1.0)
    restored = LossAdaptiveSchedule({"a": 0.5, "b": 0.5}, lr=2.0, smoothing=0.0)
    restored.load_state_dict(ad.state_dict())
    ad.update(2, {"a": 3.2, "b": 2.6})
    restored.update(2, {"a": 3.2, "b": 2.6})
    assert restored.weights(3) == pytest.approx(ad.weights(3))
    with pytest.raises(ValueError):
        MixingSchedule({"a": -1.0})
