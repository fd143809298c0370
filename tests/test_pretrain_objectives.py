"""Every pretraining objective trains in the pretraining loop (real Ray Train workers, the shared packed
data): its loss falls; corruption depends on the sample, not on the worker that loads it (DDP / FSDP give
the single process's losses); BERT's next-sentence prediction learns real text."""

import pytest

from conftest import pretrain

KINDS = ["fim", "span_infill", "sentence_permutation", "document_rotation", "mlm"]


def _objective(kind: str, **over) -> dict:
    keys = dict(objective={"kind": kind, **over})
    if kind.startswith("mlm"):
        keys["model__causal"] = False
    return keys


@pytest.mark.parametrize("kind", KINDS)
def test_each_objective_learns(kind, packed, tmp_path):
    steps, report = pretrain(tmp_path, packed, name=kind, steps=20, eval__every=20, **_objective(kind))
    first, last = [s["loss"] for s in steps[:3]], [s["loss"] for s in steps[-3:]]
    # (mlm fell 0.28 in one CI run and more here: its 15% of tokens make a noisier loss)
    assert sum(last) / 3 < sum(first) / 3 - 0.15, (kind, first, last)
    assert report["val_loss"] is not None


@pytest.mark.parametrize("kind, layout", [("span_infill", dict(parallel__strategy="ddp")),
                                          ("mlm", dict(parallel__strategy="fsdp"))])
def test_objectives_match_the_single_process(kind, layout, packed, tmp_path):
    single, _ = pretrain(tmp_path, packed, name="single", steps=6, parallel__strategy="none", **_objective(kind))
    two, _ = pretrain(tmp_path, packed, name="two", steps=6, scaling__num_workers=2, **layout, **_objective(kind))
    for a, b in zip(single, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (kind, a["step"], a["loss"], b["loss"])


def test_mlm_nsp_predicts_the_next_sentence_above_chance(packed, tmp_path):
    """C4 and Shakespeare: 400 steps of 32 pairs; held out, 512 pairs (one sd of a coin: 0.022). Measured 0.66-0.67
    from step 300 (0.51 at step 100)."""
    steps, report = pretrain(tmp_path, packed, steps=400, eval__every=200, eval__batches=16, model__d_model=64,
                             batch__global_batch=32, batch__micro_batch=32, lr_schedule__warmup_steps=20,
                             log_every=50, **_objective("mlm_nsp"))
    evals = [s for s in steps if "val_nsp_accuracy" in s]
    assert [s["step"] for s in evals] == [200, 400] and evals[-1]["val_nsp_accuracy"] > 0.6, evals
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
