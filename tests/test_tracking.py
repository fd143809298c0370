"""Experiment trackers for every stage (the run's `tracking:` block), from one real small run
data -> pretrain -> sft -> grpo: TensorBoard event files with each stage's tags, an MLflow store (SQLite) with
one run per stage (params, metrics per step, the report), W&B offline run dirs."""

import json
import struct

import pytest

from lmfleet.errors import ConfigError
from lmfleet.runner import load_run, preflight, run

from conftest import pretrain_stage, report_sections, shared, write_config

THE = [{"function": "lmfleet.posttrain.rewards:contains", "args": {"text": "the"}}]
ALPACA = {"format": "alpaca", "paths": [str(shared("alpaca_5000.json"))], "max_records": 24, "val_fraction": 0.25}
STAGES = ["data", "pretrain", "sft", "grpo"]


def _tags(logdir) -> set[str]:
    """The summary tags of a TensorBoard log dir's event files (TFRecord: length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at: at + 8])
            event = Event.FromString(data[at + 12: at + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            at += 12 + length + 4
    return tags


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("tracked")
    mlruns = f"sqlite:///{tmp / 'mlflow.db'}"  # MLflow 3's local store (its file store needs an opt-in)
    pretrain = pretrain_stage("data", steps=4, export=True, checkpoint__every=2, eval__every=4,
                              model__max_seq_len=64)
    cfg = {"name": "tracked", "output_dir": str(tmp / "run"),
           "tracking": {"tensorboard": True, "mlflow": {"tracking_uri": mlruns, "experiment": "lmfleet-tests",
                                                          "artifact_location": str(tmp / "artifacts")},
                        "wandb": {"project": "lmfleet-tests", "mode": "offline"}},
           "stages": {
               "data": {"sources": [{"name": "c4", "format": "jsonl", "paths": [str(shared("c4_demo.jsonl"))]}],
                        "tokenizer": {"vocab_size": 512}, "pack": {"seq_len": 64}},
               "pretrain": pretrain,
               "sft": {"model": "pretrain", "dataset": ALPACA, "training": {"max_steps": 2, "max_length": 96},
                       "batch": {"micro_batch": 4}, "log_every": 1, "eval": {"samples": 2,
                                                                              "generation": {"max_new_tokens": 4}}},
               "grpo": {"model": "sft", "reward_functions": THE, "dataset": ALPACA, "iterations": 2,
                        "grpo": {"rollout_batch": 2, "num_generations": 2, "mini_batch": 4},
                        "generation": {"max_new_tokens": 6}, "training": {"max_length": 96}, "eval": {"samples": 2}},
           }}
    report = run(load_run(write_config(tmp / "tracked.yaml", cfg)))
    return report, tmp / "run", mlruns


def test_tensorboard_has_each_stages_tags(tracked):
    _, out, _ = tracked
    want = {"data": {"docs_in", "seconds/read", "config/text_summary"},
            "pretrain": {"loss", "lr", "grad_norm", "val_loss", "loss/c4", "events/workers_started/text_summary"},
            "sft": {"loss", "learning_rate", "eval_loss"},
            "grpo": {"score", "loss", "reward/contains", "report/text_summary"}}
    for stage, tags in want.items():
        found = _tags(out / "tensorboard" / stage)
        assert tags <= found, (stage, sorted(found))


def test_mlflow_has_a_run_per_stage(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    report, _, mlruns = tracked
    client = MlflowClient(tracking_uri=mlruns)
    experiment = client.get_experiment_by_name("lmfleet-tests")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(f"tracked/{s}" for s in STAGES)
    for stage in STAGES:
        r = runs[f"tracked/{stage}"]
        assert r.info.status == "FINISHED" and r.data.tags["lmfleet.stage"] == stage
        dst = tmp_path / stage
        dst.mkdir()
        with open(client.download_artifacts(r.info.run_id, "report.json", str(dst))) as f:
            assert json.load(f)["kind"] == stage
    pretrain = runs["tracked/pretrain"]
    assert pretrain.data.params["steps"] == "4" and pretrain.data.params["model.max_seq_len"] == "64"
    losses = client.get_metric_history(pretrain.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    final = report["stages"]["pretrain"]["final_loss"]
    assert [m.value for m in losses if m.step == 4] == [pytest.approx(final)]
    assert pretrain.data.metrics["final.final_loss"] == pytest.approx(final)
    assert any("workers_started" in v for k, v in pretrain.data.tags.items() if k.startswith("event."))
    grpo = runs["tracked/grpo"]
    assert [m.step for m in client.get_metric_history(grpo.info.run_id, "score")] == [1, 2]
    assert runs["tracked/data"].data.metrics["docs_in"] == 300


def _wandb_records(path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`): a ':W&B' header (7 bytes), then LevelDB's log format
    (32 KiB blocks of chunks: crc, length, type) around protobuf Records. wandb 0.31 ships no reader."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, at, out, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while at + 7 <= len(data):
        left = block - at % block
        _, length, kind = struct.unpack("<IHB", data[at: at + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's padding
            at += left
            continue
        chunk, at = data[at + 7: at + 7 + length], at + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            out.append(Record.FromString(pending))
    return out


def _items(items) -> dict:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def test_wandb_offline_run_per_stage(tracked):
    report, out, _ = tracked
    runs = {}
    for path in (out / "wandb").glob("offline-run-*/run-*.wandb"):
        records = _wandb_records(path)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == "tracked" and run.display_name == f"tracked/{run.job_type}"
        history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary.update(_items(r.summary.update))
        runs[run.job_type] = history, summary
    assert sorted(runs) == sorted(STAGES)
    history, summary = runs["pretrain"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert summary["final/final_loss"] == pytest.approx(report["stages"]["pretrain"]["final_loss"])
    assert json.loads(summary["report"])["kind"] == "pretrain" and "workers_started" in summary["events"][0]
    history, _ = runs["grpo"]
    assert [h["step"] for h in history if "score" in h] == [1, 2]


def test_the_runs_page(tracked):
    """report.html of a pipeline: a plot in every section, generations of the input model and the trained one."""
    _, out, _ = tracked
    html = (out / "report.html").read_text()
    assert report_sections(html) == {"run": 1, **{f"stage-{s}": 1 for s in STAGES}}
    assert html.count("sample generations") == 2  # sft's and grpo's
    assert "<th>before</th><th>after</th>" in html


def test_a_missing_tracker_package_names_its_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = {"name": "t", "output_dir": str(tmp_path / "run"), "tracking": {"wandb": {"project": "p"}},
           "stages": {"data": {"sources": [{"name": "c4", "format": "jsonl", "paths": [str(shared("c4_demo.jsonl"))]}]}}}
    loaded = load_run(write_config(tmp_path / "t.yaml", cfg))
    with pytest.raises(ConfigError, match=r"tracking.wandb: the 'wandb' package is not installed; install it with "
                                          r"pip install 'lmfleet\[wandb\]'"):
        preflight(loaded, loaded.stages, loaded.config.run_dir)
