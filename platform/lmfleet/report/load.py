"""A run dir (a path or URI) read for its report: the run report, the resolved config, and for each stage
its report, its stage.json and the records it appended to metrics.jsonl."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmfleet.errors import InputError
from lmfleet.outputs import child, is_file, read_json, read_text
from lmfleet.runlog import read_jsonl


@dataclass
class StageView:
    name: str
    kind: str
    status: str  # succeeded, skipped (up to date: its last run's records), failed, interrupted, running
    report: dict  # the stage's entry of report.json ({} when it did not finish)
    state: dict  # its stage.json (config, started, finished)
    records: list[dict]  # its records of metrics.jsonl from its last run
    dir: Path | str
    config: dict = field(default_factory=dict)


@dataclass
class RunView:
    dir: Path | str
    report: dict
    config: dict
    config_text: str
    stages: list[StageView]


def _own_records(records: list[dict], name: str, state: dict) -> list[dict]:
    """metrics.jsonl is the run's log across re-runs: a stage's last run is what it logged from its start
    (a resumed run keeps its first start) to its finish."""
    start, end = state.get("started", 0), state.get("finished") or float("inf")
    return [r for r in records if r.get("stage") == name and start <= r.get("time", 0) <= end + 1]


def read_report(run_dir: Path | str) -> dict:
    """The run's report.json; InputError when there is none."""
    if not is_file(child(run_dir, "report.json")):
        raise InputError(f"{run_dir}: no report.json: not a run dir of lmfleet (or no stage has ended yet)")
    return read_json(child(run_dir, "report.json"))


def load_run(run_dir: Path | str) -> RunView:
    """The run at `run_dir`; InputError when it holds no run report."""
    report = read_report(run_dir)
    config_text = read_text(child(run_dir, "config.yaml")) if is_file(child(run_dir, "config.yaml")) else ""
    config = yaml.safe_load(config_text) or {}
    records = read_jsonl(child(run_dir, "metrics.jsonl"))
    finished = report.get("stages", {})
    names = list(config.get("stages", {})) or list(finished)
    stages = []
    for name in names:
        state = read_json(child(run_dir, name, "stage.json"))
        entry = finished.get(name)
        if entry is None and not state:
            continue  # not run (yet, or not part of this run)
        if entry is not None:
            status = "skipped" if entry.get("skipped") else "succeeded"
        else:
            status = state.get("status", "running")
        section = dict(config.get("stages", {}).get(name) or {})
        kind = (entry or {}).get("kind") or state.get("kind") or section.get("kind", name)
        stages.append(StageView(name, kind, status, entry or {}, state, _own_records(records, name, state),
                                child(run_dir, name), state.get("config") or section))
    return RunView(run_dir, report, config, config_text, stages)
