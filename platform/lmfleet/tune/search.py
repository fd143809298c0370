"""A Ray Tune search over a training stage: each trial is one real run of the stage (its own TorchTrainer).

How a multi-worker trial reaches Tune: the trial function (a Tune trial reserving almost no CPU; its
Train workers hold the resources) runs the stage's TorchTrainer in a thread. A Ray Train callback on
the Train controller forwards every report (metrics + the checkpoint Train persisted) through a Ray
queue to the trial, which reports both to Tune. Tune copies the checkpoint into the trial's storage,
so PBT can hand it to another trial: that trial restarts and its TorchTrainer resumes from the donor's
checkpoint (weights, optimizer, data position) with the explored config. Ray 2.60's own
TuneReportCallback passes only the checkpoint's path as a metric, which PBT cannot exploit.

The stage dir of a search (a path or URI; trial metrics go through the driver's appender, lmfleet.runlog):
  trials/<trial id>/     the trial's metrics.jsonl (every logged step) and its latest attempt's files
  trials.csv, trials.md  the trial table (final metric, hyperparameters, lineage of exploits)
  plots/                 the metric and the learning rate of every trial over steps
  model/                 the best trial's last checkpoint, exported by a normal run of the stage
and its storage (`ray/` in the stage dir, or under the run's storage_path):
  search/                Tune's experiment: state for resuming, each trial's Tune checkpoints
  trials/<id>/<attempt>/ the Train run of the trial's latest attempt
  train/                 the export's Train run
"""

from __future__ import annotations

import csv
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ray.train import UserCallback
from ray.tune import Callback

from lmfleet import console, outputs, storage
from lmfleet.errors import StageFailed
from lmfleet.runlog import MetricsLog, read_jsonl
from lmfleet.storage import checkpoint_uri
from lmfleet.tune.config import ASHAConfig, PBTConfig, TuneConfig, trial_config
from lmfleet.tune.trials import attempt_records, draw, finite, lr_key

log = logging.getLogger("lmfleet")
TRIAL_CPU = 0.01  # the trial function only waits on its TorchTrainer; 0 is rejected by Tune


class ForwardReports(UserCallback):
    """Runs on the Train controller: sends each report's metrics (rank 0) and checkpoint path to the trial."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put((metrics[0], checkpoint.path if checkpoint else None))


def _run_trial(config: dict, *, base: dict, tune_cfg: dict, model_cls, launch: Callable, stage: str, seed: int,
               trials_dir: str, trials_log: MetricsLog, trials_storage: str) -> None:
    """One Tune trial: the stage's config with the sampled values, run by the stage's own `launch`.
    trials_dir: the stage's trials/ (a path or URI); trials_log: its copy on the driver's node, where the
    trial's logs go (a trial runs on any node)."""
    import ray.tune
    from ray.util.queue import Queue

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = model_cls.model_validate(trial_config(base, config, TuneConfig.model_validate(tune_cfg).distributions()))
    out = outputs.child(trials_dir, trial_id)
    trial_log = trials_log.child(trials_log.path / trial_id / "metrics.jsonl")
    # Each start of the trial (first, after an exploit, on resume) is an attempt with its own Train run dir:
    # a reused dir would resume Train's own latest checkpoint instead of `start` (Train restores a run of the
    # same name), and the previous attempt's workers may still be shutting down, writing into theirs.
    attempt = uuid.uuid4().hex[:8]
    outputs.remove(outputs.child(out, "attempts"))
    outputs.remove(storage.join(trials_storage, trial_id))
    run_dir = outputs.child(out, "attempts", attempt)
    samples = trials_log.child(trials_log.path / trial_id / "attempts" / attempt / "samples.jsonl")
    start = ray.tune.get_checkpoint()
    if start is None:
        trial_log.write(stage, event="start", attempt=attempt, config=config)
    else:  # PBT's exploit (another trial's checkpoint) or a resumed search (our own)
        meta = start.get_metadata()
        if "trial_id" not in meta:
            raise RuntimeError(f"trial {trial_id}: checkpoint {start.path} is gone or was not written by a trial")
        event = "exploit" if meta["trial_id"] != trial_id else "resume"
        trial_log.write(stage, event=event, attempt=attempt, donor=meta["trial_id"], from_step=meta["step"],
                        config=config)
    queue = Queue(actor_options={"num_cpus": 0})
    filesystem, _ = storage.filesystem(trials_storage)  # of the checkpoint paths Train reports
    outcome: dict = {}

    def fit():
        try:
            launch(cfg, run_dir, trial_log, seed, stage, storage=storage.join(trials_storage, trial_id, attempt),
                   samples=samples, init_checkpoint=start, callbacks=[ForwardReports(queue)], export=False, tags={"attempt": attempt})
        except BaseException as err:  # re-raised in the trial's thread below
            outcome["error"] = err
        finally:
            queue.put(None)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        metrics, path = item
        checkpoint = None
        if path is not None:
            checkpoint = ray.tune.Checkpoint(path, filesystem)
            # The receiving trial of an exploit reads who it copied, and from which step.
            checkpoint.set_metadata({"trial_id": trial_id, "step": metrics["step"]})
        ray.tune.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    trial_log.write(stage, event="completed", attempt=attempt)  # not stopped by the scheduler


