"""Follow-on Ray jobs: each stage of a config runs as its own Ray job on a cluster, started when the
previous one succeeded, reading the previous stage's output dir.

`lmfleet run CONFIG --address http://HEAD:8265` (a Ray job API address) takes this path. Every job
runs `lmfleet run CONFIG --stage NAME` with the same overrides and an absolute `output_dir`, from
the submitting directory: the cluster must share this filesystem (a local Ray head, NFS). A failed
job stops the chain; its log tail and status message say why.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from lmfleet.errors import UserError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class StageFailed(UserError):
    """A stage's job ended without success (the chain stops there)."""


def is_job_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def use_token_if_present() -> None:
    """Send the cluster's auth token when one is on this machine, as `ray.init` does (Ray 2.60 heads
    reject the job API without it, and Ray's job client only sends it once token mode is on)."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def stage_command(config: Path, stage: str, overrides: list[str], force: bool = False) -> str:
    # --address auto: the job's driver joins its cluster (never the job API again, whatever the config says).
    args = ["lmfleet", "run", str(config), "--stage", stage, "--address", "auto", *(["--force"] if force else [])]
    for item in overrides:
        args += ["--set", item]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(args)}"


def _submit(client, wait_s: float = 120.0, **job) -> str:
    """submit_job, retried while a just-started head has no job agent yet (HTTP 500 'No available agent')."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _follow(client, job_id: str, poll_s: float = 1.0) -> str:
    """Print the job's new log lines until it ends; returns its final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stderr.write(logs[printed:])
            sys.stderr.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


# Never uploaded with the working dir: history, environments, run outputs, data and checkpoints (jobs
# read those from storage every node shares). Gitignore syntax, as Ray's runtime_env `excludes`.
UPLOAD_EXCLUDES = [".git", ".venv", "runs/", "data/", "checkpoints/", "**/__pycache__", "*.safetensors", "*.pt",
                   "*.bin", "*.distcp", "*.parquet", "*.arrow"]


def client_for(address: str):
    """A JobSubmissionClient for `address` (http://HEAD:8265), or a UserError saying why not."""
    from ray.job_submission import JobSubmissionClient

    if not is_job_address(address):
        raise UserError(f"--address {address!r}: expected the Ray job API, http://HEAD:8265 (or set RAY_ADDRESS)")
    use_token_if_present()
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection refused, not a job API, ...
        raise UserError(f"--address {address}: cannot reach the Ray job API ({err})") from None


def submit(config: Path, address: str, overrides: list[str], env: list[str], pip: list[str],
           excludes: list[str], stages: list[str] | None, force: bool = False) -> tuple[object, str]:
    """Submit `lmfleet run CONFIG` as one Ray job that uploads the current directory; returns (client, id)."""
    from lmfleet.runner import load_run

    loaded = load_run(config, overrides)
    unknown = sorted(set(stages or []) - {s.name for s in loaded.stages})
    if unknown:
        raise UserError(f"{config}: --stage {', '.join(unknown)}: not a stage of this config")
    try:
        relative = config.resolve().relative_to(Path.cwd())
    except ValueError:
        raise UserError(f"{config}: must be inside the current directory, which is uploaded as the job's "
                        "working dir") from None
    if not loaded.config.run_dir.is_absolute():
        raise UserError(f"{config}: output_dir {str(loaded.config.run_dir)!r} is relative: it would land in the "
                        "job's temporary copy of this directory. Set output_dir (--set output_dir=...) to a path "
                        "every node of the cluster shares.")
    env_vars = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    runtime_env: dict = {"working_dir": ".", "excludes": [*UPLOAD_EXCLUDES, *excludes]}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = list(pip)
    args = ["lmfleet", "run", str(relative), "--address", "auto"]
    for item in overrides:
        args += ["--set", item]
    for stage in stages or []:
        args += ["--stage", stage]
    if force:
        args.append("--force")
    client = client_for(address)
    job_id = _submit(client, entrypoint=shlex.join(args), runtime_env=runtime_env,
                     submission_id=f"lmfleet-{loaded.config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                     metadata={"lmfleet_run": loaded.config.name})
    return client, job_id


def follow(client, job_id: str) -> str:
    """Stream the job's log to stderr until it ends (Ctrl-C stops the job); returns its final status."""
    try:
        return _follow(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise UserError(f"interrupted: stopped Ray job {job_id}") from None


def run_as_jobs(loaded, config: Path, overrides: list[str], address: str, only: list[str] | None = None,
                force: bool = False) -> dict:
    """Submit the stages of `loaded` one job at a time; returns the run report the jobs wrote."""
    run_dir = loaded.config.run_dir.resolve()
    stages = [s for s in loaded.stages if not only or s.name in only]
    for i, spec in enumerate(stages):  # inputs checked before the first job starts
        spec.preflight({s.name for s in stages[:i]}, run_dir)
    client = client_for(address)
    overrides = [*overrides, f"output_dir={run_dir}"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    jobs = []
    for spec in stages:
        job_id = _submit(
            client,
            entrypoint=stage_command(config.resolve(), spec.name, overrides, force),
            submission_id=f"lmfleet-{loaded.config.name}-{spec.name}-{stamp}",
            metadata={"lmfleet_run": loaded.config.name, "lmfleet_stage": spec.name},
        )
        print(f"stage {spec.name}: submitted Ray job {job_id}", file=sys.stderr)
        try:
            status = _follow(client, job_id)
        except KeyboardInterrupt:  # Ctrl-C stops the chain and the running stage, not just this client
            client.stop_job(job_id)
            raise StageFailed(f"interrupted: stopped Ray job {job_id} (stage {spec.name!r})") from None
        jobs.append({"stage": spec.name, "job_id": job_id, "status": status})
        if status != "SUCCEEDED":
            message = client.get_job_info(job_id).message or ""
            tail = "\n".join(client.get_job_logs(job_id).strip().splitlines()[-5:])
            raise StageFailed(f"stage {spec.name!r} failed (Ray job {job_id}, {status}): {message}\n{tail}\n"
                              f"later stages not started: {[s.name for s in stages[len(jobs):]]}")
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    report["jobs"] = jobs
    report["seconds"] = round(time.perf_counter() - started, 3)  # the chain's, not its last job's
    report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
