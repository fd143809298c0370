"""Supervised fine-tuning with TRL's SFTTrainer (optionally PEFT), on chat records.

Loss on completions only: the chat template marks assistant text with `{% generation %}` and TRL
masks every other token. Evaluation: perplexity of held-out answers, BLEU / ROUGE of greedy answers.
"""

from __future__ import annotations

from pathlib import Path

from lmfleet.posttrain.config import SFTStageConfig
from lmfleet.posttrain.hf import HFStage
from lmfleet.posttrain.models import load_tokenizer
from lmfleet.posttrain.records import read_sft
from lmfleet.posttrain.stage import quarantine_long_prompts
from lmfleet.runlog import read_jsonl


class SFT(HFStage):
    CONFIG = SFTStageConfig

    @classmethod
    def read(cls, cfg: SFTStageConfig, seed: int):
        return read_sft(cfg.dataset, seed)

    @classmethod
    def quarantine(cls, cfg: SFTStageConfig, records, tokenizer) -> None:
        if cfg.chat_template is not None:  # the prompts are measured in the template the trainer uses
            tokenizer.chat_template = cfg.chat_template
        quarantine_long_prompts(records, tokenizer, cfg.training.max_length)

    @classmethod
    def build_trainer(cls, cfg: SFTStageConfig, inputs, args: dict):
        from trl import SFTConfig, SFTTrainer

        return cls.build(SFTTrainer, SFTConfig, cfg, inputs, args, assistant_only_loss=cfg.completion_only,
                         packing=cfg.packing)

    @classmethod
    def evaluate(cls, cfg: SFTStageConfig, inputs, trained: str) -> dict:
        from lmfleet.posttrain.evaluate import bleu_rouge, completion_perplexity, device, generate
        from lmfleet.posttrain.models import load_causal_lm

        tok = load_tokenizer(Path(trained))
        val = read_jsonl(inputs.val)
        result: dict = {"val_records": len(val)}
        if not val:
            return result
        n = cfg.training.max_length
        sample = val[: cfg.eval.samples]
        prompts = [r["messages"][:-1] for r in sample]
        shown = 3  # examples in the report: the answers of the input model and of the trained one
        for name, path in (("before", Path(inputs.local("model"))), ("after", Path(trained))):
            model = load_causal_lm(path).to(device(inputs.use_gpu)).eval()
            result[f"perplexity_{name}"] = completion_perplexity(model, tok, val[:200], n)
            if name == "before" and sample:
                before = generate(model, tok, prompts[:shown], cfg.eval.generation, n)
        if sample:
            predictions = generate(model, tok, prompts, cfg.eval.generation, n)
            references = [r["messages"][-1]["content"] for r in sample]
            result.update(bleu_rouge(predictions, references))
            result["examples"] = [{"prompt": p[-1]["content"], "before": b, "after": a, "expected": e}
                                  for p, b, a, e in zip(prompts, before, predictions, references, strict=False)]
        return result

    @classmethod
    def summary(cls, e: dict, report: dict) -> list[str]:
        if "perplexity_after" not in e:
            return ["evaluation: no held-out records"]
        lines = [f"held-out answer perplexity: {e['perplexity_before']:.2f} -> {e['perplexity_after']:.2f}"]
        if "bleu" in e:
            lines.append(f"generations: BLEU {e['bleu']:.2f}, ROUGE-1 {e['rouge1']:.3f}, ROUGE-L {e['rougeL']:.3f}")
        return lines
