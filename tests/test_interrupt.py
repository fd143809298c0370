"""Ctrl-C of a running stage (SIGINT to `lmfleet run`'s process group, as a terminal sends it): the stage
is recorded as interrupted, the command exits 130, and the same command resumes the stage from its last
checkpoint, for pretraining and an HF-trainer stage (SFT). (The RL stages resume through the same runner
path and restore from the same checkpoints a restarted worker group does: tests/test_posttrain.py checks
PPO and GRPO reproduce the uninterrupted run after a worker's SIGKILL.)"""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import assert_quiet, lmfleet_cmd, pretrain_stage, shared, write_config

pytestmark = pytest.mark.slow


def _checkpoints(snapshot) -> int:
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or being written
        return 0


def _tail(path) -> str:
    return path.read_text(errors="replace")[-3000:]


def interrupt_then_resume(tmp_path, stage: str, stage_config: dict, key: str) -> tuple[list[int], list[int]]:
    """Run a one-stage config, SIGINT it once Ray Train registered a checkpoint, check it is recorded as
    interrupted, run the same command again; returns the `key` values (step / iteration) each run logged."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", {"name": "ctrl-c", "output_dir": str(out), "ray": {"num_cpus": 2},
                                                "stages": {stage: stage_config}})
    command = [*lmfleet_cmd(), "run", str(config)]
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    snapshot = out / stage / "ray" / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while _checkpoints(snapshot) == 0:
        assert proc.poll() is None, f"ended before a checkpoint was registered:\n{_tail(first_log)}"
        assert time.monotonic() < deadline, _tail(first_log)
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # the whole foreground job, as Ctrl-C
    assert proc.wait(timeout=180) == 130, _tail(first_log)
    assert json.loads((out / stage / "stage.json").read_text())["status"] == "interrupted"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted" and report["failed_stage"] == stage
    assert "the same command resumes it from its last checkpoint" in first_log.read_text()

    second_start = time.time()
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"stage {stage}: resuming its interrupted run" in again.stderr
    assert json.loads((out / stage / "stage.json").read_text())["status"] == "succeeded"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["time"], r[key]) for r in records if r.get("stage") == stage and key in r]
    first, second = [v for t, v in logged if t < second_start], [v for t, v in logged if t >= second_start]
    # Its console: lmfleet's lines only, progress lines to the last step (Ray's output is in logs/<stage>.log).
    assert_quiet(again.stderr, len(second) + 20)
    assert f"[{stage}] {key} {second[-1]}" in again.stderr
    return first, second


def test_ctrl_c_of_pretraining_resumes_from_its_checkpoint(tmp_path, packed):
    steps, every = 300, 50
    stage = pretrain_stage(packed, steps=steps, model__d_model=128, model__n_heads=4, checkpoint__every=every,
                           log_every=1)
    first, second = interrupt_then_resume(tmp_path, "pretrain", stage, "step")
    assert first[0] == 1 and max(first) < steps
    # Resumed right after a registered checkpoint (not from step 1) and trained to the end.
    assert second[0] > 1 and (second[0] - 1) % every == 0, second[:3]
    assert second == list(range(second[0], steps + 1))


def test_ctrl_c_of_sft_resumes_from_its_checkpoint(tmp_path, base_lm):
    steps, every = 30, 5
    stage = {"kind": "sft", "model": str(base_lm),
             "dataset": {"paths": [str(shared("alpaca_5000.json"))], "max_records": 400, "val_fraction": 0.0},
             "training": {"max_length": 128, "max_steps": steps}, "batch": {"micro_batch": 8}, "log_every": 1,
             "checkpoint": {"every": every},
             "scaling": {"num_workers": 1}, "eval": {"samples": 0}}
    first, second = interrupt_then_resume(tmp_path, "sft", stage, "step")
    assert first[0] == 1 and max(first) < steps
    assert second[0] > 1 and (second[0] - 1) % every == 0, second[:3]
    assert sorted(set(second)) == list(range(second[0], steps + 1))  # (the trainer's summary logs the last again)
