"""Source mixing: static (data stage) and scheduled / loss-adaptive (consumed by pretraining).

Static mixing turns per-source sizes into sampling rates. A rate of 2.4 means: every document twice,
plus a seeded 40% of them a third time; a rate of 0.3 keeps a seeded 30%. Selection hashes
(seed, document uid, epoch), so the same seed picks the same documents on any cluster layout.

A `MixingSchedule` gives source weights as a function of the training step, and can take per-source
losses through `update` (dynamic mixing). Its state is a plain dict so it rides in checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from lmfleet.data.config import MixingConfig
from lmfleet.data.minhash import splitmix64

# ---- static mixing -----------------------------------------------------------------------------


def temperature_weights(sizes: dict[str, float], temperature: float) -> dict[str, float]:
    """p_i ∝ n_i^(1/T): T=1 natural proportions, T→∞ uniform."""
    scaled = {k: (v ** (1.0 / temperature) if v > 0 else 0.0) for k, v in sizes.items()}
    total = sum(scaled.values())
    if total <= 0:
        raise ValueError(f"no source has any data: {sizes}")
    return {k: v / total for k, v in scaled.items()}


def mixing_rates(sizes: dict[str, int], cfg: MixingConfig) -> dict[str, dict]:
    """Per source: target share, target size and the sampling rate that realizes it (capped)."""
    if cfg.weights is not None:
        total_w = sum(cfg.weights.get(k, 0.0) for k in sizes)
        shares = {k: cfg.weights.get(k, 0.0) / total_w for k in sizes}
    else:
        shares = temperature_weights(sizes, cfg.temperature)
    total = cfg.total_chars or sum(sizes.values())
    plan = {}
    for name, size in sizes.items():
        max_epochs = cfg.max_epochs.get(name, 1.0) if isinstance(cfg.max_epochs, dict) else cfg.max_epochs
        target = shares[name] * total
        if name in cfg.caps:
            target = min(target, cfg.caps[name])
        rate = min(target / size, max_epochs) if size else 0.0
        plan[name] = {"share": round(shares[name], 6), "chars": size, "rate": round(rate, 6),
                      "mixed_chars_expected": round(rate * size)}
    return plan


def unit_hash(uid: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Uniform [0, 1) per (uid, seed, epoch): splitmix64 of the combination."""
    x = splitmix64(uid.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03) % 2**64))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def val_mask(uid: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Held-out documents: a seeded fraction chosen by document, never by epoch."""
    return unit_hash(uid, seed, epoch=-1) < fraction


def apply_rates(table: pa.Table, rates: dict[str, float], seed: int, val_fraction: float) -> pa.Table:
    """Repeat/sample the rows of a batch by their source's rate; adds `epoch` and `split`.

    Validation documents are taken out first and kept exactly once, so the held-out split is the
    same whatever the mix.
    """
    uid = table["uid"].to_numpy()
    rate = np.array([rates[s] for s in table["source"].to_pylist()], dtype=np.float64)
    is_val = val_mask(uid, seed, val_fraction)
    pieces, epochs, splits = [np.flatnonzero(is_val)], [np.zeros(int(is_val.sum()), np.int32)], ["val"]
    max_epoch = int(math.ceil(rate.max())) if len(rate) else 0
    for epoch in range(max_epoch):
        take = ~is_val & (unit_hash(uid, seed, epoch) < rate - epoch)
        pieces.append(np.flatnonzero(take))
        epochs.append(np.full(int(take.sum()), epoch, np.int32))
        splits.append("train")
    idx = np.concatenate(pieces)
    out = table.take(pa.array(idx, pa.int64()))
    out = out.append_column("epoch", pa.array(np.concatenate(epochs)))
    split_col = np.concatenate([np.full(len(p), s, dtype=object) for p, s in zip(pieces, splits, strict=True)])
    return out.append_column("split", pa.array(split_col, pa.string()))


# ---- schedules for training --------------------------------------------------------------------


class MixingSchedule:
    """Source weights over training steps. Static: the same weights at every step."""

    def __init__(self, weights: dict[str, float]):
        self._weights = _normalized(weights)

    def weights(self, step: int) -> dict[str, float]:
        return dict(self._weights)

    def update(self, step: int, source_losses: dict[str, float]) -> None:
        """Called by the trainer with per-source losses; static schedules ignore it."""

    def state_dict(self) -> dict:
        return {"weights": dict(self._weights)}

    def load_state_dict(self, state: dict) -> None:
        self._weights = dict(state["weights"])


class PiecewiseSchedule(MixingSchedule):
    """Weights given at milestone steps, linearly interpolated between them, constant after the last."""

    def __init__(self, milestones: list[tuple[int, dict[str, float]]]):
        if not milestones:
            raise ValueError("a piecewise schedule needs at least one milestone")
        self.milestones = sorted(((int(s), _normalized(w)) for s, w in milestones), key=lambda m: m[0])
        super().__init__(self.milestones[0][1])

    def weights(self, step: int) -> dict[str, float]:
        steps = [s for s, _ in self.milestones]
        if step <= steps[0]:
            return dict(self.milestones[0][1])
        if step >= steps[-1]:
            return dict(self.milestones[-1][1])
        i = int(np.searchsorted(steps, step, side="right")) - 1
        (s0, w0), (s1, w1) = self.milestones[i], self.milestones[i + 1]
        a = (step - s0) / (s1 - s0)
        names = sorted(set(w0) | set(w1))
        return _normalized({k: (1 - a) * w0.get(k, 0.0) + a * w1.get(k, 0.0) for k in names})


class LossAdaptiveSchedule(MixingSchedule):
    """Upweights sources whose loss is above their reference (DoReMi-style exponentiated gradient).

    On each update: w_i ← w_i · exp(lr · (loss_i − ref_i)), renormalized, then mixed with the uniform
    distribution by `smoothing` so no source starves. The reference is each source's first loss.
    """

    def __init__(self, weights: dict[str, float], lr: float = 1.0, smoothing: float = 0.1):
        super().__init__(weights)
        self.lr, self.smoothing = lr, smoothing
        self.reference: dict[str, float] = {}

    def update(self, step: int, source_losses: dict[str, float]) -> None:
        for k, loss in source_losses.items():
            self.reference.setdefault(k, loss)
        logits = {
            k: math.log(max(w, 1e-12)) + self.lr * (source_losses.get(k, self.reference.get(k, 0.0)) - self.reference.get(k, 0.0))
            for k, w in self._weights.items()
        }
        top = max(logits.values())
        w = _normalized({k: math.exp(v - top) for k, v in logits.items()})
        u = 1.0 / len(w)
        self._weights = {k: (1 - self.smoothing) * v + self.smoothing * u for k, v in w.items()}

    def state_dict(self) -> dict:
        return {"weights": dict(self._weights), "reference": dict(self.reference)}

    def load_state_dict(self, state: dict) -> None:
        self._weights = dict(state["weights"])
        self.reference = dict(state.get("reference", {}))


def _normalized(weights: dict[str, float]) -> dict[str, float]:
    if any(v < 0 for v in weights.values()):
        raise ValueError(f"mixing weights must be >= 0, got {weights}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mixing weights must not all be 0, got {weights}")
    return {k: v / total for k, v in weights.items()}
