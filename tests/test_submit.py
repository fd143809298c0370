"""`lmfleet submit` and `lmfleet jobs` against a Ray head started like a user's (`ray start --head`):
the working dir is uploaded without history, outputs or checkpoints; logs, status, stop, a failing job."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmfleet.jobs import TERMINAL

from conftest import lmfleet_cmd, shared, write_config

pytestmark = pytest.mark.slow


def _lmfleet(*args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*lmfleet_cmd(), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _project(tmp_path, packed):
    """A user's project dir: configs, plus what must not be uploaded (.git, old runs, checkpoints)."""
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "runs" / "old").mkdir(parents=True)
    (project / "runs" / "old" / "model.safetensors").write_bytes(b"\0" * 1024)
    (project / "notes.txt").write_text("uploaded\n")
    # Credentials a project folder often holds: never uploaded, named in a warning.
    for secret in (".env", ".aws/credentials", ".ssh/id_ed25519", "id_rsa", ".netrc", "secrets.json"):
        (project / secret).parent.mkdir(parents=True, exist_ok=True)
        (project / secret).write_text("s3cr3t\n")
    (project / ".gitignore").write_text("scratch.log\n")
    (project / "scratch.log").write_text("ignored by git, so not uploaded\n")
    data = {"sources": [{"name": "plays", "format": "text", "text_unit": "block",
                         "paths": [str(shared("tinyshakespeare.txt"))]}],
            "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32}}
    write_config(project / "jobs" / "data.yaml", {"name": "up", "stages": {"data": data}})
    long = {"data": str(packed), "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
                                           "max_seq_len": 32},
            "steps": 100000, "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "log_every": 50,
            "checkpoint": {"every": 100000}, "eval": {"every": 100000}, "export": False}
    # A pipeline: submitted as a chain, a job on the cluster submitting one job per stage.
    write_config(project / "jobs" / "long.yaml", {"name": "long", "stages": {
        "warmup": {"kind": "pretrain", **long}, "more": {"kind": "pretrain", **long}}})
    write_config(project / "jobs" / "broken.yaml", {"name": "broken", "stages": {"pretrain": {**long, "data": "/nope"}}})
    return project


def test_submit_logs_status_stop(tmp_path, job_api, packed):
    from ray.job_submission import JobSubmissionClient

    from lmfleet.jobs import use_token_if_present

    url, head_temp = job_api
    project = _project(tmp_path, packed)
    out = tmp_path / "runs"

    # A relative output_dir would land in the job's temporary copy of the project: refused up front.
    refused = _lmfleet("submit", "jobs/data.yaml", "--address", url, cwd=project)
    assert refused.returncode == 2 and "output_dir 'runs/up' is relative" in refused.stderr

    done = _lmfleet("submit", "jobs/data.yaml", "--address", url, "--set", f"output_dir={out / 'up'}",
                    "--env", "LMFLEET_NOTE=hello", cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run up: succeeded" in done.stderr and "Ray job lmfleet-up-" in done.stderr
    assert json.loads((out / "up" / "report.json").read_text())["status"] == "succeeded"
    use_token_if_present()
    client = JobSubmissionClient(url)
    (job,) = [j for j in client.list_jobs() if (j.metadata or {}).get("lmfleet_run") == "up"]
    assert job.runtime_env["env_vars"] == {"LMFLEET_NOTE": "hello"}
    # What the head unpacked as the job's working dir: the project without .git, runs/ or checkpoints.
    (uploaded,) = {p.parent.parent for p in head_temp.glob("**/working_dir_files/*/jobs/data.yaml")}
    assert (uploaded / "notes.txt").exists() and (uploaded / "jobs" / "long.yaml").exists()
    assert not (uploaded / ".git").exists() and not (uploaded / "runs").exists()
    assert sorted(str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file()) == [
        ".gitignore", "jobs/broken.yaml", "jobs/data.yaml", "jobs/long.yaml", "notes.txt"]
    assert "uploading 5 files (" in done.stderr
    assert ("not uploaded, as they look like credentials: .aws/credentials, .env, .netrc, .ssh/id_ed25519, id_rsa, "
            "secrets.json") in done.stderr

    # Plain Ray's CLI does the same (README): the stage is up to date in the shared run dir, so it is skipped.
    plain = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", url,
                            "--working-dir", ".", "--", "lmfleet", "run", "jobs/data.yaml", "--address", "auto",
                            "--set", f"output_dir={out / 'up'}"], capture_output=True, text=True, cwd=project,
                           timeout=600)
    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-3000:]
    assert "up to date" in plain.stdout + plain.stderr and "run up: succeeded" in plain.stdout + plain.stderr

    # --no-wait prints the id; status, logs and stop wrap the same client. Stopping a chain stops its stage's job.
    started = _lmfleet("submit", "jobs/long.yaml", "--address", url, "--set", f"output_dir={out / 'long'}",
                       "--no-wait", cwd=project)
    assert started.returncode == 0, started.stderr[-3000:]
    job_id = started.stdout.strip()
    deadline = time.time() + 300
    while "[warmup] train ..." not in client.get_job_logs(job_id) and time.time() < deadline:
        time.sleep(1)
    assert _lmfleet("jobs", "status", job_id, "--address", url, cwd=project).stdout.startswith("RUNNING")
    stop = _lmfleet("jobs", "stop", job_id, "--address", url, cwd=project)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    followed = _lmfleet("jobs", "logs", job_id, "--address", url, "--follow", cwd=project)
    assert followed.returncode == 130  # STOPPED
    assert _lmfleet("jobs", "status", job_id, "--address", url, cwd=project).stdout.startswith("STOPPED")
    assert "stage warmup: submitted Ray job" in _lmfleet("jobs", "logs", job_id, "--address", url, cwd=project).stdout
    (stage_job,) = [j for j in client.list_jobs() if (j.metadata or {}).get("lmfleet_run") == "long"
                    and j.submission_id != job_id]
    assert stage_job.metadata["lmfleet_stage"] == "warmup"
    while client.get_job_status(stage_job.submission_id).value not in TERMINAL and time.time() < deadline:
        time.sleep(1)
    assert client.get_job_status(stage_job.submission_id).value == "STOPPED"

    # A failing job: the submit exits 1 and its streamed log says why.
    failed = _lmfleet("submit", "jobs/broken.yaml", "--address", url, "--set", f"output_dir={out / 'broken'}",
                      cwd=project)
    assert failed.returncode == 1 and "pretrain.data '/nope': no packed data" in failed.stderr
    assert "FAILED" in failed.stderr
    unknown = _lmfleet("jobs", "status", "lmfleet-no-such-job", "--address", url, cwd=project)
    assert unknown.returncode == 2 and "lmfleet-no-such-job" in unknown.stderr
