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


def stage_command(config: Path, stage: str, overrides: list[str]) -> str:
    # --address auto: the job's driver joins its cluster (never the job API again, whatever the config says).
    args = ["lmfleet", "run", str(config), "--stage", stage, "--address", "auto"]
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


def run_as_jobs(loaded, config: Path, overrides: list[str], address: str, only: list[str] | None = None) -> dict:
    """Submit the stages of `loaded` one job at a time; returns the run report the jobs wrote."""
    from ray.job_submission import JobSubmissionClient

    run_dir = loaded.config.run_dir.resolve()
    stages = [s for s in loaded.stages if not only or s.name in only]
    for i, spec in enumerate(stages):  # inputs checked before the first job starts
        spec.preflight({s.name for s in stages[:i]}, run_dir)
    use_token_if_present()
    try:
        client = JobSubmissionClient(address)
    except Exception as err:  # connection refused, not a job API, ...
        raise UserError(f"--address {address}: cannot reach the Ray job API ({err})") from None
    overrides = [*overrides, f"output_dir={run_dir}"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    jobs = []
    for spec in stages:
        job_id = _submit(
            client,
            entrypoint=stage_command(config.resolve(), spec.name, overrides),
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
