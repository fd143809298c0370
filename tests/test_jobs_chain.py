"""Post-training as follow-on Ray jobs against a Ray head started like a user's (`ray start --head`):
SFT -> reward -> PPO as three jobs, each reading the previous output; a failing stage stops the chain."""

import json
import subprocess

from conftest import lmfleet_cmd, shared, write_config

TRAIN = {"max_steps": 3, "per_device_batch": 4, "max_length": 128, "logging_steps": 1, "save_steps": 100}


def _lmfleet(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*lmfleet_cmd(), *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def test_submitted_pipeline_runs_as_chained_jobs(tmp_path, job_api, base_lm):
    """`lmfleet submit` of a pipeline: a job on the cluster drives the chain, each stage's job gets the
    uploaded working dir; submitting again finds every stage up to date and starts no stage job."""
    url, _ = job_api
    from ray.job_submission import JobSubmissionClient

    from lmfleet.jobs import use_token_if_present

    project, out = tmp_path / "project", tmp_path / "out"
    project.mkdir()
    alpaca = {"paths": [str(shared("alpaca_5000.json"))], "max_records": 48, "val_fraction": 0.1}
    hh = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 64, "val_fraction": 0.1}
    write_config(project / "pipeline.yaml", {"name": "chain", "output_dir": str(out), "stages": {
        "sft": {"model": str(base_lm), "dataset": alpaca, "training": TRAIN, "eval": {"samples": 2}},
        "reward": {"model": "sft", "dataset": hh, "training": {**TRAIN, "max_length": 256}},
        "ppo": {"model": "sft", "reward_model": "reward", "dataset": alpaca, "iterations": 2,
                "ppo": {"rollout_batch": 4, "mini_batch": 2}, "generation": {"max_new_tokens": 8},
                "training": {"max_length": 128}, "eval": {"samples": 2}},
    }})
    result = _lmfleet("submit", "pipeline.yaml", "--address", url, cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["sft", "reward", "ppo"]
    assert [j["stage"] for j in report["jobs"]] == ["sft", "reward", "ppo"]
    assert report["seconds"] > sum(sum(s["seconds"].values()) for s in report["stages"].values())  # whole chain
    use_token_if_present()
    client = JobSubmissionClient(url)
    (chain,) = [j for j in client.list_jobs() if (j.metadata or {}).get("lmfleet_stages") == "sft,reward,ppo"]
    assert chain.status == "SUCCEEDED" and "--chain" in chain.entrypoint
    for job in report["jobs"]:
        info = client.get_job_info(job["job_id"])
        assert info.status == "SUCCEEDED" and info.metadata["lmfleet_stage"] == job["stage"]
        assert info.runtime_env["working_dir"] == chain.runtime_env["working_dir"]  # the one upload
        assert info.runtime_env["working_dir"].startswith("gcs://")
    assert (out / "ppo" / "model" / "config.json").exists()
    assert "[ppo]" in result.stderr  # the chain's summary, in its job's log

    again = _lmfleet("submit", "pipeline.yaml", "--address", url, cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date (same config, seed, code and inputs): no job") == 3
    stage_jobs = [j for j in client.list_jobs() if "lmfleet_stage" in (j.metadata or {})]
    assert len(stage_jobs) == 3


def test_failing_stage_stops_the_chain(tmp_path, job_api, base_lm):
    url, _ = job_api
    hh = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 16}
    config = write_config(tmp_path / "failing.yaml", {"name": "broken", "output_dir": str(tmp_path / "out"), "stages": {
        # every pair is longer than 16 tokens: the reward stage has nothing to train on
        "reward": {"model": str(base_lm), "dataset": hh, "training": {**TRAIN, "max_length": 16},
                   "eval": {"generation": {"max_new_tokens": 4}}},
        "ppo": {"model": str(base_lm), "reward_model": "reward", "dataset": hh, "iterations": 1},
    }})
    result = _lmfleet("run", str(config), "--address", url, cwd=tmp_path)  # driven from here, not uploaded
    assert result.returncode == 1
    assert "stage 'reward' failed" in result.stderr
    assert "no pairs left to train on" in result.stderr  # the stage's own error, from its job's log
    assert "later stages not started: ['ppo']" in result.stderr
    assert not (tmp_path / "out" / "ppo").exists()
