"""Experiment trackers for every stage (the run's `tracking:` block): TensorBoard, MLflow, Weights & Biases.

The driver feeds them from what every stage already sends it: metrics.jsonl, where each stage's trainers
append their logged steps from any node (lmfleet.runlog), and a search's trials/<id>/metrics.jsonl. So a
tracker's package, credentials (WANDB_API_KEY, MLflow's) and network are needed only where the driver
runs: Train workers never import a tracker nor see its secrets, and every stage kind is tracked the
same way, new ones included.

One tracker run per stage (per trial in a search), named `<run>/<stage>[/<trial>]`: params are the
stage's resolved config (a trial's: its sampled values), metrics each record's numbers at its `step`
(or `iteration`), events (a worker group's restart, a PBT exploit) as text at their step; at the end
the stage's report: its numbers as summary metrics and report.json as an artifact.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from pathlib import Path

from lmfleet import console
from lmfleet.config import MLflowConfig, TrackingConfig, WandbConfig
from lmfleet.errors import ConfigError
from lmfleet.runlog import JsonlTail
from lmfleet.tune.trials import finite

log = logging.getLogger("lmfleet")


EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check(cfg: TrackingConfig) -> None:
    """ConfigError naming the extra to install for a tracker whose package is missing (before any work)."""
    for name, (module, extra) in EXTRAS.items():
        if getattr(cfg, name) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking.{name}: the {module!r} package is not installed; install it with "
                              f"pip install 'lmfleet[{extra}]'")


def _numbers(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif finite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


SKIP = {"time", "step", "iteration", "from_step", "attempt"}


def values_of(record: dict) -> tuple[int, dict[str, float]]:
    """A metrics record as (step, {name: number}): a data step's seconds as seconds/<step>, no strings."""
    if "phase" in record:
        return 0, {f"seconds/{record['phase']}": float(record["seconds"])}
    step = record.get("step", record.get("iteration", 0))
    return int(step) if isinstance(step, int | float) else 0, {
        k: v for k, v in _numbers(record).items() if k not in SKIP}


class _TensorBoard:
    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def params(self, params: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)

    def metrics(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def event(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(f"events/{name}", text, step)

    def finish(self, summary: dict, report: dict | None, status: str) -> None:
        if report is not None:
            self.writer.add_text("report", "```\n" + json.dumps(report, indent=2, default=str) + "\n```", 0)
        self.writer.close()


class _MLflow:
    """Through MlflowClient, not the fluent API: a search's trials are open runs at once."""

    def __init__(self, cfg: MLflowConfig, experiment: str, name: str, tags: dict):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=cfg.artifact_location)
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.events = 0

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in _flat(params).items()]
        for i in range(0, len(flat), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def event(self, name: str, text: str, step: int) -> None:
        self.events += 1
        self.client.set_tag(self.run_id, f"event.{self.events}", f"step {step}: {text}"[:5000])

    def finish(self, summary: dict, report: dict | None, status: str) -> None:
        if summary:
            self.metrics({f"final.{k}": v for k, v in summary.items()}, 0)
        if report is not None:
            self.client.log_text(self.run_id, json.dumps(report, indent=2, default=str), "report.json")
        self.client.set_terminated(self.run_id, {"succeeded": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


class _Wandb:
    def __init__(self, cfg: WandbConfig, run: str, name: str, dir: Path, params: dict):
        import wandb

        dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(dir), name=name,
                              group=run, job_type=name.split("/")[1], config=params, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))
        # lmfleet's step, not W&B's own counter: a restarted worker group logs some steps again.
        self.run.define_metric("*", step_metric="step")
        self.events: list[str] = []

    def params(self, params: dict) -> None:
        pass  # given to wandb.init

    def metrics(self, values: dict, step: int) -> None:
        self.run.log({**values, "step": step})

    def event(self, name: str, text: str, step: int) -> None:
        self.run.log({f"event/{name}": 1, "step": step})
        self.events.append(f"step {step}: {text}")

    def finish(self, summary: dict, report: dict | None, status: str) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in summary.items()})
        if self.events:
            self.run.summary["events"] = self.events
        if report is not None:
            self.run.summary["report"] = json.dumps(report, default=str)
        self.run.finish(exit_code=0 if status == "succeeded" else 1)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Trackers:
    """The tracker runs of one stage or trial: each call goes to every tracker."""

    def __init__(self, cfg: TrackingConfig, run: str, name: str, local: Path, params: dict, tags: dict):
        self.sinks: list = []
        if cfg.tensorboard:
            self.sinks.append(_TensorBoard(local / "tensorboard" / name.split("/", 1)[1]))
        if cfg.mlflow is not None:
            self.sinks.append(_MLflow(cfg.mlflow, cfg.mlflow.experiment or run, name, tags))
        if cfg.wandb is not None:
            self.sinks.append(_Wandb(cfg.wandb, run, name, Path(cfg.wandb.dir) if cfg.wandb.dir else local, params))
        for s in self.sinks:
            s.params(params)

    def record(self, record: dict) -> None:
        if record.get("event"):
            text = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("time", "stage", "config"))
            step = record.get("from_step", record.get("step")) or 0
            for s in self.sinks:
                s.event(str(record["event"]), text, int(step))
            return
        step, values = values_of(record)
        if values:
            for s in self.sinks:
                s.metrics(values, step)

    def finish(self, report: dict | None, status: str) -> None:
        summary = {k: v for k, v in _numbers(report or {}).items() if not k.startswith("seconds.")}
        for s in self.sinks:
            s.finish(summary, report, status)


