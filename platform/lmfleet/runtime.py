"""The one Ray Train runtime under every trainer (pretraining, the HF / TRL stages, the RL stages).

The driver side: `launch` starts a `TorchTrainer` with the stage's scaling (a fixed count, or elastic
[min, max]), failure and checkpoint policy (`checkpoint.keep_last`, `checkpoint.max_failures`) and
storage, handing every worker one typed `WorkerRun`. The worker side: `step_seed` (the RNG seed of a
step, rank and stream, so no RNG state is checkpointed), `save_checkpoint` (write a checkpoint dir and
report it with the step's metrics) and `latest_checkpoint` (the run's newest, else a given start).
Low-level: imports no runner and no stage.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmfleet.runlog import MetricsLog

# Streams of step_seed: what the seed draws, so two uses of one step never share a seed.
SAMPLING, SHUFFLE, ORDER = 0, 1, 2


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """The seed of (run seed, step, rank, stream): pretraining's dropout (stream = pipeline stage), the RL
    stages' sampling, mini-batch order and prompt order. Distinct (rank, stream) pairs of one step never
    share a seed while streams stay below 131; across steps a seed may recur (step 1 rank 0 = step 0 rank 60
    stream 59), which no use here reaches."""
    return seed * 1_000_003 + step * 7919 + rank * 131 + stream


@dataclass(frozen=True)
class WorkerRun:
    """What every Ray Train worker gets (`train_loop_config={"run": WorkerRun}`): the validated stage config,
    the stage's typed inputs (paths or URIs; nodes copy what they read) and the run's plumbing."""

    cfg: Any  # the stage's config model
    stage_class: Any  # the class whose worker code runs: a post-training stage or an RL trainer (None: pretrain)
    inputs: Any  # the stage's worker inputs (a frozen dataclass)
    seed: int
    stage: str  # the stage's name (metrics records carry it)
    metrics: MetricsLog  # through the driver node's appender (lmfleet.runlog)
    tags: dict = field(default_factory=dict)  # added to every metrics record (a Tune trial's attempt)
    init_checkpoint: Any = None  # where a run without checkpoints of its own starts (a Tune trial's donor)
    stop_at: int | None = None  # stop at this step (the schedule still spans the config's steps)
    export: bool = True  # write the trained model
    tty: bool = False  # progress bars


def launch(worker: Callable[[dict], None], run: WorkerRun, *, storage: str, use_gpu: bool, callbacks=()):
    """One Ray Train run of `worker` on `run.cfg.scaling`'s workers, its run dir `storage`/train (a path or
    URI), recovering `run.cfg.checkpoint.max_failures` worker failures from the last of the
    `keep_last` checkpoints it keeps; returns the Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling, checkpoint = run.cfg.scaling, run.cfg.checkpoint
    lo, hi = scaling.bounds
    trainer = TorchTrainer(
        worker,
        train_loop_config={"run": run},
        scaling_config=ScalingConfig(
            num_workers=hi if lo == hi else (lo, hi), use_gpu=use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
            **({} if lo == hi else {"elastic_resize_monitor_interval_s": 3}),
        ),
        run_config=RunConfig(
            name="train", storage_path=storage, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoint.keep_last),
        ),
    )
    return trainer.fit()


def tty() -> bool:
    return sys.stderr.isatty()


def save_checkpoint(metrics: dict, name: str, write: Callable[[Path], None] | None) -> None:
    """Report `metrics` with a checkpoint named `name`: `write(dir)` fills this rank's part (None: this rank
    has none). Ray Train merges the ranks' dirs and registers the checkpoint once all uploaded."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if write is not None:
            write(Path(d))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


@contextmanager
def latest_checkpoint(init=None) -> Iterator[Path | None]:
    """The run's newest checkpoint as a local dir (a restarted worker group's), else `init`'s, else None."""
    import ray.train

    ckpt = ray.train.get_checkpoint() or init
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def worker_device(use_gpu: bool):
    """A Ray Train worker's torch device: its GPU (Ray Train assigns one per worker) or the CPU."""
    import torch

    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")
