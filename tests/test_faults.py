"""The Ray head dies under a running job (a head started like a user's): the resubmitted job resumes
from the last checkpoint in the run's storage_path, an S3 bucket (the cloud set-up: run dir on a shared
filesystem, checkpoints on the object store)."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import lmfleet_cmd, ray_head, registered_steps, write_config

pytestmark = pytest.mark.slow

STEPS = 40


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_resubmit_after_the_head_died_resumes_from_the_last_checkpoint_in_s3(tmp_path, packed, s3):
    env, bucket = s3
    project, run = tmp_path / "project", tmp_path / "runs" / "faulty"
    project.mkdir()
    stage = {"data": str(packed), "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 32},
             "batch": {"global_batch": 8, "micro_batch": 4}, "steps": STEPS,
             "scaling": {"num_workers": 1, "cpus_per_worker": 1}, "checkpoint": {"every": 5},
             "eval": {"every": 1000, "batches": 1}, "log_every": 1, "export": False}
    write_config(project / "job.yaml", {"name": "faulty", "output_dir": str(run), "storage_path": "s3://lmfleet/ckpt",
                                        "stages": {"pretrain": stage}})
    storage = "lmfleet/ckpt/faulty/pretrain"

    def submit(url, *args):  # the credentials and endpoint reach the job through its runtime env only
        credentials = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
        return subprocess.run([*lmfleet_cmd(), "submit", "job.yaml", "--address", url, *credentials, *args],
                              cwd=project, capture_output=True, text=True, timeout=600)

    with ray_head(num_cpus=2, dashboard=True) as (_, url, _add, _temp):
        started = submit(url, "--no-wait")
        assert started.returncode == 0, started.stderr[-3000:]
        deadline = time.time() + 300
        while time.time() < deadline and not [s for s in registered_steps(run, bucket, storage) if s >= 10]:
            time.sleep(0.2)
        lost_at = max(r.get("step", 0) for r in _records(run / "metrics.jsonl"))
    # Leaving the block SIGKILLs every process of that cluster: the head, its job and the workers.
    assert 10 <= lost_at < STEPS, lost_at
    last = max(registered_steps(run, bucket, storage))
    assert json.loads((run / "pretrain" / "stage.json").read_text())["status"] == "running"

    with ray_head(num_cpus=2, dashboard=True) as (_, url, _add, _temp):
        again = submit(url)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming its interrupted run" in again.stderr
    steps = [r["step"] for r in _records(run / "metrics.jsonl") if "loss" in r]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == last + 1, (steps, last)  # from the last registered checkpoint, not step 1
    assert steps[-1] == STEPS and steps[restart:] == list(range(last + 1, STEPS + 1))
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "succeeded" and report["stages"]["pretrain"]["steps"] == STEPS
    assert report["stages"]["pretrain"]["checkpoint"] == f"s3://{storage}/train/step_{STEPS:08d}"
    assert max(registered_steps(run, bucket, storage)) == STEPS
    assert not (run / "pretrain" / "ray").exists()  # no checkpoint on the run dir's filesystem

