"""Early stopping: the bookkeeping on hand-made evaluations, and a pretraining run that stops on a plateau
and exports its best evaluated weights."""

import json

import pytest
from safetensors.torch import load_file

from lmfleet.train.config import EarlyStoppingConfig
from lmfleet.train.early_stopping import EarlyStopping

from conftest import pretrain


def test_patience_and_min_delta_by_hand():
    """HF's rules: any better evaluation is the new best (its weights kept); only one better by more than
    min_delta resets the patience count."""
    stop = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.1))
    assert stop.update(10, 5.0) and stop.best == 5.0  # the first evaluation is the best so far
    assert stop.update(20, 4.95) and stop.bad == 1  # better, but not by more than min_delta
    assert stop.update(30, 4.8) and (stop.best, stop.best_step, stop.bad) == (4.8, 30, 0)
    assert stop.update(40, 4.75) and stop.bad == 1 and not stop.stopped
    assert not stop.update(50, 4.9) and stop.stopped_at == 50 and stop.best_step == 40
    assert "did not improve by more than 0.1 for 2 evaluation(s) (best 4.7500 at step 40)" in stop.reason()
    again = EarlyStopping(stop.cfg)
    again.load_state_dict(json.loads(json.dumps(stop.state_dict())))  # as a checkpoint keeps it
    assert again.state_dict() == stop.state_dict()
    up = EarlyStopping(EarlyStoppingConfig(metric="eval_accuracy", patience=1))  # mode None: max for accuracies
    assert up.update(1, 0.5) and up.update(2, 0.6) and not up.update(3, 0.6) and up.stopped_at == 3


def test_pretraining_stops_when_validation_loss_rises_and_exports_the_best_step(packed, tmp_path):
    """At lr 0.2 the validation loss rises from step 2 to step 4: with patience 1 the run stops at step 4 and
    exports the weights of step 2, which a 2-step run reproduces (FSDP: each rank keeps its shards)."""
    common = dict(lr_schedule__decay="constant", optimizer__lr=0.2, eval__every=2, export=True)
    steps, report = pretrain(tmp_path, packed, name="stopped", steps=30, parallel__strategy="fsdp",
                             scaling__num_workers=2, checkpoint__every=4, early_stopping={"patience": 1}, **common)
    evals = [s for s in steps if "val_loss" in s]
    assert [s["step"] for s in evals] == [2, 4] and evals[1]["val_loss"] > evals[0]["val_loss"]
    assert steps[-1]["step"] == 4 and report["steps"] == 4 and [s["best_step"] for s in evals] == [2, 2]
    es = report["early_stopping"]
    assert (es["stopped_at"], es["best_step"]) == (4, 2) and es["best"] == pytest.approx(evals[0]["val_loss"])
    assert "stopped at step 4 of 30: val_loss did not improve by more than 0 for 1 evaluation(s)" in \
        "\n".join(report["summary"])
    assert report["export"]["step"] == 2
    assert json.loads((tmp_path / "stopped" / "pretrain" / "ray" / "train" / "step_00000004" / "trainer_state.json")
                      .read_text())["early_stopping"]["stopped_at"] == 4  # its last checkpoint is where it stopped

    # The same layout (FSDP, 2 ranks): at lr 0.2 Adam turns fp32 rounding between layouts into steps of up to
    # the lr where a gradient is ~0 (3.6e-3 seen against one process), so compare like with like.
    pretrain(tmp_path, packed, name="two", steps=2, parallel__strategy="fsdp", scaling__num_workers=2, **common)
    got = load_file(tmp_path / "stopped" / "pretrain" / "model" / "model.safetensors")
    want = load_file(tmp_path / "two" / "pretrain" / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:  # step 4's weights are ~0.2 away at this lr
        assert (got[k] - want[k]).abs().max() < 1e-6, k