class StageTracking:
    """While a stage runs (a context manager around it): its records, and its trials', to the trackers.
    A thread polls the files each `every_s`; the last records are sent when the stage ends."""

    def __init__(self, cfg: TrackingConfig, run: str, stage: str, kind: str, params: dict, metrics: Path,
                 local_run: Path, stage_dir: Path, every_s: float = 2.0):
        self.cfg, self.run, self.stage, self.local = cfg, run, stage, local_run
        self.tags = {"lmfleet.run": run, "lmfleet.stage": stage, "lmfleet.kind": kind}
        self.metrics = JsonlTail(metrics)
        self.trials_dir = stage_dir / "trials"
        self.trials: dict[str, tuple[JsonlTail, _Trackers | None]] = {}
        self.every_s = every_s
        self.report: dict | None = None
        self.status = "failed"
        self._warned = False
        self.main = _Trackers(cfg, run, f"{run}/{stage}", local_run, params, self.tags)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lmfleet-tracking-{stage}", daemon=True)

    def __enter__(self) -> StageTracking:
        self._thread.start()
        return self

    def succeeded(self, report: dict) -> None:
        self.report, self.status = report, "succeeded"

    def __exit__(self, kind, err, tb) -> None:
        self._stop.set()
        self._thread.join()
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.status = "interrupted"
        try:
            self._poll()
            for _, trackers in self.trials.values():
                if trackers is not None:
                    trackers.finish(None, self.status)
            self.main.finish(self.report, self.status)
        except Exception as e:  # a tracker's outage costs the run nothing
            self._warn(e, "could not finish its tracker runs")

    def _warn(self, err: Exception, what: str) -> None:
        if self._warned:  # once a stage: an unreachable server fails every poll
            return
        self._warned = True
        log.warning("tracking: stage %s: %s: %s: %s (the traceback is in logs/lmfleet.log)", self.stage, what,
                    type(err).__name__, err)
        console.log_traceback(err, self.stage, "tracking: stage %s")

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._poll()
            except Exception as e:
                self._warn(e, "records not sent (this warning once a stage)")

    def _poll(self) -> None:
        for record in self.metrics.read():
            if record.get("stage") == self.stage:
                self.main.record(record)
        if self.trials_dir.is_dir():
            for path in sorted(self.trials_dir.glob("*/metrics.jsonl")):
                trial = path.parent.name
                if trial not in self.trials:
                    self.trials[trial] = (JsonlTail(path, from_start=True), None)
                tail, trackers = self.trials[trial]
                for record in tail.read():
                    if trackers is None:  # its first record: the trial's start, with its sampled config
                        trackers = _Trackers(self.cfg, self.run, f"{self.run}/{self.stage}/{trial}", self.local,
                                             record.get("config") or {}, {**self.tags, "lmfleet.trial": trial})
                        self.trials[trial] = (tail, trackers)
                    trackers.record(record)