class TrialLines(Callback):
    """A search's console lines (Tune's own tables only with -v): each trial's metric at most each
    `min_gap_s`, its end and its failure."""

    def __init__(self, stage: str, metric: str, min_gap_s: float = 10.0):
        self.stage, self.metric, self.min_gap_s = stage, metric, min_gap_s
        self.shown: dict[str, float] = {}

    def _line(self, trial, what: str, result: dict | None) -> None:
        result = result or {}
        value = result.get(self.metric)
        said = f" {self.metric} {value:.4g}" if isinstance(value, int | float) else ""
        log.info("[%s] trial %s %s%s", self.stage, trial.trial_id, what, said)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        now = time.monotonic()
        if now - self.shown.get(trial.trial_id, float("-inf")) >= self.min_gap_s:
            self.shown[trial.trial_id] = now
            self._line(trial, f"step {result.get('step', '?')}", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, f"done at step {(trial.last_result or {}).get('step', '?')}:", trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "failed (its error is in the stage's report)", None)


def _trial_dirname(trial) -> str:
    """Tune's dir of a trial is named by its id, as its trials/<id> (how results are told apart)."""
    return trial.trial_id


def _scheduler(t: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = t.scheduler
    if isinstance(s, PBTConfig):
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={k: d.mutation() for k, d in t.distributions().items()},
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
            perturbation_factors=s.perturbation_factors, synch=s.synch,
        )
    if isinstance(s, ASHAConfig):
        return ASHAScheduler(time_attr="step", grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                             brackets=s.brackets, max_t=10**9)  # trials end at the stage's own step count
    return FIFOScheduler()


def _searcher(t: TuneConfig, seed: int, max_concurrent: int):
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=t.metric, mode=t.mode, seed=seed), max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    # Not TuneConfig.max_concurrent_trials: Tune ignores it for a search algorithm passed in.
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def _max_concurrent(t: TuneConfig, scaling) -> int:
    """Trials that fit the cluster at once (each needs its workers' CPUs, and GPUs when used)."""
    import ray

    if t.max_concurrent_trials:
        return t.max_concurrent_trials
    workers = scaling.bounds[0]
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) / (workers * scaling.cpus_per_worker)
    if scaling.resolve_gpu():
        fits = min(fits, resources.get("GPU", 0) / workers)
    return max(1, int(fits + 1e-9))


