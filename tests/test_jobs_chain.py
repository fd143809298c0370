"""Post-training as follow-on Ray jobs against a Ray head started like a user's (`ray start --head`):
SFT -> reward -> PPO as three jobs, each reading the previous output; a failing stage stops the chain."""

import json
import subprocess

from conftest import lmfleet_cmd, shared, write_config

TRAIN = {"max_steps": 3, "per_device_batch": 4, "max_length": 128, "logging_steps": 1, "save_steps": 100}


def _run(config, address, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*lmfleet_cmd(), "run", str(config), "--address", address], capture_output=True,
                          text=True, timeout=900, cwd=cwd)


def test_pipeline_runs_as_chained_jobs(tmp_path, job_api, base_lm):
    url, _ = job_api
    from ray.job_submission import JobSubmissionClient

    from lmfleet.jobs import use_token_if_present

    alpaca = {"paths": [str(shared("alpaca_5000.json"))], "max_records": 48, "val_fraction": 0.1}
    hh = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 64, "val_fraction": 0.1}
    config = write_config(tmp_path / "pipeline.yaml", {"name": "chain", "output_dir": "out", "stages": {
        "sft": {"model": str(base_lm), "dataset": alpaca, "training": TRAIN, "eval": {"samples": 2}},
        "reward": {"model": "sft", "dataset": hh, "training": {**TRAIN, "max_length": 256}},
        "ppo": {"model": "sft", "reward_model": "reward", "dataset": alpaca, "iterations": 2,
                "ppo": {"rollout_batch": 4, "mini_batch": 2}, "generation": {"max_new_tokens": 8},
                "training": {"max_length": 128}, "eval": {"samples": 2}},
    }})
    result = _run(config, url, tmp_path)  # output_dir is relative: jobs must run where we submitted
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["stages"]) == ["sft", "reward", "ppo"]
    assert [j["stage"] for j in report["jobs"]] == ["sft", "reward", "ppo"]
    assert report["seconds"] > sum(sum(s["seconds"].values()) for s in report["stages"].values())  # whole chain
    use_token_if_present()
    client = JobSubmissionClient(url)
    for job in report["jobs"]:
        info = client.get_job_info(job["job_id"])
        assert info.status == "SUCCEEDED" and info.metadata["lmfleet_stage"] == job["stage"]
    assert (tmp_path / "out" / "ppo" / "model" / "config.json").exists()
    assert "[ppo]" in result.stdout


def test_failing_stage_stops_the_chain(tmp_path, job_api, base_lm):
    url, _ = job_api
    hh = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 16}
    config = write_config(tmp_path / "failing.yaml", {"name": "broken", "output_dir": str(tmp_path / "out"), "stages": {
        # every pair is longer than 16 tokens: the reward stage has nothing to train on
        "reward": {"model": str(base_lm), "dataset": hh, "training": {**TRAIN, "max_length": 16},
                   "eval": {"generation": {"max_new_tokens": 4}}},
        "ppo": {"model": str(base_lm), "reward_model": "reward", "dataset": hh, "iterations": 1},
    }})
    result = _run(config, url, tmp_path)
    assert result.returncode == 1
    assert "stage 'reward' failed" in result.stderr
    assert "no pairs left to train on" in result.stderr  # the stage's own error, from its job's log
    assert "later stages not started: ['ppo']" in result.stderr
    assert not (tmp_path / "out" / "ppo").exists()
