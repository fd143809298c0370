"""Ray Tune searches over real pretraining runs: each trial is a TorchTrainer run of the tiny model;
4 trials share the 2 CPUs (0.5 CPU per worker)."""

import json
import os
import re
import signal
import statistics
import subprocess
import time

import pytest

from lmfleet.errors import ConfigError
from lmfleet.runner import load_run
from lmfleet.tune.trials import attempt_records

from conftest import lmfleet_cmd, pretrain, pretrain_stage, report_sections, write_config

pytestmark = pytest.mark.slow

STEPS = 20  # a report (checkpoint) every 5 steps: 4 per trial
EVERY = 5
LR_GRID = {"optimizer.lr": {"grid": [3e-4, 1e-3, 3e-3, 1e-2]}}
FIFO_GRID = {"optimizer.lr": {"grid": [3e-4, 3e-3]}}  # the fixed configs PBT's grid is compared with


def _records(trials_dir, trial_id) -> list[dict]:
    return [json.loads(x) for x in (trials_dir / trial_id / "metrics.jsonl").read_text().splitlines()]


def _search(packed, space=LR_GRID, **tune) -> dict:
    return pretrain_stage(packed, steps=STEPS, checkpoint__every=EVERY,
                          tune={"metric": "loss", "num_samples": 1, "space": space, **tune})


