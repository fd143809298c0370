"""Every parallel strategy reproduces the single-process losses (fp32, gloo, real worker processes)."""

import pytest

from conftest import pretrain

STEPS = 10
REL_TOL = 1e-4


@pytest.fixture(scope="session")
def reference(packed, tmp_path_factory):
    steps, _ = pretrain(tmp_path_factory.mktemp("ref"), packed, parallel__strategy="none")
    assert len(steps) == STEPS and steps[-1]["loss"] < steps[0]["loss"]
    assert max(s["grad_norm"] for s in steps) > 0.5  # clipping (at 0.5) is exercised
    return steps


STRATEGIES = {
    "ddp": dict(parallel__strategy="ddp", scaling__num_workers=2),
    "fsdp": dict(parallel__strategy="fsdp", scaling__num_workers=2),
    "fsdp_activation_ckpt": dict(parallel__strategy="fsdp", parallel__activation_checkpointing=True,
                                 scaling__num_workers=2),
    "fsdp_grad_op": dict(parallel__strategy="fsdp", parallel__fsdp__reshard_after_forward=False, scaling__num_workers=2),
    "zero1": dict(parallel__strategy="deepspeed", parallel__deepspeed__zero_stage=1, scaling__num_workers=2),
    "zero2": dict(parallel__strategy="deepspeed", parallel__deepspeed__zero_stage=2, scaling__num_workers=2),
    "zero3": dict(parallel__strategy="deepspeed", parallel__deepspeed__zero_stage=3, scaling__num_workers=2),
    "tp2": dict(parallel__strategy="fsdp", parallel__tp_size=2, scaling__num_workers=2),
    "pp2_1f1b": dict(parallel__strategy="fsdp", parallel__pp_size=2, scaling__num_workers=2),
    "pp2_gpipe": dict(parallel__strategy="ddp", parallel__pp_size=2, parallel__pp_schedule="gpipe", scaling__num_workers=2),
    "dp2_tp2": dict(parallel__strategy="fsdp", parallel__tp_size=2, scaling__num_workers=4),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_parity_with_single_process(name, packed, reference, tmp_path):
    steps, report = pretrain(tmp_path, packed, name=name, **STRATEGIES[name])
    assert len(steps) == STEPS and report["world_sizes"] == [STRATEGIES[name]["scaling__num_workers"]]
    for got, want in zip(steps, reference, strict=True):
        assert abs(got["loss"] - want["loss"]) <= REL_TOL * abs(want["loss"]), (
            f"{name} step {got['step']}: loss {got['loss']} vs single-process {want['loss']}")
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
