"""Knowledge distillation: a smaller student learns from a teacher's logits (Hinton et al., 2015).

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels), over the answer
tokens of chat records (the SFT data pipeline: same template, same completion masking). The student
is a HF model dir, or built from the teacher's config with smaller sizes and seeded initial weights.
Works after pretraining (teacher = the pretrain export) or after SFT.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from lmfleet.posttrain.config import DistillStageConfig
from lmfleet.posttrain.hf import HFStage
from lmfleet.posttrain.models import load_tokenizer
from lmfleet.posttrain.records import read_sft
from lmfleet.runlog import read_jsonl

_SIZES = {"n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
          "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size"}


def build_student(cfg: DistillStageConfig, teacher_dir: Path, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(teacher_dir))
    for ours, theirs in _SIZES.items():
        value = getattr(cfg.student, ours)
        if value is not None:
            setattr(config, theirs, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(seed)  # the same initial student on every worker
    return AutoModelForCausalLM.from_config(config)


class DistillationTrainer(SFTTrainer):
    """SFTTrainer whose loss is the temperature-scaled KL to a frozen teacher mixed with the LM loss."""

    def __init__(self, *args, teacher, temperature: float, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: let the Trainer scale for accumulation
        self._parts: dict[str, list[float]] = {"kl": [], "lm_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        feed = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        out = model(**feed)
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        student = out.logits[:, :-1][mask].float()
        with torch.no_grad():
            teacher = self.teacher(**feed).logits[:, :-1][mask].float()
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                      reduction="batchmean") * t * t
        lm = F.cross_entropy(student, labels[mask])
        loss = self.alpha * kl + (1 - self.alpha) * lm
        if model.training:
            self._parts["kl"].append(float(kl))
            self._parts["lm_loss"].append(float(lm))
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        for key, values in self._parts.items():
            if values and "loss" in logs:
                logs[key] = sum(values) / len(values)
                values.clear()
        super().log(logs, *args, **kwargs)


class Distill(HFStage):
    CONFIG = DistillStageConfig
    TRACKED = ("kl", "lm_loss")  # logged per step; first and final values go in the report

    @classmethod
    def read(cls, cfg: DistillStageConfig, seed: int):
        return read_sft(cfg.dataset, seed)

    @classmethod
    def build_trainer(cls, cfg: DistillStageConfig, inputs, args: dict):
        from transformers import AutoModelForCausalLM
        from trl import SFTConfig

        teacher_dir = Path(inputs.model)
        if inputs.student_model is not None:
            student = AutoModelForCausalLM.from_pretrained(inputs.student_model)
        else:
            student = build_student(cfg, teacher_dir, args["seed"])
        return cls.build(partial(DistillationTrainer, teacher=AutoModelForCausalLM.from_pretrained(str(teacher_dir)),
                                 temperature=cfg.temperature, alpha=cfg.alpha),
                         SFTConfig, cfg, inputs, args, model=student, assistant_only_loss=True)

    @classmethod
    def evaluate(cls, cfg: DistillStageConfig, inputs, trained: str) -> dict:
        from lmfleet.posttrain.evaluate import completion_perplexity, device
        from lmfleet.posttrain.models import load_causal_lm

        tok = load_tokenizer(Path(trained))
        val = read_jsonl(inputs.val)[:200]
        result: dict = {"val_records": len(val)}
        for name, path in (("teacher", Path(inputs.local("model"))), ("student", Path(trained))):
            model = load_causal_lm(path).to(device(inputs.use_gpu)).eval()
            result[f"{name}_params"] = sum(p.numel() for p in model.parameters())
            if val:
                result[f"{name}_perplexity"] = completion_perplexity(model, tok, val, cfg.training.max_length)
        return result

    @classmethod
    def summary(cls, e: dict, report: dict) -> list[str]:
        lines = []
        if report["first_kl"] is not None:
            lines.append(f"KL to the teacher: {report['first_kl']:.4f} -> {report['final_kl']:.4f}")
        line = f"student {e['student_params']:,} params, teacher {e['teacher_params']:,}"
        if "student_perplexity" in e:
            line += (f"; held-out answer perplexity: student {e['student_perplexity']:.2f}, "
                     f"teacher {e['teacher_perplexity']:.2f}")
        return [*lines, line]
