"""The stage registry: each stage kind is a config model plus one function that runs it on Ray.

Modules are imported on first use, so `lmfleet validate` does not import torch or Ray for stages a
config does not use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from lmfleet.config import RunConfig, StrictModel, validate_model
from lmfleet.errors import ConfigError


@dataclass(frozen=True)
class _Entry:
    config: str  # "module:ConfigModel"
    run: str  # "module:function(config, ctx) -> report dict" (a post-training stage: "module:Class.run")
    # "module:function(config, upstream, run_dir) -> list[Input]": InputError before any work; the inputs
    # it returns are checked against the run dir and make part of the stage's fingerprint (lmfleet.inputs).
    preflight: str
    resumes: bool = False  # an interrupted run of the same config continues from its checkpoints


_REGISTRY: dict[str, _Entry] = {
    "data": _Entry(
        "lmfleet.data.config:DataConfig",
        "lmfleet.data.stage:run_data_stage",
        "lmfleet.data.stage:check_inputs",
    ),
    "distill_data": _Entry(
        "lmfleet.data.config:DistillDataConfig",
        "lmfleet.data.distill:run_distill_data_stage",
        "lmfleet.data.distill:check_inputs",
    ),
    "pretrain": _Entry(
        "lmfleet.train.config:PretrainConfig",
        "lmfleet.train.stage:run_pretrain_stage",
        "lmfleet.train.stage:check_inputs",
        resumes=True,
    ),
    "prune": _Entry(
        "lmfleet.prune.config:PruneStageConfig",
        "lmfleet.prune.stage:run_prune_stage",
        "lmfleet.prune.stage:check_inputs",
    ),
    "eval": _Entry(
        "lmfleet.eval.config:EvalStageConfig",
        "lmfleet.eval.stage:run_eval_stage",
        "lmfleet.eval.stage:check_inputs",
    ),
    "sft": _Entry(
        "lmfleet.posttrain.config:SFTStageConfig",
        "lmfleet.posttrain.sft:SFT.run",
        "lmfleet.posttrain.inputs:check_inputs",
        resumes=True,
    ),
    "reward": _Entry(
        "lmfleet.posttrain.config:RewardStageConfig",
        "lmfleet.posttrain.reward:Reward.run",
        "lmfleet.posttrain.inputs:check_inputs",
        resumes=True,
    ),
    "dpo": _Entry(
        "lmfleet.posttrain.config:DPOStageConfig",
        "lmfleet.posttrain.dpo:DPO.run",
        "lmfleet.posttrain.inputs:check_inputs",
        resumes=True,
    ),
    "distill": _Entry(
        "lmfleet.posttrain.config:DistillStageConfig",
        "lmfleet.posttrain.distill:Distill.run",
        "lmfleet.posttrain.inputs:check_inputs",
        resumes=True,
    ),
    "kto": _Entry(
        "lmfleet.posttrain.config:KTOStageConfig",
        "lmfleet.posttrain.kto:KTO.run",
        "lmfleet.posttrain.inputs:check_inputs",
        resumes=True,
    ),
    "orpo": _Entry(
        "lmfleet.posttrain.config:ORPOStageConfig",
        "lmfleet.posttrain.orpo:ORPO.run",
        "lmfleet.posttrain.inputs:check_inputs",
        resumes=True,
    ),
    "simpo": _Entry(
        "lmfleet.posttrain.config:SimPOStageConfig",
        "lmfleet.posttrain.simpo:SimPO.run",
        "lmfleet.posttrain.inputs:check_inputs",
        resumes=True,
    ),
    "ppo": _Entry(
        "lmfleet.posttrain.config:PPOStageConfig",
        "lmfleet.posttrain.ppo:PPO.run",
        "lmfleet.posttrain.inputs:check_rl",
        resumes=True,
    ),
    "grpo": _Entry(
        "lmfleet.posttrain.config:GRPOStageConfig",
        "lmfleet.posttrain.grpo:GRPO.run",
        "lmfleet.posttrain.inputs:check_rl",
        resumes=True,
    ),
    "rloo": _Entry(
        "lmfleet.posttrain.config:RLOOStageConfig",
        "lmfleet.posttrain.rloo:RLOO.run",
        "lmfleet.posttrain.inputs:check_rl",
        resumes=True,
    ),
}


def _load(ref: str) -> Any:
    module, attrs = ref.split(":")
    value = importlib.import_module(module)
    for attr in attrs.split("."):
        value = getattr(value, attr)
    return value


def kinds() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    config: StrictModel

    def run(self, ctx) -> dict:
        return _load(_REGISTRY[self.kind].run)(self.config, ctx)

    @property
    def resumes(self) -> bool:
        return _REGISTRY[self.kind].resumes

    def preflight(self, upstream: set[str], run_dir) -> list:
        """Check inputs exist (those of `upstream` stages, run before this one now, come later); returns
        the stage's inputs (lmfleet.inputs.Input)."""
        return _load(_REGISTRY[self.kind].preflight)(self.config, upstream, run_dir)


def resolve_stages(run: RunConfig, source: str) -> list[StageSpec]:
    """Validate each stage's section against the model of its kind (kind = `kind:` field or the key)."""
    specs = []
    for name, section in run.stages.items():
        section = dict(section)
        kind = section.pop("kind", name)
        if not isinstance(kind, str) or kind not in _REGISTRY:
            raise ConfigError(
                f"{source}: stages.{name}: unknown stage kind {kind!r}; expected one of {', '.join(kinds())}"
            )
        model = _load(_REGISTRY[kind].config)
        specs.append(StageSpec(name, kind, validate_model(model, section, source, ("stages", name))))
    return specs
