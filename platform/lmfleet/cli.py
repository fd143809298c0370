"""`lmfleet` command line: run, validate and submit stage configs; follow Ray jobs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmfleet.errors import StageFailed, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: KEY.PATH=VALUE (VALUE parsed as YAML). Repeatable."),
]


def _fail(err: UserError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also show what Ray, its workers and the "
                                                                 "libraries they run print (always in the run's "
                                                                 "logs/<stage>.log).")]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Stage or pipeline YAML.")],
    set_: SetOpt = None,
    address: Annotated[
        str | None, typer.Option(help="Ray address (default RAY_ADDRESS, else an embedded local Ray); "
                                      "http://HEAD:8265 runs each stage as a Ray job.")
    ] = None,
    stage: Annotated[list[str] | None, typer.Option(help="Run only these stages of the config.")] = None,
    force: Annotated[bool, typer.Option(help="Re-run stages that are up to date.")] = False,
    chain: Annotated[bool, typer.Option(help="Inside a Ray job (`lmfleet submit` of a pipeline): run each "
                                             "stage as its own Ray job on this cluster.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run a stage, or a pipeline of stages, on Ray.

    Stages that already succeeded with the same config, after their inputs, are skipped (--force
    re-runs them). With a Ray job API address (http://HEAD:8265) each stage runs as its own Ray job."""
    from lmfleet import console, jobs, runner

    console.set_verbose(verbose)
    try:
        loaded = runner.load_run(config, set_)
        unknown = sorted(set(stage or []) - {s.name for s in loaded.stages})
        if unknown:
            raise UserError(f"{config}: --stage {', '.join(unknown)}: not a stage of this config")
        address = address or loaded.config.ray.address or os.environ.get("RAY_ADDRESS")
        if chain:
            report = jobs.run_chain(loaded, config, set_ or [], only=stage, force=force)
        elif jobs.is_job_address(address):
            report = jobs.run_as_jobs(loaded, config, set_ or [], address, only=stage, force=force)
        else:
            report = runner.run(loaded, address=address, only=stage, force=force)
    except StageFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except UserError as err:
        _fail(err)
    except KeyboardInterrupt as err:
        typer.echo(f"interrupted{f': {err}' if str(err) else ''}", err=True)
        raise typer.Exit(130) from None
    except Exception as err:
        failure = getattr(err, "lmfleet_failure", None)
        if failure is None:  # not a stage's crash: lmfleet's own bug, with its traceback
            raise
        typer.echo(f"error: {console.failure_block(err, failure)}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summarize(report))


AddressOpt = Annotated[str | None, typer.Option(help="Ray job API, http://HEAD:8265 (default: RAY_ADDRESS).")]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


def _job_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="Stage or pipeline YAML, inside the current directory.")],
    address: AddressOpt = None,
    set_: SetOpt = None,
    stage: Annotated[list[str] | None, typer.Option(help="Run only these stages of the config.")] = None,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE environment variable of the job. Repeatable.")] = None,
    pip: Annotated[list[str] | None, typer.Option(help="Extra pip requirement for the job. Repeatable.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Also leave this path pattern out of the upload.")] = None,
    wait: Annotated[bool, typer.Option(help="Stream the job's log and exit with its status.")] = True,
    force: Annotated[bool, typer.Option(help="Re-run stages that are up to date.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Submit `lmfleet run CONFIG` as a Ray job; the current directory is uploaded as its working dir
    (without .git, .venv, runs/, data/, checkpoints, credential files such as .env or .aws/, and what
    .gitignore lists). A pipeline runs as a chain of jobs, one per stage, driven by that job on the
    cluster. Exit code: 0 succeeded, 1 failed, 130 stopped."""
    from lmfleet import console, jobs

    console.set_verbose(verbose)
    try:
        client, job_id = jobs.submit(config, _job_address(address), set_ or [], env or [], pip or [], exclude or [],
                                     stage, force)
        if not wait:
            typer.echo(job_id)
            return
        typer.echo(f"submitted Ray job {job_id}", err=True)
        status = jobs.follow(client, job_id)
    except UserError as err:
        _fail(err)
    typer.echo(f"Ray job {job_id}: {status}", err=True)
    raise typer.Exit(EXIT_CODES.get(status, 1))


jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: status, logs, stop.")
app.add_typer(jobs_app, name="jobs")
JobId = Annotated[str, typer.Argument(help="The job's submission id (what `lmfleet submit --no-wait` printed).")]


def _client(address: str | None):
    from lmfleet import jobs

    try:
        return jobs.client_for(_job_address(address))
    except UserError as err:
        _fail(err)


def _job_call(fn, job_id: str):
    try:
        return fn(job_id)
    except RuntimeError as err:  # the job API's answer, e.g. no such job
        _fail(UserError(f"job {job_id}: {str(err).splitlines()[0]}"))


@jobs_app.command("status")
def jobs_status(job_id: JobId, address: AddressOpt = None) -> None:
    """Print the job's status (and its message once it ended)."""
    info = _job_call(_client(address).get_job_info, job_id)
    typer.echo(f"{info.status.value}" + (f": {info.message}" if info.message else ""))


@jobs_app.command("logs")
def jobs_logs(job_id: JobId, address: AddressOpt = None,
              follow: Annotated[bool, typer.Option(help="Keep streaming until the job ends.")] = False) -> None:
    """Print the job's log."""
    from lmfleet import jobs

    client = _client(address)
    if follow:
        status = jobs.follow(client, job_id)
        raise typer.Exit(EXIT_CODES.get(status, 1))
    typer.echo(_job_call(client.get_job_logs, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: JobId, address: AddressOpt = None) -> None:
    """Stop the job (its driver gets SIGTERM, then SIGKILL; a chain stops its running stage's job)."""
    stopped = _job_call(_client(address).stop_job, job_id)
    typer.echo(f"stop requested for {job_id}" if stopped else f"{job_id} had already ended")


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="Stage or pipeline YAML.")],
    set_: SetOpt = None,
    config_only: Annotated[bool, typer.Option(help="Check the config alone, not its inputs and output dir.")] = False,
) -> None:
    """Check a config without running it: the same checks `run` makes before any work (config, input paths,
    output dir), offline and without starting Ray."""
    from lmfleet import runner

    try:
        loaded = runner.load_run(config, set_)
        if not config_only:
            runner.preflight(loaded, loaded.stages, loaded.config.run_dir)
    except UserError as err:
        _fail(err)
    names = ", ".join(f"{s.name} ({s.kind})" for s in loaded.stages)
    typer.echo(f"{config}: ok; run {loaded.config.name!r} -> {loaded.config.run_dir}; stages: {names}")


