"""Supervised fine-tuning with TRL's SFTTrainer (optionally PEFT), on chat records.

Loss on completions only: the chat template marks assistant text with `{% generation %}` and TRL
masks every other token. Evaluation: perplexity of held-out answers, BLEU / ROUGE of greedy answers.
"""

from __future__ import annotations

from pathlib import Path

from lmfleet.posttrain.config import SFTStageConfig
from lmfleet.posttrain.hf import (
    peft_config,
    quarantine_long_prompts,
    read_jsonl,
    run_hf_stage,
    split_datasets,
)
from lmfleet.posttrain.inputs import check_sft
from lmfleet.posttrain.models import input_model, load_tokenizer
from lmfleet.posttrain.records import read_sft
from lmfleet.uri import local_copy

CONFIG = SFTStageConfig


def build_trainer(cfg: SFTStageConfig, paths: dict, args: dict):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(Path(paths["model"]), cfg.chat_template)
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**args, max_length=cfg.training.max_length, assistant_only_loss=cfg.completion_only,
                       packing=cfg.packing),
        **split_datasets(paths),
        processing_class=tok,
        peft_config=peft_config(cfg.peft, "CAUSAL_LM"),
    )
    return trainer, tok, "CAUSAL_LM"


def evaluate(cfg: SFTStageConfig, paths: dict) -> dict:
    from lmfleet.posttrain.evaluate import bleu_rouge, completion_perplexity, device, generate
    from lmfleet.posttrain.models import load_causal_lm

    out = Path(paths["trained"])
    tok = load_tokenizer(out)
    val = read_jsonl(paths["val"])
    result: dict = {"val_records": len(val)}
    if not val:
        return result
    n = cfg.training.max_length
    for name, path in (("before", Path(paths["model"])), ("after", out)):
        model = load_causal_lm(path).to(device(paths["use_gpu"])).eval()
        result[f"perplexity_{name}"] = completion_perplexity(model, tok, val[:200], n)
    sample = val[: cfg.eval.samples]
    if sample:
        prompts = [r["messages"][:-1] for r in sample]
        predictions = generate(model, tok, prompts, cfg.eval.generation, n)
        result.update(bleu_rouge(predictions, [r["messages"][-1]["content"] for r in sample]))
        result["examples"] = [{"prompt": p[-1]["content"], "answer": a} for p, a in zip(prompts[:3], predictions[:3],
                                                                                        strict=True)]
    return result


def summary(e: dict, report: dict) -> list[str]:
    if "perplexity_after" not in e:
        return ["evaluation: no held-out records"]
    lines = [f"held-out answer perplexity: {e['perplexity_before']:.2f} -> {e['perplexity_after']:.2f}"]
    if "bleu" in e:
        lines.append(f"generations: BLEU {e['bleu']:.2f}, ROUGE-1 {e['rouge1']:.3f}, ROUGE-L {e['rougeL']:.3f}")
    return lines


def run_sft_stage(cfg: SFTStageConfig, ctx) -> dict:
    check_sft(cfg, run_dir=ctx.run_dir)
    path = input_model(cfg.model, ctx.run_dir)
    with ctx.step("read"):
        records = read_sft(cfg.dataset, ctx.seed)
        quarantine_long_prompts(records, load_tokenizer(local_copy(path), cfg.chat_template), cfg.training.max_length)
    return run_hf_stage("sft", cfg, ctx, records, {"model": path})