@pytest.fixture(scope="module")
def interrupted_fifo(tmp_path_factory, packed, ray_local):
    """2 of the grid's configs trained for STEPS with fixed hyperparameters (FIFO), as `lmfleet run` in a
    subprocess: Ctrl-C once a trial passed step 12, then the same command again resumes the search.
    Returns (output of the first run, of the second, the stage dir, max step of each trial when interrupted)."""
    tmp = tmp_path_factory.mktemp("fifo")
    out = tmp / "run"
    # The session's cluster: a second local Ray on this machine breaks Train's placement-group cleaner,
    # which finds "multiple active Ray instances".
    address = ray_local.get_runtime_context().gcs_address
    config = write_config(tmp / "fifo.yaml", {"name": "fifo", "output_dir": str(out), "ray": {"address": address},
                                              "stages": {"pretrain": _search(packed, FIFO_GRID)}})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # That Ray listens on loopback only (lmfleet.runner.init_ray): a driver joining it must keep 127.0.0.1
    # as its address, which Ray otherwise replaces by the machine's IP (as it does for any local address).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    trials = out / "pretrain" / "trials"
    with open(tmp / "first.log", "w") as log:
        proc = subprocess.Popen([*lmfleet_cmd(), "run", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = [r.get("step", 0) for m in trials.glob("*/metrics.jsonl") for r in _records(trials, m.parent.name)]
            if max(steps, default=0) > 12:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        first_rc = proc.wait(timeout=300)
    progress = {m.parent.name: max(r.get("step", 0) for r in _records(trials, m.parent.name))
                for m in trials.glob("*/metrics.jsonl")}
    second = subprocess.run([*lmfleet_cmd(), "run", str(config)], capture_output=True, text=True, env=env, timeout=900)
    first = (tmp / "first.log").read_text()
    assert first_rc == 130, first[-3000:]
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    return first, second.stdout + second.stderr, out / "pretrain", progress


def test_interrupted_search_resumes_and_completes(interrupted_fifo):
    first, second, stage, progress = interrupted_fifo
    assert "search interrupted" in first
    assert "resuming the interrupted search" in second
    # lmfleet's lines of the trials, not Tune's status tables (those with -v)
    assert re.search(rf"\] trial \S+ done at step {STEPS}: ", second) and "Trial status" not in second, second[-3000:]
    report = json.loads((stage / "report.json").read_text())
    assert len(report["trials"]) == 2 and all(r["step"] == STEPS and not r["error"] for r in report["trials"])
    # Trials that had reported a checkpoint continue from it (the others start over).
    resumed = 0
    for t in report["trials"]:
        for event, steps in attempt_records(_records(stage / "trials", t["id"])):
            if event["event"] == "resume":
                resumed += 1
                assert event["from_step"] >= EVERY and event["from_step"] % EVERY == 0, event
                assert steps[0]["step"] == event["from_step"] + 1, (t["id"], progress)
    assert resumed, progress


def test_pbt_exploits_continue_from_the_donor_state(tmp_path, packed, interrupted_fifo):
    # Two trials, the lowest and the highest learning rate of the grid: at step 10 the worse copies the better.
    mlruns = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = {"mlflow": {"tracking_uri": mlruns, "artifact_location": str(tmp_path / "artifacts")}}
    _, report = pretrain(tmp_path, packed, "pbt", steps=STEPS, checkpoint__every=EVERY, export=True,
                         run_keys={"tracking": tracking},
                         tune={"metric": "loss", "num_samples": 1, "space": {"optimizer.lr": {"grid": [3e-4, 1e-2]}},
                               # synchronous, so which trial exploits does not depend on which
                               # reached the interval first
                               "scheduler": {"kind": "pbt", "perturbation_interval": 10, "quantile_fraction": 0.5,
                                             "synch": True}})
    trials_dir = tmp_path / "pbt" / "pretrain" / "trials"
    # Each trial a row of its own, whichever copied whom last (a CI run once named both after the donor).
    assert sorted(t["id"] for t in report["trials"]) == sorted(p.name for p in trials_dir.iterdir())
    # An exploit at the last step (PBT cannot know it is the last) leaves no step to compare.
    exploits = [(t["id"], e) for t in report["trials"] for e in t["exploits"] if e["step"] < STEPS]
    assert len(exploits) >= 1, report["summary"]
    for receiver, e in exploits:
        # The loss of step s+1 is computed before that step's update: from the donor's checkpointed
        # weights on the same batch, whatever learning rate the receiver explores.
        attempt = next(steps for event, steps in attempt_records(_records(trials_dir, receiver))
                       if event["event"] == "exploit" and event["from_step"] == e["step"])
        mine = next(r["loss"] for r in attempt if r["step"] == e["step"] + 1)
        theirs = [r["loss"] for _, steps in attempt_records(_records(trials_dir, e["donor"]))
                  for r in steps if r["step"] == e["step"] + 1]
        assert any(mine == pytest.approx(x, rel=1e-5) for x in theirs), (receiver, e, mine, theirs)
    # Each trial's final loss is on the same last batch: PBT's best against the fixed configs' median.
    fifo = json.loads((interrupted_fifo[2] / "report.json").read_text())
    median = statistics.median(t["final"] for t in fifo["trials"])
    assert report["best"]["final"] <= median, (report["best"], median)
    export = tmp_path / "pbt" / "pretrain" / "model"
    assert json.loads((export / "export.json").read_text())["step"] == STEPS
    assert (export / "config.json").exists()
    assert (tmp_path / "pbt" / "pretrain" / "plots" / "metric.png").stat().st_size > 0
    table = (tmp_path / "pbt" / "pretrain" / "trials.md").read_text()
    assert all(f"step {e['step']} <- {e['donor']}" in table for _, e in exploits)
    assert f"| {report['best']['id']} |" in table
    # The trackers: a run for the search and one per trial, its exploits among its events.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pbt").experiment_id])}
    assert sorted(runs) == sorted(["pbt/pretrain", *(f"pbt/pretrain/{t['id']}" for t in report["trials"])])
    for receiver, e in exploits:
        events = [v for k, v in runs[f"pbt/pretrain/{receiver}"].data.tags.items() if k.startswith("event.")]
        assert any("event=exploit" in v and f"donor={e['donor']}" in v and f"step {e['step']}:" in v
                   for v in events), events
        trial_loss = client.get_metric_history(runs[f"pbt/pretrain/{receiver}"].info.run_id, "loss")
        assert {m.step for m in trial_loss} >= set(range(1, e["step"] + 1))
    # The run's page: the search's section with its trials' curves and the lineage.
    html = (tmp_path / "pbt" / "report.html").read_text()
    assert report_sections(html)["stage-pretrain"] == 1
    assert all(f"step {e['step']} &lt;- {e['donor']}" in html for _, e in exploits)


def test_asha_stops_weak_trials_early(tmp_path, packed):
    # Two at a time, good learning rates first: the tiny ones reach the first rung (step 5) last.
    space = {"optimizer.lr": {"grid": [3e-3, 1e-2, 1e-5, 3e-6]}}
    _, report = pretrain(tmp_path, packed, "asha", steps=STEPS, checkpoint__every=EVERY,
                         tune={"metric": "loss", "num_samples": 1, "space": space, "max_concurrent_trials": 2,
                               "scheduler": {"kind": "asha", "grace_period": EVERY}})
    by_lr = {t["config"]["optimizer.lr"]: t for t in report["trials"]}
    assert by_lr[1e-5]["stopped_early"] and by_lr[3e-6]["stopped_early"], report["summary"]
    assert by_lr[1e-5]["step"] < STEPS and by_lr[3e-6]["step"] < STEPS
    assert report["best"]["step"] == STEPS and report["best"]["config"]["optimizer.lr"] in (3e-3, 1e-2)


def test_optuna_search_with_plateau_stopping(tmp_path, packed):
    # A plateau is a std of the metric below 1.0 over 2 reports: every trial stops at its second.
    space = {"optimizer.lr": {"loguniform": [1e-4, 1e-2]}, "lr_schedule.warmup_steps": {"randint": [0, 5]}}
    _, report = pretrain(tmp_path, packed, "optuna", steps=STEPS, checkpoint__every=EVERY,
                         tune={"metric": "loss", "num_samples": 2, "space": space, "search": "optuna",
                               "plateau": {"std": 1.0, "num_results": 2, "grace_period": 2}})
    trials = report["trials"]
    assert report["search"] == "optuna" and len(trials) == 2
    assert all(t["stopped_early"] and t["step"] == 2 * EVERY for t in trials), report["summary"]
    lrs = [t["config"]["optimizer.lr"] for t in trials]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    assert all(0 <= t["config"]["lr_schedule.warmup_steps"] < 5 for t in trials)


@pytest.mark.parametrize("space, message", [
    ({"optimizer.lr": {"normal": [0, 1]}}, "tune.space.optimizer.lr: unknown distribution 'normal'"),
    ({"optimizer.lr": {"uniform": [-0.1, 0.1]}}, "tune.space.optimizer.lr: value -0.1"),
    ({"optimizer.lr": {"loguniform": [-1e-3, 1e-2]}}, "tune.space.optimizer.lr: loguniform needs low > 0"),
    ({"optimizer.lr": {"uniform": [0.1, 0.01]}}, "tune.space.optimizer.lr: uniform needs low < high"),
    ({"optimizer.lrate": {"uniform": [0.01, 0.1]}}, "tune.space.optimizer.lrate: value 0.01"),
    ({"batch.global_batch": {"choice": [8, 7]}}, "tune.space.batch.global_batch: value 7"),
    ({"model.dropout": {"randint": [0]}}, "tune.space.model.dropout: randint takes [low, high]"),
])
def test_bad_search_space_entries_name_the_key(tmp_path, space, message):
    stage = pretrain_stage("unused", steps=20, checkpoint__every=10, tune={"metric": "loss", "space": space})
    path = write_config(tmp_path / "bad.yaml", {"name": "bad", "stages": {"pretrain": stage}})
    with pytest.raises(ConfigError) as err:
        load_run(path)
    assert message in str(err.value) and "bad.yaml" in str(err.value)


def test_scheduler_settings_must_fit_the_stage(tmp_path):
    stage = pretrain_stage("unused", steps=20, checkpoint__every=10, tune={
        "metric": "val_loss", "space": LR_GRID, "scheduler": {"kind": "pbt", "perturbation_interval": 15}})
    path = write_config(tmp_path / "bad.yaml", {"name": "bad", "stages": {"pretrain": stage}})
    with pytest.raises(ConfigError, match="eval.every 100 must divide checkpoint.every 10"):
        load_run(path)
    stage["eval"]["every"] = 10
    write_config(path, {"name": "bad", "stages": {"pretrain": stage}})
    with pytest.raises(ConfigError, match="perturbation_interval 15 must be a multiple of checkpoint.every 10"):
        load_run(path)
    stage["tune"]["search"] = "optuna"
    stage["tune"]["scheduler"]["perturbation_interval"] = 20
    write_config(path, {"name": "bad", "stages": {"pretrain": stage}})
    with pytest.raises(ConfigError, match="optuna cannot drive PBT"):
        load_run(path)
