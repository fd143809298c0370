"""Preflight of the post-training stages: the model dirs each one reads and its dataset files.

Kept apart from the stage modules so `lmfleet validate` checks inputs without importing torch or TRL.
"""

from __future__ import annotations

from pathlib import Path

from lmfleet.eval.tasks import task_inputs
from lmfleet.inputs import Input
from lmfleet.model.hf_config import model_dir
from lmfleet.posttrain.models import check_model_dir
from lmfleet.posttrain.records import dataset_files, dataset_paths

MODEL_KEYS = ("model", "reward_model", "student_model")  # the config keys that name an input model


def check_inputs(cfg, upstream: set[str] = frozenset(), run_dir: Path | None = None) -> list[Input]:
    """Every model the stage reads is a HF dir (or an earlier stage of this run) and its dataset paths
    exist; InputError naming the key otherwise. Returns the stage's inputs."""
    kind = cfg.KIND
    inputs = []
    for key in MODEL_KEYS:
        ref = getattr(cfg, key, None)
        if ref is not None:
            check_model_dir(ref, f"{kind}.{key}", upstream, run_dir, full_weights=True)
            inputs.append(Input(key, (model_dir(ref, run_dir),)))
    inputs.append(Input("dataset.paths", tuple(dataset_paths(cfg.dataset)), tuple(dataset_files(cfg.dataset))))
    if getattr(cfg, "eval_tasks", None) is not None:
        inputs += task_inputs(cfg.eval_tasks.tasks, f"{kind}.eval_tasks.tasks")
    return inputs


def check_rl(cfg, upstream: set[str] = frozenset(), run_dir: Path | None = None) -> list[Input]:
    """The RL stages (ppo, grpo, rloo): their models and dataset, and every reward function loads (a file's
    text is part of the stage's inputs: editing it re-runs the stage)."""
    from lmfleet.posttrain.rewards import RewardFunctions

    inputs = check_inputs(cfg, upstream, run_dir)
    sources = RewardFunctions.load(cfg.reward_functions).sources
    if sources:
        inputs.append(Input("reward_functions", tuple(Path(p).resolve() for p in sources)))
    return inputs
