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


# Each optimizer where its states meet shards: LAMB's per-tensor norms over FSDP2's DTensor shards,
# 8-bit AdamW's states partitioned by ZeRO-2 (flat fp32 partitions) and replicated under DDP.
OPTIMIZER_LAYOUTS = {
    "lamb-fsdp": ("lamb", dict(parallel__strategy="fsdp", scaling__num_workers=2)),
    "adamw_8bit-ddp": ("adamw_8bit", dict(parallel__strategy="ddp", scaling__num_workers=2)),
    "adamw_8bit-zero2": ("adamw_8bit", dict(parallel__strategy="deepspeed", parallel__deepspeed__zero_stage=2,
                                            scaling__num_workers=2)),
}


@pytest.fixture(scope="session")
def optimizer_references(packed, tmp_path_factory):
    out = {}
    for name in ("lamb", "adamw_8bit"):
        lr = 0.1 if name == "lamb" else 3e-3  # LAMB: a relative step per tensor
        steps, _ = pretrain(tmp_path_factory.mktemp(name), packed, parallel__strategy="none", optimizer__name=name,
                            optimizer__lr=lr)
        assert steps[-1]["loss"] < steps[0]["loss"] - 0.1, (name, steps[0]["loss"], steps[-1]["loss"])
        out[name] = (lr, steps)
    return out


@pytest.mark.parametrize("layout", list(OPTIMIZER_LAYOUTS))
def test_optimizer_parity_with_single_process(layout, packed, optimizer_references, tmp_path):
    name, over = OPTIMIZER_LAYOUTS[layout]
    lr, reference = optimizer_references[name]
    steps, _ = pretrain(tmp_path, packed, name=layout, optimizer__name=name, optimizer__lr=lr, **over)
    for got, want in zip(steps, reference, strict=True):
        assert abs(got["loss"] - want["loss"]) <= REL_TOL * abs(want["loss"]), (layout, got["step"], got["loss"],
                                                                                want["loss"])


MOE = {"num_experts": 4, "top_k": 2, "capacity_factor": 1.0}  # capacity 1.0: some assignments are dropped
MOE_LAYOUTS = {
    "moe-ddp": dict(parallel__strategy="ddp"),
    "moe-fsdp": dict(parallel__strategy="fsdp"),
    "moe-zero2": dict(parallel__strategy="deepspeed", parallel__deepspeed__zero_stage=2),
}


@pytest.fixture(scope="session")
def moe_reference(packed, tmp_path_factory):
    steps, _ = pretrain(tmp_path_factory.mktemp("moe"), packed, parallel__strategy="none", model__moe=MOE)
    assert steps[-1]["loss"] < steps[0]["loss"]
    for s in steps:  # each step's share of the assignments per expert, the auxiliary losses, the dropped share
        assert sum(s[f"expert_load/{e}"] for e in range(4)) == pytest.approx(1.0)
        assert 0.9 < s["moe_aux_loss"] < 1.5 and s["moe_z_loss"] > 0  # ~1 when balanced
    assert max(s["moe_dropped"] for s in steps) > 0
    return steps


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_moe_parity_with_single_process(layout, packed, moe_reference, tmp_path):
    steps, _ = pretrain(tmp_path, packed, name=layout, model__moe=MOE, scaling__num_workers=2, **MOE_LAYOUTS[layout])
    for got, want in zip(steps, moe_reference, strict=True):
        assert abs(got["loss"] - want["loss"]) <= REL_TOL * abs(want["loss"]), (layout, got["step"], got["loss"],
                                                                                want["loss"])
        assert got["moe_aux_loss"] == pytest.approx(want["moe_aux_loss"], rel=1e-4)
        assert got["expert_load/0"] == pytest.approx(want["expert_load/0"], rel=1e-4)