def run_search(cfg, ctx, launch: Callable) -> dict:
    """Run `cfg.tune` over the stage config `cfg` (its `tune` block removed in each trial).

    launch(cfg, out, metrics, seed, stage, storage=, samples=, init_checkpoint=, callbacks=, export=, steps=)
    runs the stage's TorchTrainer once, its Train run dir in storage/train (out: a path or URI; export: write
    out/model; steps: stop there)."""
    from ray import tune

    t: TuneConfig = cfg.tune
    dists = t.distributions()
    out = ctx.out_dir  # the driver's files (trial logs come here through the appender)
    worker_log = ctx.metrics.for_workers()
    experiment = storage.join(ctx.storage, "search")
    base = cfg.model_dump(mode="json", exclude={"tune"})
    base["tune"] = None
    random.seed(ctx.seed)  # PBT's explore draws from Python's random
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial, base=base, tune_cfg=t.model_dump(mode="json"), model_cls=type(cfg), launch=launch,
            stage=ctx.name, seed=ctx.seed, trials_dir=ctx.uri("trials"), trials_log=worker_log.child(out / "trials"),
            trials_storage=storage.join(ctx.storage, "trials")),
        {"CPU": TRIAL_CPU},
    )
    if tune.Tuner.can_restore(experiment):
        log.info("[%s] resuming the interrupted search in %s", ctx.name, experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        stopper = None
        if t.plateau is not None:
            from ray.tune.stopper import TrialPlateauStopper

            p = t.plateau
            stopper = TrialPlateauStopper(t.metric, std=p.std, num_results=p.num_results,
                                          grace_period=p.grace_period, mode=t.mode)
        tuner = tune.Tuner(
            trainable,
            param_space={k: d.to_ray() for k, d in dists.items()},
            tune_config=tune.TuneConfig(
                metric=t.metric, mode=t.mode, num_samples=t.num_samples, scheduler=_scheduler(t),
                search_alg=_searcher(t, ctx.seed, _max_concurrent(t, cfg.scaling)), reuse_actors=False,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name="search", storage_path=ctx.storage, stop=stopper, verbose=1 if console.verbose() else 0,
                callbacks=[TrialLines(ctx.name, t.metric)],
                # Every checkpoint stays until the search ends: with num_to_keep, Ray 2.60 deletes a checkpoint
                # that a PBT exploit handed to another trial, and both trials fail (FileNotFoundError).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            ),
        )
    with ctx.step("search"):
        grid = tuner.fit()
    # Tune returns normally on Ctrl-C; a trial that finished or was stopped has reported done.
    if any(r.error is None and not (r.metrics or {}).get("done") for r in grid):
        raise KeyboardInterrupt(f"search interrupted: run the same command again to resume it ({experiment})")
    results = {}
    for r in grid:
        row = _trial_row(r, t, dists, out / "trials")
        results[row["id"]] = (row, r)
    trials = [row for row, _ in sorted(results.values(), key=lambda x: x[0]["id"])]
    ok = [r for r in trials if finite(r["final"])]
    if not ok:
        errors = [f"{r['id']}: {r['error']}" for r in trials if r["error"]]
        raise StageFailed(f"no trial of the search reported {t.metric!r}" + (f"; errors: {errors}" if errors else ""))
    best = (min if t.mode == "min" else max)(ok, key=lambda r: r["final"])
    result = results[best["id"]][1]
    _prune_checkpoints(r for _, r in results.values())
    write_table(trials, t, out)
    with ctx.step("plots"):
        plot_trials(trials, t.metric, out / "trials", out / "plots")
    export = getattr(cfg, "export", True)  # pretraining can skip its export; the HF stages always save
    if export:
        with ctx.step("export best"):
            best_cfg = type(cfg).model_validate(trial_config(base, best["config"], dists))
            outputs.remove(storage.join(ctx.storage, "train"))  # as in a trial: start from the checkpoint given
            launch(best_cfg, ctx.out, worker_log, ctx.seed, ctx.name, storage=ctx.storage, samples=worker_log.child(
                out / "samples.jsonl"), init_checkpoint=result.checkpoint, export=True, steps=best["step"])
    report = {
        "metric": t.metric, "mode": t.mode, "scheduler": t.scheduler.kind, "search": t.search,
        "best": {**best, "checkpoint": checkpoint_uri(result.checkpoint)}, "trials": trials,
        "exploits": sum(len(r["exploits"]) for r in trials), "model": ctx.uri("model") if export else None,
        "summary": _summary(trials, best, t, out, ctx),
    }
    return ctx.write_report(report)


def _prune_checkpoints(results) -> None:
    """Keep each trial's last Tune checkpoint (what a later exploit or export would use)."""
    from pyarrow.fs import FileSelector

    for r in results:
        keep = r.checkpoint.path.rstrip("/") if r.checkpoint else None
        for entry in r.filesystem.get_file_info(FileSelector(r.path)):
            if entry.base_name.startswith("checkpoint_") and entry.path.rstrip("/") != keep:
                r.filesystem.delete_dir(entry.path)


def _trial_row(result, t: TuneConfig, dists: dict, trials_dir: Path) -> dict:
    m = result.metrics or {}
    history = result.metrics_dataframe
    # Neither Tune's last metrics nor its history name the trial for sure: an exploit copies the donor's
    # metrics into the receiver, and its restart replaces the receiver's result.json by the copy last synced
    # to storage (Ray 2.60 `_restore_from_remote`: empty in a CI run, so a last-step receiver had no rows).
    # The trial dir is named by the id (`_trial_dirname`); a search started before that uses its history.
    trial_id = Path(result.path).name
    if not (trials_dir / trial_id).is_dir() and history is not None and "trial_id" in history and len(history):
        trial_id = history["trial_id"].iloc[0]
    events = read_jsonl(trials_dir / trial_id / "metrics.jsonl")
    attempts = attempt_records(events)
    # The metric as the trial's own log has it (every logged step), else as Tune has it.
    values = [e[t.metric] for _, steps in attempts for e in steps if finite(e.get(t.metric))]
    if not values and history is not None and t.metric in history:
        values = [v for v in history[t.metric] if finite(v)]
    return {
        "id": trial_id,
        "step": m.get("step"),
        "final": m.get(t.metric),
        "best": (min if t.mode == "min" else max)(values) if values else None,
        "stopped_early": not result.error and not any(e.get("event") == "completed" for e in events),
        # As the trial last ran it: after an exploit with no report since, Tune's result still holds the donor's.
        "config": {k: d.clamp(attempts[-1][0]["config"][k] if attempts else result.config[k])
                   for k, d in dists.items()},
        "exploits": [{"step": e["from_step"], "donor": e["donor"],
                      "config": {k: d.clamp(e["config"][k]) for k, d in dists.items()}}
                     for e in events if e.get("event") == "exploit"],
        "error": str(result.error).splitlines()[0] if result.error else None,
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(trials: list[dict], t: TuneConfig, out: Path) -> None:
    keys = list(t.space)
    header = ["trial", "status", "step", f"final {t.metric}", f"best {t.metric}", *keys, "exploits"]
    rows = []
    for r in trials:
        status = "error" if r["error"] else "stopped early" if r["stopped_early"] else "completed"
        lineage = "; ".join(f"step {e['step']} <- {e['donor']}" for e in r["exploits"])
        rows.append([r["id"], status, r["step"], _fmt(r["final"]), _fmt(r["best"]),
                     *[_fmt(r["config"][k]) for k in keys], lineage])
    with (out / "trials.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_trials(trials: list[dict], metric: str, trials_dir: Path, plots: Path) -> None:
    """plots/metric.png and plots/lr.png: a line per trial over its steps (lmfleet.tune.trials.draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    records = {r["id"]: read_jsonl(trials_dir / r["id"] / "metrics.jsonl") for r in trials}
    for key, name in ((metric, "metric"), (lr_key(records), "lr")):
        fig, ax = plt.subplots(figsize=(7, 4))
        draw(ax, trials, records, key)
        fig.tight_layout()
        fig.savefig(plots / f"{name}.png", dpi=100)
        plt.close(fig)


def _summary(trials: list[dict], best: dict, t: TuneConfig, out: Path, ctx) -> list[str]:
    stopped = sum(r["stopped_early"] for r in trials)
    exploits = sum(len(r["exploits"]) for r in trials)
    lines = [f"search: {len(trials)} trials ({t.scheduler.kind}, {t.search}): {stopped} stopped early, "
             f"{exploits} exploits, {sum(bool(r['error']) for r in trials)} errors",
             f"best: {best['id']} {t.metric} {best['final']:.4f} at step {best['step']} with "
             + ", ".join(f"{k}={_fmt(v)}" for k, v in best["config"].items()),
             f"trial table: {ctx.uri('trials.md')}; plots: {ctx.uri('plots')}"]
    return lines + (out / "trials.md").read_text(encoding="utf-8").splitlines()
