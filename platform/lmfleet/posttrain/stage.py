"""The post-training stage interface: one config + one class per algorithm, registered once in lmfleet.stages.

`PostTrainStage.run` is the generic stage: preflight -> read and quarantine records (data/) -> train on Ray
Train (lmfleet.runtime) -> evaluate the exported model/ in a Ray task (eval.json) -> report.json. A kind
says what differs: its config model (`CONFIG`), how it reads records (`read`), how it trains (`train`:
`HFStage` runs a HF / TRL trainer in every worker, lmfleet.posttrain.hf; `RLStage` its own RL worker,
lmfleet.posttrain.rl), what it evaluates (`evaluate`) and the summary lines of its evaluation (`summary`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmfleet.errors import InputError
from lmfleet.eval.tasks import TaskRecords, tasks_section, training_tasks
from lmfleet.model.hf_config import input_model
from lmfleet.outputs import child
from lmfleet.posttrain.inputs import MODEL_KEYS, check_inputs
from lmfleet.posttrain.models import load_tokenizer
from lmfleet.posttrain.records import Records, prompt_of
from lmfleet.runtime import tty
from lmfleet.uri import is_uri, local_copy


@dataclass(frozen=True)
class StageInputs:
    """What the driver hands every worker and the evaluation task: paths or URIs (a node reads a model on an
    object store through its own copy: `local`)."""

    model: str  # the input model (a policy, a teacher, ...)
    train: str  # data/train.jsonl of the stage dir
    val: str  # data/val.jsonl
    out: str  # the stage dir
    use_gpu: bool
    reward_model: str | None = None
    student_model: str | None = None
    tasks: tuple[TaskRecords, ...] = ()  # eval_tasks: their records, read by the driver

    def local(self, name: str) -> str | None:
        """A model of this node: the path, or this node's copy of a URI."""
        ref = getattr(self, name)
        return str(local_copy(ref, name)) if ref is not None and is_uri(ref) else ref

    @property
    def export(self) -> str:
        """The trained model: model/ of the stage dir."""
        return str(child(self.out, "model"))


class PostTrainStage:
    """A post-training stage kind. Subclasses set CONFIG (its config model, whose KIND names the kind) and
    implement read / evaluate / summary; HFStage and RLStage implement train for their families."""

    CONFIG: ClassVar[type]

    @classmethod
    def read(cls, cfg, seed: int) -> Records:
        """The stage's records from cfg.dataset, quarantined per record (lmfleet.posttrain.records)."""
        raise NotImplementedError

    @classmethod
    def quarantine(cls, cfg, records: Records, tokenizer) -> None:
        """Records the trainer could not use (too long: TRL's trainers would drop them silently)."""
        quarantine_long_prompts(records, tokenizer, cfg.training.max_length)

    @classmethod
    def write_data(cls, cfg, records: Records, ctx) -> None:
        records.write(ctx.out_dir / "data")

    @classmethod
    def worker_inputs(cls, cfg, ctx, inputs: StageInputs) -> StageInputs:
        """The typed inputs of the stage's workers and evaluation: `inputs`, or a subclass with more."""
        return inputs

    @classmethod
    def train(cls, cfg, ctx, records: Records, inputs: StageInputs) -> dict:
        """Train on Ray Train; returns the report's training part: its `summary` lines come before the
        evaluation's, `summary_after` lines (a search's trial table) after them."""
        raise NotImplementedError

    @classmethod
    def evaluate(cls, cfg, inputs: StageInputs, trained: str) -> dict:
        """Runs in a Ray task with one worker's resources: the trained model (`trained`, a local dir) against
        the input model on held-out records."""
        raise NotImplementedError

    @classmethod
    def summary(cls, evaluation: dict, report: dict) -> list[str]:
        return []

    @classmethod
    def run(cls, cfg, ctx) -> dict:
        """The stage (lmfleet.stages runs `<module>:<Class>.run`); returns its report."""
        check_inputs(cfg, run_dir=ctx.run_dir)
        models = {key: input_model(getattr(cfg, key), ctx.run_dir) for key in MODEL_KEYS
                  if getattr(cfg, key, None) is not None}
        with ctx.step("read"):
            records = cls.read(cfg, ctx.seed)
            cls.quarantine(cfg, records, load_tokenizer(local_copy(models["model"])))
            cls.write_data(cfg, records, ctx)
            ctx.publish("data")  # the workers read it, on any node
        if not records.train:
            raise InputError(f"{cfg.KIND}.dataset: no records left to train on ({records.counts()}); "
                             f"check the records or raise training.max_length ({cfg.training.max_length})")
        eval_tasks = getattr(cfg, "eval_tasks", None)
        tasks, task_section = training_tasks(eval_tasks.tasks, f"{cfg.KIND}.eval_tasks.tasks") if eval_tasks else ((), {})
        inputs = cls.worker_inputs(cfg, ctx, StageInputs(
            **models, train=ctx.uri("data", "train.jsonl"), val=ctx.uri("data", "val.jsonl"), out=str(ctx.out),
            use_gpu=cfg.scaling.resolve_gpu(), tasks=tasks))
        report = {"data": records.counts(), "model": inputs.export, **cls.train(cfg, ctx, records, inputs)}
        if tasks:
            report["eval_tasks"] = tasks_section(task_section, ctx.history())
            report["summary"] = [*report.get("summary", []), report["eval_tasks"]["summary"]]
        with ctx.step("evaluate"):
            report["eval"] = run_eval_task(cls, cfg, inputs)
        ctx.write_json("eval.json", report["eval"])
        report["summary"] = [*report.get("summary", []), *cls.summary(report["eval"], report),
                             *report.pop("summary_after", []), f"model: {report['model']}"]
        return ctx.write_report(report)


def quarantine_long_prompts(records: Records, tokenizer, limit: int) -> None:
    """Records whose chat-formatted prompt has >= `limit` tokens leave no room for an answer: quarantined
    (reason too_many_tokens), counted in the report."""
    from lmfleet.posttrain.evaluate import encode_chat

    records.quarantine("too_many_tokens", lambda r: len(encode_chat(tokenizer, prompt_of(r))[0]) >= limit)


def run_eval_task(stage: type[PostTrainStage], cfg, inputs: StageInputs) -> dict:
    """`stage.evaluate` as a Ray task with one worker's resources (a GPU when training had them), on this
    node's copy of the stage's model/."""
    import ray

    def task(stage, cfg, inputs: StageInputs, tty: bool) -> dict:
        if not tty:
            import transformers

            transformers.utils.logging.disable_progress_bar()
        return stage.evaluate(cfg, inputs, str(local_copy(inputs.export, "model")))

    remote = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if inputs.use_gpu else 0)(task)
    return ray.get(remote.options(name=f"evaluate_{cfg.KIND}").remote(stage, cfg, inputs, tty()))


def first_last(history: list[dict], keys) -> dict:
    """first_<key> and final_<key> of each key over the metrics records that have it (None if none has)."""
    report = {}
    for key in keys:
        values = [h[key] for h in history if key in h]
        report[f"first_{key}"], report[f"final_{key}"] = (values[0], values[-1]) if values else (None, None)
    return report

