"""The one runner every stage goes through: config -> run dir -> Ray -> stages in order -> report.

A run writes `runs/<name>/` (or `output_dir`): `config.yaml` (resolved, defaults filled in),
`logs/lmfleet.log`, `metrics.jsonl`, one folder per stage with its outputs, and `report.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmfleet import storage
from lmfleet.config import RunConfig, apply_overrides, load_yaml, validate_model
from lmfleet.stages import StageSpec, resolve_stages

log = logging.getLogger("lmfleet")
STAGE_STATE = "stage.json"  # in each stage dir: config, seed, status and (once it succeeded) its report


@dataclass
class LoadedRun:
    source: str
    config: RunConfig
    stages: list[StageSpec]

    def resolved(self) -> dict:
        data = self.config.model_dump(mode="json")
        data["stages"] = {
            s.name: {"kind": s.kind, **s.config.model_dump(mode="json")} for s in self.stages
        }
        return data


def load_run(path: str | Path, overrides: list[str] | None = None) -> LoadedRun:
    source = str(path)
    data = apply_overrides(load_yaml(path), overrides or [], source)
    config = validate_model(RunConfig, data, source)
    return LoadedRun(source, config, resolve_stages(config, source))


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; every record carries stage and wall time."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, stage: str, **metrics) -> None:
        record = {"time": round(time.time(), 3), "stage": stage, **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, a stage's data files); [] if it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@dataclass
class StageContext:
    """What a stage function gets besides its config: where to write, the seed, logging and metrics."""

    name: str
    out_dir: Path
    run_dir: Path
    seed: int
    metrics: MetricsLog
    storage: str  # where Ray Train / Tune keep this stage's checkpoints (lmfleet.storage)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, step: str):
        """Times a named step, logs it, and records its seconds for the stage report."""
        log.info("[%s] %s ...", self.name, step)
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.seconds[step] = round(took, 3)
        self.metrics.write(self.name, phase=step, seconds=round(took, 3))
        log.info("[%s] %s done in %.1f s", self.name, step, took)


def _setup_logging(run_dir: Path) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("lmfleet")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(run_dir / "logs" / "lmfleet.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False
    # Ray Data logs every dataset execution at INFO; our step lines say what matters.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to `address` (or RAY_ADDRESS); without either, start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train's print patch logs prints even while a library captures stdout (dill does, to read
    # disassembly, when `datasets` fingerprints TRL's map functions): thousands of bytecode lines.
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:  # with the dashboard: Ray Train v2 needs its state API
        ray.init(num_cpus=num_cpus, log_to_driver=True, runtime_env=runtime_env)
    # Progress bars only on a terminal; Ray job logs and CI get periodic log lines instead.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def _interrupted(marker: Path, state: dict) -> bool:
    """Whether the stage dir holds an interrupted run of this very stage config (Ctrl-C, or a driver that
    died: its marker still says running)."""
    previous = _read_state(marker)
    return previous.get("status") in ("running", "interrupted") and {k: previous.get(k) for k in state} == state


def _read_state(marker: Path) -> dict:
    return json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else {}


def stage_state(loaded: LoadedRun, spec: StageSpec) -> dict:
    """What identifies a stage's run: its kind, config and the run's seed."""
    return {"kind": spec.kind, "config": spec.config.model_dump(mode="json"), "seed": loaded.config.seed}


def up_to_date(loaded: LoadedRun, spec: StageSpec, run_dir: Path) -> dict | None:
    """The stage's last state if that run succeeded with the same config and seed after every earlier stage
    of the config last finished (its inputs are not newer); else None."""
    previous = _read_state(run_dir / spec.name / STAGE_STATE)
    state = stage_state(loaded, spec)
    earlier = loaded.stages[: loaded.stages.index(spec)]
    inputs_finished = max((_read_state(run_dir / e.name / STAGE_STATE).get("finished", 0) for e in earlier),
                          default=0)
    if (previous.get("status") == "succeeded" and {k: previous.get(k) for k in state} == state
            and previous["finished"] >= inputs_finished):
        return previous
    return None


def run(loaded: LoadedRun, address: str | None = None, only: list[str] | None = None, force: bool = False) -> dict:
    """Run the stages of a loaded config in order; returns the run report (also written to report.json).
    Stages that are `up_to_date` are skipped unless `force`."""
    cfg = loaded.config
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(loaded.resolved(), sort_keys=False), encoding="utf-8")
    stages = [s for s in loaded.stages if not only or s.name in only]

    # Every stage checks its inputs before any stage does work, so a typo fails in seconds.
    for i, spec in enumerate(stages):
        spec.preflight({s.name for s in stages[:i]}, run_dir)

    init_ray(address or cfg.ray.address, cfg.ray.num_cpus)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    report: dict = {"name": cfg.name, "run_dir": str(run_dir), "status": "running", "stages": {}}
    report_path = run_dir / "report.json"
    if only and report_path.exists():  # a stage re-run (or one job of a chain): keep the other stages' reports
        previous = json.loads(report_path.read_text(encoding="utf-8")).get("stages", {})
        report["stages"] = {k: v for k, v in previous.items() if k not in only}
    started = time.perf_counter()
    for spec in stages:
        ctx = StageContext(spec.name, run_dir / spec.name, run_dir, cfg.seed, metrics,
                           storage.stage_storage(cfg.storage_path, cfg.name, run_dir / spec.name))
        state = stage_state(loaded, spec)
        marker = ctx.out_dir / STAGE_STATE
        if not force and (previous := up_to_date(loaded, spec, run_dir)):
            log.info("stage %s: up to date (same config, finished after its inputs): skipped; --force re-runs it",
                     spec.name)
            summary = ["up to date: not re-run (--force re-runs it)", *previous["report"].get("summary", [])]
            report["stages"][spec.name] = {**previous["report"], "skipped": True, "summary": summary}
            continue
        if spec.resumes and _interrupted(marker, state):
            log.info("stage %s: resuming its interrupted run in %s", spec.name, ctx.out_dir)
        else:  # a stage rewrites its whole output dir: stale files of an earlier run must not mix in
            shutil.rmtree(ctx.out_dir, ignore_errors=True)
            storage.delete(ctx.storage)  # nor old checkpoints, which Ray Train would resume from
            ctx.out_dir.mkdir(parents=True)
        marker.write_text(json.dumps({**state, "status": "running"}), encoding="utf-8")
        log.info("stage %s (%s) -> %s", spec.name, spec.kind, ctx.out_dir)
        try:
            stage_report = spec.run(ctx)
        except BaseException as err:
            # Ctrl-C leaves a resumable stage to resume; an error makes the next run start afresh.
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            marker.write_text(json.dumps({**state, "status": status}), encoding="utf-8")
            report["status"] = "failed"
            report["failed_stage"] = spec.name
            report["error"] = f"{type(err).__name__}: {err}"
            report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
            raise
        report["stages"][spec.name] = {"kind": spec.kind, **stage_report, "seconds": ctx.seconds}
        marker.write_text(json.dumps({**state, "status": "succeeded", "finished": time.time(),
                                      "report": report["stages"][spec.name]}, default=str), encoding="utf-8")
        report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    report["status"] = "succeeded"
    report["seconds"] = round(time.perf_counter() - started, 3)
    report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
