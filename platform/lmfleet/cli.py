"""`lmfleet` command line: run and validate stage configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmfleet.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: KEY.PATH=VALUE (VALUE parsed as YAML). Repeatable."),
]


def _fail(err: UserError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Stage or pipeline YAML.")],
    set_: SetOpt = None,
    address: Annotated[
        str | None, typer.Option(help="Ray address (default RAY_ADDRESS, else an embedded local Ray); "
                                      "http://HEAD:8265 runs each stage as a Ray job.")
    ] = None,
    stage: Annotated[list[str] | None, typer.Option(help="Run only these stages of the config.")] = None,
) -> None:
    """Run a stage, or a pipeline of stages, on Ray.

    With a Ray job API address (http://HEAD:8265) each stage runs as its own Ray job, in order."""
    from lmfleet import jobs, runner

    try:
        loaded = runner.load_run(config, set_)
        unknown = sorted(set(stage or []) - {s.name for s in loaded.stages})
        if unknown:
            raise UserError(f"{config}: --stage {', '.join(unknown)}: not a stage of this config")
        address = address or loaded.config.ray.address or os.environ.get("RAY_ADDRESS")
        if jobs.is_job_address(address):
            report = jobs.run_as_jobs(loaded, config, set_ or [], address, only=stage)
        else:
            report = runner.run(loaded, address=address, only=stage)
    except jobs.StageFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except UserError as err:
        _fail(err)
    except KeyboardInterrupt as err:
        typer.echo(f"interrupted{f': {err}' if str(err) else ''}", err=True)
        raise typer.Exit(130) from None
    typer.echo(summarize(report))


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="Stage or pipeline YAML.")], set_: SetOpt = None) -> None:
    """Check a config without running it."""
    from lmfleet import runner

    try:
        loaded = runner.load_run(config, set_)
    except UserError as err:
        _fail(err)
    names = ", ".join(f"{s.name} ({s.kind})" for s in loaded.stages)
    typer.echo(f"{config}: ok; run {loaded.config.name!r} -> {loaded.config.run_dir}; stages: {names}")


def summarize(report: dict) -> str:
    """A short human summary of a run report; each stage may provide its own `summary` lines."""
    lines = [f"run {report['name']}: {report['status']} in {report.get('seconds', 0):.1f} s -> {report['run_dir']}"]
    for name, stage in report["stages"].items():
        lines.append(f"[{name}]")
        lines.extend(f"  {line}" for line in stage.get("summary", []))
    lines.append(f"full report: {Path(report['run_dir']) / 'report.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    app()
