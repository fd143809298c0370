"""Sharded checkpoints: torch.distributed.checkpoint (DCP) for every strategy but DeepSpeed (its own).

Each rank writes its shards into its own local dir and reports it to Ray Train, which merges the
ranks' files into one checkpoint dir in storage and registers it only once every rank uploaded:
a checkpoint is visible only when complete. DCP reshards on load, so a run resumes on another
worker count (elastic) or another parallel layout. RNG needs no state: it is reseeded from
(seed, step, rank) every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

TRAINER_STATE = "trainer_state.json"
DS_TAG = "deepspeed"
BEST = "best"  # early stopping's best weights (DCP, model only), next to the run's state


def model_state(model: nn.Module) -> dict:
    """This rank's part of the weights by name (DTensor shards under FSDP / TP; DDP's prefix removed)."""
    return get_model_state_dict(model)


def set_model_state(model: nn.Module, state: dict) -> None:
    set_model_state_dict(model, state)


def save(directory: Path, model: nn.Module, optimizer, trainer_state: dict, rank: int, deepspeed_engine=None,
         best: dict | None = None) -> None:
    """`best`: early stopping's copy of the weights (`model_state`'s layout), saved in `BEST`/ too."""
    if best is not None:
        dcp.save({"best": best}, checkpoint_id=str(directory / BEST))
    if deepspeed_engine is not None:
        deepspeed_engine.save_checkpoint(str(directory), tag=DS_TAG)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    if rank == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(trainer_state), encoding="utf-8")


def load(directory: Path, model: nn.Module, optimizer, deepspeed_engine=None) -> dict:
    """Restore model and optimizer in place; returns the trainer state (step, data position, ...)."""
    if deepspeed_engine is not None:
        deepspeed_engine.load_checkpoint(str(directory), tag=DS_TAG)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8"))


def load_best(directory: Path, template: dict) -> None:
    """Fill `template` (`model_state`'s layout, this rank's shards) with the saved best weights, in place."""
    dcp.load({"best": template}, checkpoint_id=str(directory / BEST))
