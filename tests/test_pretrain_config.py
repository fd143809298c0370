"""Bad pretraining configs fail at validation, before Ray or any worker starts."""

import subprocess

import pytest

from lmfleet.errors import ConfigError
from lmfleet.runner import load_run

from conftest import lmfleet_cmd, set_nested, write_config


def _cfg(**pretrain):
    stage = {"data": "runs/x/data", "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2}}
    return {"name": "t", "stages": {"pretrain": set_nested(stage, pretrain)}}


@pytest.mark.parametrize("over, message", [
    (dict(parallel__tp_size=4, scaling__num_workers=4), "tp_size 4 must divide n_heads 4 and n_kv_heads 2"),
    (dict(parallel__pp_size=3, scaling__num_workers=3), "pp_size 3 is larger than model.n_layers 2"),
    (dict(parallel__strategy="deepspeed", parallel__deepspeed__zero_stage=4), "zero_stage: got 4"),
    (dict(parallel__tp_size=2, scaling__num_workers=3), "3 workers is not divisible by tp_size*pp_size = 2"),
    (dict(batch__global_batch=6, batch__micro_batch=4, scaling__num_workers=[1, 2]),
     "global_batch 6 is not divisible by data-parallel size 1 x micro_batch 4"),
    (dict(parallel__strategy="none", scaling__num_workers=2), "single-process reference"),
    (dict(parallel__strategy="deepspeed", scaling__num_workers=[1, 2]), "cannot resume ZeRO state"),
    (dict(model__positions="alibi", parallel__tp_size=2, scaling__num_workers=2), "alibi"),
    (dict(parallel__pp_size=2, scaling__num_workers=2, batch__global_batch=4, batch__micro_batch=4),
     "is fewer than pp_size 2"),
    (dict(tensorboard=True), "tensorboard: moved to the run's `tracking: {tensorboard: true}`"),
    (dict(optimizer__name="lamb", parallel__strategy="deepspeed", scaling__num_workers=2),
     "optimizer 'lamb' with DeepSpeed ZeRO"),
    (dict(optimizer__name="adamw_8bit", parallel__strategy="fsdp", scaling__num_workers=2),
     "'adamw_8bit' takes whole tensors, not FSDP / TP shards"),
    (dict(optimizer__name="adamw_8bit", parallel__pp_size=2, scaling__num_workers=4, batch__global_batch=16),
     "'adamw_8bit' takes whole tensors"),  # ddp with pp over 2 dp ranks replicates through FSDP2
    (dict(optimizer__name="adam"), "optimizer.name"),
    (dict(early_stopping={"metric": "loss"}), "early_stopping.metric 'loss': pretraining evaluates val_loss"),
    (dict(early_stopping={}, parallel__strategy="deepspeed", parallel__deepspeed__zero_stage=3),
     "early_stopping keeps the best weights"),
    (dict(curriculum={"score": "column:"}), "curriculum: score 'column:': length, loss or column:NAME"),
    (dict(curriculum={"score": "quality"}), "score 'quality': length, loss or column:NAME"),
    (dict(curriculum={"score": "column:quality", "proxy": "x"}), "proxy is only for loss"),
])
def test_bad_parallel_configs(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("[", r"\[")):
        load_run(write_config(tmp_path / "c.yaml", _cfg(**over)))


def test_cli_rejects_before_any_worker(tmp_path):
    path = write_config(tmp_path / "c.yaml", _cfg(parallel__pp_size=3, scaling__num_workers=3))
    proc = subprocess.run([*lmfleet_cmd(), "run", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "stages.pretrain" in proc.stderr and "pp_size 3" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr


def test_missing_data_is_an_input_error(tmp_path):
    path = write_config(tmp_path / "c.yaml", _cfg())
    proc = subprocess.run([*lmfleet_cmd(), "run", str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "no packed data" in proc.stderr and "Traceback" not in proc.stderr