def _bytes(text: str) -> int:
    import re

    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--device-memory {text!r}: expected a size like 80GiB, 24GB or 16G")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** "_KMGT".index(unit.upper() or "_"))


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Stage or pipeline YAML.")],
    set_: SetOpt = None,
    stage: Annotated[list[str] | None, typer.Option(help="Plan only these stages (default: every training stage).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ranks (default: the stage's scaling.num_workers, the max).")] = None,
    device: Annotated[str | None, typer.Option(help="A GPU for the step time: H100, H200, A100, L4, A10.")] = None,
    mfu: Annotated[float, typer.Option(help="The MFU the step time assumes.")] = 0.4,
    device_memory: Annotated[str | None, typer.Option(help="Warn when a rank needs more, e.g. 80GiB.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per stage.")] = False,
) -> None:
    """What a training config costs, by arithmetic (no Ray, no model built). Pretraining: parameters, FLOPs
    and tokens, memory per rank (weights, gradients, optimizer states, activations) under its strategy and
    mesh, and the step time on a named device at an assumed MFU. Post-training: the memory per rank of
    every model the stage holds (trained, frozen reference, teacher, reward model)."""
    import json

    from lmfleet import runner
    from lmfleet.posttrain.plan import plan_posttrain, posttrain_lines, role_models, with_workers
    from lmfleet.train.config import PEAK_FLOPS
    from lmfleet.train.plan import data_shapes, plan_lines, plan_pretrain, planned_config

    untrained = {"data", "prune", "eval", "distill_data"}  # (prune's optional recovery fine-tunes the model it pruned: not planned)
    try:
        loaded = runner.load_run(config, set_)
        names = {s.name: s for s in loaded.stages}
        unknown = sorted(set(stage or []) - set(names))
        if unknown:
            raise UserError(f"{config}: --stage {', '.join(unknown)}: not a stage of this config")
        if device is not None and device not in PEAK_FLOPS:
            raise UserError(f"--device {device!r}: expected one of {', '.join(PEAK_FLOPS)}")
        chosen = [names[n] for n in stage] if stage else [s for s in loaded.stages if s.kind not in untrained]
        if not chosen:
            raise UserError(f"{config}: no training stage to plan (lmfleet plan covers pretraining and post-training)")
        run_dir = loaded.config.run_dir
        data = {s.name: s.config for s in loaded.stages if s.kind == "data"}
        for s in loaded.stages:  # distill_data packs with its data stage's tokenizer (and its seq_len by default)
            if s.kind == "distill_data" and s.config.data in data:
                source = data[s.config.data]
                data[s.name] = source.model_copy(update={"pack": s.config.pack or source.pack})
        specs = {s.name: (s.kind, s.config) for s in loaded.stages}
        limit = None if device_memory is None else _bytes(device_memory)
        out = []
        for spec in chosen:
            if spec.kind in untrained:
                raise UserError(f"stages.{spec.name}: a {spec.kind} stage; lmfleet plan covers training stages")
            if spec.kind == "pretrain":
                cfg = planned_config(spec.config, run_dir, workers)
                vocab, seq, source = data_shapes(cfg, data, run_dir)
                result = plan_pretrain(cfg, vocab, seq, device=device, mfu=mfu, device_memory=limit)
                out.append((spec.name, {"shapes_from": source}, result, plan_lines))
            else:
                cfg = with_workers(spec.config, workers)
                result = plan_posttrain(spec.kind, cfg, role_models(spec.kind, cfg, specs, run_dir),
                                        on_gpu=device is not None, device_memory=limit)
                out.append((spec.name, {}, result, posttrain_lines))
    except UserError as err:
        _fail(err)
    for name, where, result, lines in out:
        if json_:
            typer.echo(json.dumps({"stage": name, **where, **result.as_dict()}))
        else:
            header = f"vocab and seq_len from {where['shapes_from']}" if where else "post-training"
            typer.echo("\n".join([f"[{name}] {header}", *lines(result)]))


