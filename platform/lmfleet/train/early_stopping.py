"""Early stopping on an evaluated metric: pure bookkeeping, no torch (the trainers keep the best weights).

The best evaluation is the lowest (`min`) or highest (`max`) so far: its weights are the ones exported.
An evaluation that beats it by no more than `min_delta` is still the new best but counts as no
improvement; after `patience` evaluations in a row without one, training stops. These are the HF
Trainer's rules (EarlyStoppingCallback with load_best_model_at_end), which the post-training stages use,
so one config means the same in every stage. The state is a few numbers, saved with every checkpoint, so
a resumed run counts on where it left off.
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
        gain = None if self.best is None else (self.best - value if self.cfg.minimize else value - self.best)
        if gain is None or gain > self.cfg.min_delta:
            self.bad = 0
        else:
            self.bad += 1
            if self.bad >= self.cfg.patience:
                self.stopped_at = step
        if gain is None or gain > 0:
            self.best, self.best_step = value, step
            return True
        return False

    def summary(self) -> dict:
        """What the stage report says: the best evaluation, where training stopped (None: it ran every step), why."""
        return {"metric": self.cfg.metric, "best": self.best, "best_step": self.best_step,
                "stopped_at": self.stopped_at, "reason": self.reason() if self.stopped else None}

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


def report_section(cfg: EarlyStoppingConfig, events: list[dict], steps: int) -> dict:
    """The stage report's `early_stopping`, with a summary line, from the stage's event records: the trainer's
    last `summary()` record (`event: early_stopping`; its `max_steps`, where the trainer logs one, over `steps`)."""
    summary = next((e for e in reversed(events) if e.get("event") == "early_stopping"), {})
    steps = summary.get("max_steps", steps)
    keys = ("metric", "best", "best_step", "stopped_at", "reason")
    section = {"metric": cfg.metric, "patience": cfg.patience, "min_delta": cfg.min_delta,
               **{k: v for k, v in summary.items() if k in keys}}
    if section.get("stopped_at") is not None:
        line = f"early stopping: stopped at step {section['stopped_at']} of {steps}: {section['reason']}"
    elif section.get("best") is not None:
        line = f"early stopping: ran all {steps} steps; best {cfg.metric} {section['best']:.4f} at step {section['best_step']}"
    else:
        line = "early stopping: no evaluation"
    return {**section, "summary": line}
