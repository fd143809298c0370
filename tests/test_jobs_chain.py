"""Stages as follow-on Ray jobs against a Ray head started like a user's (`ray start --head`): a failing
stage stops the chain. (A submitted chain of every stage: tests/test_shared_nothing.py.)"""

import subprocess

from conftest import lmfleet_cmd, shared, write_config

HF = {"batch": {"micro_batch": 4}, "log_every": 1, "checkpoint": {"every": 100}}


def _lmfleet(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*lmfleet_cmd(), *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def test_failing_stage_stops_the_chain(tmp_path, job_api, base_lm):
    url, _ = job_api
    hh = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 16}
    config = write_config(tmp_path / "failing.yaml", {"name": "broken", "output_dir": str(tmp_path / "out"), "stages": {
        # every pair is longer than 16 tokens: the reward stage has nothing to train on
        "reward": {"model": str(base_lm), "dataset": hh, "training": {"max_steps": 3, "max_length": 16}, **HF},
        "ppo": {"model": str(base_lm), "reward_model": "reward", "dataset": hh, "iterations": 1},
    }})
    result = _lmfleet("run", str(config), "--address", url, cwd=tmp_path)  # driven from here, not uploaded
    assert result.returncode == 1
    assert "stage 'reward' failed" in result.stderr
    assert "no records left to train on" in result.stderr  # the stage's own error, from its job's log
    assert "later stages not started: ['ppo']" in result.stderr
    assert not (tmp_path / "out" / "ppo").exists()
