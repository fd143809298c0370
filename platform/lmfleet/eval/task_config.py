"""Config of the eval stage's tasks, which training stages also score (`eval_tasks:` of pretrain and sft).
Apart from the stage's config (lmfleet.eval.config): the training configs import these without a cycle."""

from __future__ import annotations

import importlib.util
import string
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lmfleet.config import StrictModel


def template_fields(template: str) -> list[str]:
    """The record fields a prompt template names ({question} -> question)."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


class _Task(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the task in the report and "
                                                                                 "its predictions file.")
    limit: int | None = Field(None, ge=1, description="Only the first `limit` valid records.")


class _FileTask(_Task):
    path: str = Field(..., description="A JSONL file or JSON list of records (a path or URI).")


class PerplexityTask(_FileTask):
    """Held-out text: the model's log-likelihood of each document in windows of max_length tokens (lm-eval's
    loglikelihood_rolling), as token and word perplexity and bits per byte (comparable across tokenizers)."""

    kind: Literal["perplexity"]
    text_field: str = "text"

    def record_fields(self) -> list[str]:
        return [self.text_field]


class _Prompted(_FileTask):
    prompt: str = Field(..., description="The context, a template over the record's fields: '{question}\\nAnswer:'.")

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            names = template_fields(v)
        except ValueError as err:
            raise ValueError(f"{v!r}: not a template of {{field}} names ({err}); write {{{{ and }}}} for braces") from None
        odd = [n for n in names if not n.isidentifier()]
        if odd:
            raise ValueError(f"{v!r}: {{{odd[0]}}}: name a top-level field of the records")
        return v

    def own_fields(self) -> list[str]:
        raise NotImplementedError

    def record_fields(self) -> list[str]:
        """The record fields the task reads: those its prompt names, then its own."""
        return [*template_fields(self.prompt), *self.own_fields()]


class MultipleChoiceTask(_Prompted):
    """Log-likelihood of each choice after the prompt: accuracy (the likeliest) and normalized accuracy (the
    likeliest per byte), as lm-eval's multiple_choice output type."""

    kind: Literal["multiple_choice"]
    choices_field: str = "choices"
    answer_field: str = Field("answer", description="The right choice: its index, or its text.")
    delimiter: str = Field(" ", description="Between the prompt and each choice (lm-eval's target_delimiter).")

    def own_fields(self) -> list[str]:
        return [self.choices_field, self.answer_field]


class ClassificationTask(_Prompted):
    """Each label's verbalizer scored as a choice; accuracy and per-class precision / recall / F1."""

    kind: Literal["classification"]
    label_field: str = "label"
    labels: list[str] | dict[str, str] = Field(..., min_length=2, description="The classes: a list of the texts "
                                               "scored after the prompt, or {label in the records: text scored}.")
    delimiter: str = " "

    def own_fields(self) -> list[str]:
        return [self.label_field]

    @property
    def verbalizers(self) -> dict[str, str]:
        return self.labels if isinstance(self.labels, dict) else {v: v for v in self.labels}


GenerateMetric = Literal["exact_match", "f1", "bleu", "rouge_l", "python"]


class GenerateTask(_Prompted):
    """Generation after the prompt, cut at the first stop string, against the reference answer(s)."""

    kind: Literal["generate"]
    answer_field: str = Field("answer", description="The reference: a string or a list of acceptable ones.")
    metrics: list[GenerateMetric] = Field(["exact_match", "f1"], min_length=1, description=(
        "exact_match / f1: SQuAD-normalized; bleu: sacrebleu corpus BLEU; rouge_l; python: the prompt + generation "
        "+ the record's `test_field` code run by Python (needs allow_code_execution)."))
    max_new_tokens: int = Field(64, ge=1)
    stop: list[str] = Field(["\n\n"], description="Generation ends at the first of these (not included).")
    temperature: float = Field(0.0, ge=0, description="0: greedy; else sampled, seeded by (stage seed, record).")
    top_p: float = Field(1.0, gt=0, le=1)
    chat: bool = Field(False, description="Wrap the prompt in the model's chat template (post-trained models).")
    test_field: str = "test"
    allow_code_execution: bool = Field(False, description="python: runs model-written code in a subprocess of this "
                                       "Python (timeout, no other sandbox): set only where that is acceptable.")
    timeout_s: float = Field(10.0, gt=0, description="python: per record.")

    def own_fields(self) -> list[str]:
        return [self.answer_field, *([self.test_field] if "python" in self.metrics else [])]

    @model_validator(mode="after")
    def _code(self):
        if "python" in self.metrics and not self.allow_code_execution:
            raise ValueError("metric python runs the model's code: set allow_code_execution: true to allow it")
        return self


class LmEvalTask(_Task):
    """lm-evaluation-harness tasks run through lmfleet's model adapter (lmfleet.eval.harness): task YAMLs of a
    local folder whose datasets are local files (dataset_path: json, data_files beside the YAML)."""

    kind: Literal["lm_eval"]
    tasks: list[str] = Field(..., min_length=1, description="lm-eval task, group or tag names.")
    include_path: str | None = Field(None, description="A local folder of task YAMLs and their data files: shipped "
                                     "to the actor that runs them (relative data_files resolve there).")
    include_defaults: bool = Field(False, description="Also lm-eval's built-in tasks (their datasets come from "
                                   "the Hugging Face Hub: only where the nodes reach it or have them cached).")
    num_fewshot: int | None = Field(None, ge=0, description="None: each task's own setting.")
    chat: bool = Field(False, description="lm-eval's apply_chat_template.")
    allow_code_execution: bool = Field(False, description="lm-eval's confirm_run_unsafe_code (code tasks).")

    @model_validator(mode="after")
    def _installed(self):
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("kind lm_eval needs the 'lm-eval' package: pip install 'lmfleet[eval]'")
        if self.include_path is None and not self.include_defaults:
            raise ValueError("set include_path (a folder of task YAMLs) or include_defaults: true")
        return self


Task = Annotated[PerplexityTask | MultipleChoiceTask | ClassificationTask | GenerateTask | LmEvalTask,
                 Field(discriminator="kind")]


def check_task_names(tasks) -> None:
    """A task's name names its report entry and predictions file: ValueError for a name used twice."""
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")


class TrainingTasksConfig(StrictModel):
    """`eval_tasks:` of a training stage: eval stage tasks scored on the whole model every `every` steps by the
    first worker (the others wait at the next step), logged as task/<name>/<metric>. No lm_eval tasks here (an
    eval stage runs those)."""

    every: int = Field(..., ge=1, description="Steps between evaluations (and at the last step).")
    tasks: list[Annotated[PerplexityTask | MultipleChoiceTask | ClassificationTask | GenerateTask,
                          Field(discriminator="kind")]] = Field(..., min_length=1)
    max_length: int | None = Field(None, ge=8, description="None: the model's context.")
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _names(self):
        check_task_names(self.tasks)
        return self
