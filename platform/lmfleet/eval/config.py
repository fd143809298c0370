"""Config of the `eval` stage: models x tasks (lmfleet.eval.stage; the tasks: lmfleet.eval.task_config)."""

from __future__ import annotations

from pydantic import Field, model_validator

from lmfleet.config import StrictModel
from lmfleet.eval.task_config import Task, check_task_names
from lmfleet.train.config import ScalingConfig


class EvalScalingConfig(ScalingConfig):
    """The pretraining vocabulary: `num_workers` here is the Ray actors per model (each loads the model and
    scores a share of every task's batches); models are evaluated one after another."""

    num_workers: int = Field(1, ge=1, description="Actors per model.")


class EvalStageConfig(StrictModel):
    models: list[str] = Field(..., min_length=1, description="Stages of this run (their model/) or model dirs / URIs: "
                                                            "HF causal LMs or lmfleet exports.")
    tasks: list[Task] = Field(..., min_length=1)
    max_length: int = Field(2048, ge=8, description="Tokens a model sees at once (capped by its own context).")
    batch_size: int = Field(8, ge=1, description="Records per batch; a batch is scored whole by one actor, so the "
                                                 "results do not depend on the actor count.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Of the reported intervals.")
    bootstrap: int = Field(1000, ge=0, description="Resamples for the intervals of corpus metrics (perplexity, BLEU, "
                                                   "macro F1); 0: none.")
    scaling: EvalScalingConfig = EvalScalingConfig()

    @model_validator(mode="after")
    def _names(self):
        check_task_names(self.tasks)
        if len(set(self.models)) < len(self.models):
            raise ValueError(f"models: a model is listed twice: {self.models}")
        return self