data_app = typer.Typer(no_args_is_help=True, help="A data stage's outputs.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    path: Annotated[str, typer.Argument(help="A data stage's output dir, or a run dir holding one (path or URI).")],
    reason: Annotated[str | None, typer.Option(help="Show documents rejected for this reason (default: counts only).")] = None,
    limit: Annotated[int, typer.Option(help="How many to show.")] = 5,
    chars: Annotated[int, typer.Option(help="Characters of each document shown.")] = 300,
) -> None:
    """What the data stage quarantined: counts per reason, and a few documents of one reason with where
    they came from and why (the rejects/ Parquet of the stage)."""
    from lmfleet.data.inspect import rejected

    try:
        counts, rows = rejected(path, reason, limit)
    except UserError as err:
        _fail(err)
    typer.echo("rejected: " + (", ".join(f"{k} {n}" for k, n in counts.items()) or "none"))
    for r in rows:
        found = "".join(f" {k}={r[k]}" for k in ("pii", "contaminated_by") if r.get(k))
        raw = (r["raw"] or "").replace("\n", " ")
        typer.echo(f"\n[{r['reject_reason']}] {r['id']} ({r['source']}, {r['location']}){found}\n  "
                   + (raw[:chars] + (" ..." if len(raw) > chars else "")))


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="A run dir (a path or URI: s3://, gs://, ...).")],
    text: Annotated[bool, typer.Option("--text", help="Print the run's summary instead of writing the page.")] = False,
    out: Annotated[str | None, typer.Option(help="Write the page here (default: report.html in the run dir).")] = None,
    open_: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
) -> None:
    """Write the run's report.html: one page, self-contained (plots embedded, nothing fetched), with the
    run's config, versions, hardware and wall time per stage, and each stage's curves and tables. The
    runner writes it at the end of every run; this rebuilds it (after a crash, or from a bucket)."""
    from lmfleet.outputs import child, write_text
    from lmfleet.report.load import read_report
    from lmfleet.report.page import build_html
    from lmfleet.uri import cache_root, is_uri

    try:
        if text:
            typer.echo(summarize(read_report(run_dir)))
            return
        page = build_html(run_dir)
        where = out or child(run_dir, "report.html")
        try:
            write_text(where, page)
        except OSError as err:  # a read-only bucket or folder
            raise UserError(f"{where}: cannot write the page ({err}); --out FILE writes it elsewhere") from None
    except UserError as err:
        _fail(err)
    typer.echo(f"report: {where}")
    if open_:
        import hashlib
        import webbrowser

        local = Path(where).resolve()
        if is_uri(where):  # a browser opens files: a copy in lmfleet's cache
            local = cache_root() / "reports" / f"{hashlib.blake2b(str(where).encode(), digest_size=8).hexdigest()}.html"
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(page, encoding="utf-8")
        if not webbrowser.open(local.as_uri()):
            typer.echo(f"no browser found: open {local}", err=True)


def summarize(report: dict) -> str:
    """A short human summary of a run report; each stage may provide its own `summary` lines."""
    lines = [f"run {report['name']}: {report['status']} in {report.get('seconds', 0):.1f} s -> {report['run_dir']}"]
    for name, stage in report["stages"].items():
        lines.append(f"[{name}]")
        lines.extend(f"  {line}" for line in stage.get("summary", []))
    lines.append(f"report: {report['run_dir'].rstrip('/')}/report.html")
    return "\n".join(lines)


if __name__ == "__main__":
    app()
