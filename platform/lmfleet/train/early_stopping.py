"""Early stopping on an evaluated metric: pure bookkeeping, no torch (the trainers keep the best weights).

An evaluation improves on the best so far when it is lower (mode `min`) or higher (`max`) by more than
`min_delta`; after `patience` evaluations in a row without one, training stops. The state is a few
numbers, saved with every checkpoint, so a resumed run counts on where it left off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmfleet.train.config import EarlyStoppingConfig


@dataclass
class EarlyStopping:
    cfg: EarlyStoppingConfig
    best: float | None = None
    best_step: int | None = None
    bad: int = 0  # evaluations since the last improvement
    stopped_at: int | None = None

    def update(self, step: int, value: float) -> bool:
        """Record the evaluation at `step`; True when it is the new best (its weights are the ones to keep)."""
        if self.best is None or (value < self.best - self.cfg.min_delta if self.cfg.mode == "min"
                                 else value > self.best + self.cfg.min_delta):
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        if self.bad >= self.cfg.patience:
            self.stopped_at = step
        return False

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def reason(self) -> str:
        c = self.cfg
        return (f"{c.metric} did not improve by more than {c.min_delta:g} for {c.patience} evaluation(s) "
                f"(best {self.best:.4f} at step {self.best_step})")

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "cfg"}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
