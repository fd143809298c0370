"""Config of the `prune` stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmfleet.config import StrictModel
from lmfleet.train.config import BatchConfig, LRScheduleConfig, OptimizerConfig, ParallelConfig, ScalingConfig


class StructuredConfig(StrictModel):
    heads: float = Field(0.0, ge=0, lt=1, description="Fraction of each layer's key/value head groups removed "
                                                      "(with the query heads that read them).")
    ffn: float = Field(0.0, ge=0, lt=1, description="Fraction of each layer's feed-forward channels removed.")


class RecoveryConfig(StrictModel):
    """Fine-tuning of the pruned model in the pretraining loop (magnitude: its zeros held at zero)."""

    steps: int = Field(0, ge=0, description="0: no recovery; the pruned model is the export.")
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3)
    lr_schedule: LRScheduleConfig = LRScheduleConfig(decay="constant")
    batch: BatchConfig = BatchConfig()
    parallel: ParallelConfig = ParallelConfig(strategy="none")
    scaling: ScalingConfig = ScalingConfig()

    @model_validator(mode="after")
    def _layout(self):
        if self.parallel.strategy == "deepspeed":
            raise ValueError("recovery.parallel.strategy deepspeed: its fp32 master weights would bring pruned "
                             "weights back; use none, ddp or fsdp")
        return self


class PruneStageConfig(StrictModel):
    model: str = Field(..., description="The model to prune: a stage of this run (its model/) or a model dir / URI "
                                        "(an lmfleet export or a HF Llama / Mixtral dir).")
    data: str = Field(..., description="Packed data (a data stage of this run or its dir): validation perplexity "
                                       "before and after, and recovery's training data.")
    method: Literal["magnitude", "structured"] = "magnitude"
    sparsity: float = Field(0.5, gt=0, lt=1, description="magnitude: the fraction of prunable weights set to 0.")
    scope: Literal["global", "layer"] = Field("global", description="magnitude: one threshold for every matrix, "
                                                                     "or the sparsity in each matrix.")
    structured: StructuredConfig = StructuredConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    eval_batches: int = Field(8, ge=1, description="Validation batches (of recovery.batch.global_batch samples).")

    @model_validator(mode="after")
    def _method(self):
        if self.method == "structured" and not (self.structured.heads or self.structured.ffn):
            raise ValueError("method structured: set structured.heads and / or structured.ffn (fractions to remove)")
        if self.method == "magnitude" and "structured" in self.model_fields_set:
            raise ValueError("structured: only for method structured (magnitude uses sparsity and scope)")
        return self
