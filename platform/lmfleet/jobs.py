"""Ray jobs: `lmfleet submit` (this directory uploaded as the job's working dir) and chains of follow-on
jobs, each stage its own Ray job, started when the previous one succeeded, reading its output dir.

A chain is driven either
- from the user's shell: `lmfleet run CONFIG --address http://HEAD:8265`. Each job runs `lmfleet run
  CONFIG --stage NAME` from the submitting directory: the cluster must share this filesystem (a local
  head, NFS); or
- from a job on the cluster: `lmfleet submit` of a pipeline submits `lmfleet run CONFIG --chain`, which
  submits each stage with its own runtime env (the uploaded working dir): the chain outlives the laptop.
Stages that are up to date get no job. A failed job stops the chain; its log tail and status message
say why.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from lmfleet import console, outputs
from lmfleet.errors import StageFailed, UserError
from lmfleet.outputs import child
from lmfleet.upload import SECRET_EXCLUDES, UPLOAD_EXCLUDES, describe, scan
from lmfleet.uri import is_uri

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def is_job_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def use_token_if_present() -> None:
    """Send the cluster's auth token when one is on this machine, as `ray.init` does (Ray 2.60 heads
    reject the job API without it, and Ray's job client only sends it once token mode is on)."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def stage_command(config: Path, stage: str, overrides: list[str], force: bool, workdir: str | None) -> str:
    """The entrypoint of one stage's job; `workdir`: cd there first (None: the job's own working dir)."""
    # --address auto: the job's driver joins its cluster (never the job API again, whatever the config says).
    args = ["lmfleet", "run", str(config), "--stage", stage, "--address", "auto", *(["--force"] if force else []),
            *(["-v"] if console.verbose() else [])]
    for item in overrides:
        args += ["--set", item]
    return f"cd {shlex.quote(workdir)} && {shlex.join(args)}" if workdir else shlex.join(args)


def _submit(client, wait_s: float = 120.0, **job) -> str:
    """submit_job, retried while a just-started head has no job agent yet (HTTP 500 'No available agent')."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                # e.g. a submission id in use, a runtime env the head rejects: the API's own words
                raise UserError(f"the Ray job API refused job {job.get('submission_id')}: {err}") from None
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
    local = {"output_dir": loaded.config.output_dir or f"runs/{loaded.config.name}",
             "storage_path": loaded.config.storage_path}
    for key, path in local.items():
        if path is not None and not is_uri(path) and not Path(path).is_absolute():
            raise UserError(f"{config}: {key} {path!r} is relative: it would land in the job's temporary copy of "
                            f"this directory. Set {key} (--set {key}=...) to an object store URI (s3://, gs://, "
                            "abfs://) or a path every node of the cluster shares.")
    env_vars = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    runtime_env: dict = {"working_dir": ".", "excludes": [*UPLOAD_EXCLUDES, *SECRET_EXCLUDES, *excludes]}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = list(pip)
    selected = [s.name for s in loaded.stages if not stages or s.name in stages]
    # A pipeline runs as a chain driven by a job on the cluster (--chain); one stage as that stage's job.
    args = ["lmfleet", "run", str(relative), *(["--chain"] if len(selected) > 1 else ["--address", "auto"])]
    for item in overrides:
        args += ["--set", item]
    for stage in stages or []:
        args += ["--stage", stage]
    if force:
        args.append("--force")
    if console.verbose():
        args.append("-v")
    client = client_for(address)
    for line in describe(scan(Path.cwd(), excludes), Path.cwd()):
        print(line, file=sys.stderr)
    job_id = _submit(client, entrypoint=shlex.join(args), runtime_env=runtime_env,
                     submission_id=f"lmfleet-{loaded.config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                     metadata={"lmfleet_run": loaded.config.name, "lmfleet_stages": ",".join(selected)})
    return client, job_id


def follow(client, job_id: str) -> str:
    """Stream the job's log to stderr until it ends (Ctrl-C stops the job); returns its final status."""
    try:
        return _follow(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise UserError(f"interrupted: stopped Ray job {job_id}") from None


def run_as_jobs(loaded, config: Path, overrides: list[str], address: str, only: list[str] | None = None,
                force: bool = False, runtime_env: dict | None = None) -> dict:
    """Submit the stages of `loaded` one job at a time; returns the run report the jobs wrote.
    runtime_env: every job's (with its working dir); None: the jobs run from this directory."""
    from lmfleet.runner import preflight, up_to_date, write_report_html

    run_dir = loaded.config.run_dir
    stages = [s for s in loaded.stages if not only or s.name in only]
    preflight(loaded, stages, run_dir)  # inputs and the run dir checked before the first job starts
    client = client_for(address)
    overrides = [*overrides, f"output_dir={run_dir}"]
    storage = loaded.config.storage_path
    if storage is not None and not is_uri(storage):
        overrides.append(f"storage_path={Path(storage).resolve()}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    jobs = []
    for spec in stages:
        if not force and up_to_date(loaded, spec, run_dir):
            print(f"stage {spec.name}: up to date (same config, seed, code and inputs): no job; --force "
                  "re-runs it", file=sys.stderr)
            jobs.append({"stage": spec.name, "job_id": None, "status": "UP_TO_DATE"})
            continue
        job_id = _submit(
            client,
            entrypoint=stage_command(config if runtime_env else config.resolve(), spec.name, overrides, force,
                                     None if runtime_env else os.getcwd()),
            submission_id=f"lmfleet-{loaded.config.name}-{spec.name}-{stamp}",
            metadata={"lmfleet_run": loaded.config.name, "lmfleet_stage": spec.name},
            **({"runtime_env": runtime_env} if runtime_env else {}),
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
    report_path = child(run_dir, "report.json")
    report = outputs.read_json(report_path)
    report["jobs"] = jobs
    report["seconds"] = round(time.perf_counter() - started, 3)  # the chain's, not its last job's
    outputs.write_text(report_path, json.dumps(report, indent=2))
    write_report_html(run_dir)
    return report


def run_chain(loaded, config: Path, overrides: list[str], only: list[str] | None = None, force: bool = False) -> dict:
    """Inside a Ray job (what `lmfleet submit` starts for a pipeline): run each stage as its own Ray job on
    this job's cluster, with this job's runtime env (its uploaded working dir, env vars, pip packages)."""
    import ray

    try:
        context = ray.init(address="auto", log_to_driver=False)
    except ConnectionError as err:
        raise UserError(f"--chain runs inside a Ray job on a cluster (`lmfleet submit` starts it): {err}") from None
    runtime_env = dict(ray.get_runtime_context().runtime_env)
    ray.shutdown()  # the stage jobs are the drivers
    if not context.dashboard_url:
        raise UserError("--chain: this Ray cluster has no dashboard, so no job API to submit the stages to")

    def stop(signum, frame):  # `ray job stop` sends SIGTERM: stop the running stage's job too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return run_as_jobs(loaded, config, overrides, f"http://{context.dashboard_url}", only, force,
                       runtime_env=runtime_env or None)
