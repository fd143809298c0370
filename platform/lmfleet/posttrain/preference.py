"""What the offline preference stages on TRL trainers share (kto, orpo, simpo; dpo adds a reward-model
comparison): reading the records, the trainer's construction, evaluation and summary."""

from __future__ import annotations

from pathlib import Path

from lmfleet.errors import InputError
from lmfleet.posttrain.hf import peft_config, quarantine_long_prompts, run_hf_stage, split_datasets
from lmfleet.posttrain.inputs import check_inputs
from lmfleet.posttrain.models import input_model, load_tokenizer
from lmfleet.uri import local_copy

TRACKED = ("rewards/margins", "rewards/accuracies")  # what TRL logs and the report keeps first / last of


def build(trainer_cls, config_cls, cfg, paths: dict, args: dict, **options):
    """`trainer_cls` (a TRL preference trainer) on the input model, with `config_cls(**args, **options)`."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(Path(paths["model"]))
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(paths["model"]),
        args=config_cls(**args, max_length=cfg.training.max_length, **options),
        **split_datasets(paths),
        processing_class=tok,
        peft_config=peft_config(cfg.peft, "CAUSAL_LM"),
    )
    return trainer, tok, "CAUSAL_LM"


def evaluate(cfg, paths: dict) -> dict:
    from lmfleet.posttrain.evaluate import preference_evaluation

    return preference_evaluation(cfg, paths)[0]


def summary(e: dict, report: dict) -> list[str]:
    from lmfleet.posttrain.evaluate import preference_line

    return [preference_line(e)]


def run_preference_stage(kind: str, cfg, ctx, read) -> dict:
    """Preflight, read the records with `read(dataset, seed)` (prompts that leave no room for an answer are
    quarantined), then train and evaluate `kind` (registered in lmfleet.posttrain.hf.STAGES)."""
    check_inputs(cfg, run_dir=ctx.run_dir, kind=kind)
    paths = {"model": input_model(cfg.model, ctx.run_dir)}
    with ctx.step("read"):
        records = read(cfg.dataset, ctx.seed)
        quarantine_long_prompts(records, load_tokenizer(local_copy(paths["model"])), cfg.training.max_length)
    if not records.train:
        raise InputError(f"{kind}.dataset: no records left to train on ({records.counts()})")
    return run_hf_stage(kind, cfg, ctx, records, paths)
