"""One launcher for the stages built on HF / TRL trainers (sft, reward, dpo, kto, orpo, simpo, distill).

The driver reads and quarantines the records (`data/`), then a Ray Train `TorchTrainer` runs the
stage's trainer in each worker: Ray Train starts the process group, the HF Trainer picks it up and
applies DDP, FSDP2 or DeepSpeed from `training.strategy`. `RayTrainReportCallback` reports every HF
checkpoint to Ray Train, which keeps the last `keep_last` under `ray/` and hands the newest back to
restarted workers (resume). Rank 0 writes `model/` (PEFT LoRA / IA3 adapters merged; the adapter
itself in `adapter/`) into the stage dir (a path or URI: lmfleet.outputs), then a Ray task evaluates it
(`eval.json`). Workers read the records from the stage's `data/` and log through the driver's appender
(lmfleet.runlog): nothing assumes a disk shared with the driver.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import TrainerCallback

from lmfleet.outputs import child, publish, workdir
from lmfleet.posttrain.config import PeftConfig, TrainingConfig
from lmfleet.posttrain.models import local_models
from lmfleet.posttrain.records import Records, prompt_of
from lmfleet.runlog import MetricsLog, read_jsonl
from lmfleet.storage import checkpoint_uri
from lmfleet.uri import is_uri, local_copy

STAGES = {  # kind -> module with build_trainer(cfg, paths, args) and evaluate(cfg, paths)
    "sft": "lmfleet.posttrain.sft",
    "reward": "lmfleet.posttrain.reward",
    "dpo": "lmfleet.posttrain.dpo",
    "distill": "lmfleet.posttrain.distill",
    "kto": "lmfleet.posttrain.kto",
    "orpo": "lmfleet.posttrain.orpo",
    "simpo": "lmfleet.posttrain.simpo",
}


def training_args(t: TrainingConfig, out_dir: str, seed: int, use_gpu: bool, has_eval: bool, tty: bool) -> dict:
    """Keyword arguments shared by TRL's *Config classes (all TrainingArguments subclasses)."""
    args = dict(
        output_dir=out_dir, seed=seed, data_seed=seed, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs, max_steps=t.max_steps or -1, per_device_train_batch_size=t.per_device_batch,
        per_device_eval_batch_size=t.per_device_batch, gradient_accumulation_steps=t.grad_accum,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_strategy="steps",
        save_steps=t.save_steps, save_total_limit=t.keep_last, report_to=[], use_cpu=not use_gpu,
        bf16=t.bf16 if t.bf16 is not None else use_gpu, activation_checkpointing=t.activation_checkpointing,
        disable_tqdm=not tty, ddp_find_unused_parameters=False, eval_strategy="steps" if has_eval else "no",
        eval_steps=t.save_steps if has_eval else None,
    )
    if t.strategy == "fsdp":
        # FSDP2, fully sharded, one unit per decoder layer (the model's _no_split_modules).
        args.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True})
    elif t.strategy == "deepspeed":
        zero = {"stage": t.zero_stage}
        if t.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # full weights for model/
        args["deepspeed"] = {
            "zero_optimization": zero, "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
        }
    return args


def peft_config(p: PeftConfig | None, task_type: str):
    if p is None:
        return None
    import peft

    targets = None if p.target_modules == "all-linear" and p.method == "ia3" else p.target_modules
    if p.method == "lora":
        return peft.LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                               task_type=task_type)
    if p.method == "ia3":  # None: PEFT's per-architecture default modules
        return peft.IA3Config(target_modules=targets, task_type=task_type)
    if p.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=task_type)
    return peft.PromptEncoderConfig(num_virtual_tokens=p.num_virtual_tokens,
                                     encoder_hidden_size=p.encoder_hidden_size, task_type=task_type)


def split_datasets(paths: dict) -> dict:
    """train_dataset / eval_dataset keyword arguments of a trainer, from the stage's data/ files."""
    import datasets

    val = read_jsonl(paths["val"])
    return {"train_dataset": datasets.Dataset.from_list(read_jsonl(paths["train"])),
            "eval_dataset": datasets.Dataset.from_list(val) if val else None}


class MetricsCallback(TrainerCallback):
    """Appends the trainer's logs (rank 0) to the run's metrics.jsonl, like the pretraining loop."""

    def __init__(self, log: MetricsLog, stage: str, tags: dict):
        self.log, self.stage, self.tags = log, stage, tags

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.log.write(self.stage, **self.tags, step=state.global_step, **logs)


class ReportCheckpoints(RayTrainReportCallback):
    """Ray's callback, after a barrier: every rank copies the HF checkpoint dir to report it, and on one
    node they share it, so a rank must not copy while another still writes its files (seen: a
    DeepSpeed rank copying rank 0's half-written temp file)."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_initialized():
            dist.barrier()
        super().on_save(args, state, control, **kwargs)


class ApplyHyperparams(TrainerCallback):
    """A resumed optimizer and scheduler bring back the saved learning rate and weight decay. A Tune trial
    resuming another trial's checkpoint (PBT) must train with its own: set them from the arguments."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None:
            return
        schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        lambdas = getattr(schedule, "lr_lambdas", None)
        if lambdas is not None:
            schedule.base_lrs = [args.learning_rate] * len(schedule.base_lrs)
        for i, group in enumerate(optimizer.param_groups):
            group["initial_lr"] = args.learning_rate
            if lambdas is not None:
                group["lr"] = args.learning_rate * lambdas[i](schedule.last_epoch)
            if i == 0:  # the Trainer's decayed group; the other holds biases and norms (no decay)
                group["weight_decay"] = args.weight_decay


def save_final(trainer, location: str, peft: PeftConfig | None, tokenizer, task: str) -> None:
    """Every rank takes part (FSDP / ZeRO-3 gather the weights); rank 0 writes model/ (+ adapter/) into its
    node's work dir of the stage dir `location` and publishes them there."""
    out = workdir(location)
    if trainer.is_world_process_zero():  # an earlier attempt's files (a URI's work dir is this node's cache)
        for name in ("model", "adapter"):
            shutil.rmtree(out / name, ignore_errors=True)
    if peft is None:
        trainer.save_model(str(out / "model"))
    else:
        trainer.save_model(str(out / "adapter"))
    if not trainer.is_world_process_zero():
        return
    if peft is not None:
        tokenizer.save_pretrained(str(out / "adapter"))
        if peft.method in ("lora", "ia3"):
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

            if task == "CAUSAL_LM":
                model = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter"))
            else:  # the base is a causal LM dir: rebuild the one-score head the adapter saved
                model = AutoPeftModelForSequenceClassification.from_pretrained(
                    str(out / "adapter"), num_labels=1, pad_token_id=tokenizer.pad_token_id)
            model.merge_and_unload().save_pretrained(str(out / "model"))
        else:  # virtual tokens live outside the weights: the adapter (on its base) is the model
            shutil.copytree(out / "adapter", out / "model", dirs_exist_ok=True)
    tokenizer.save_pretrained(str(out / "model"))
    for name in ("adapter", "model"):  # model/ last: its arrival says the export is complete
        publish(out / name, child(location, name), move=True)


def _worker(config: dict) -> None:
    import datasets
    import ray.train
    import transformers
    from ray.train.huggingface.transformers import prepare_trainer

    if not config["tty"]:
        datasets.disable_progress_bars()  # TRL's dataset preparation: one bar per map otherwise
    module = importlib.import_module(STAGES[config["kind"]])
    cfg = module.CONFIG.model_validate(config["cfg"])
    paths = local_models(config["paths"])
    scratch = workdir(child(paths["out"], "hf"))  # HF's own saves, which Ray Train copies to its storage
    args = training_args(cfg.training, str(scratch), config["seed"], paths["use_gpu"],
                         has_eval=bool(read_jsonl(paths["val"])), tty=config["tty"])
    if config.get("stop_at"):
        args["max_steps"] = config["stop_at"]
    # New weights (a reward model's score head, PEFT adapters) are drawn while the model is built, before
    # the HF Trainer seeds anything.
    transformers.set_seed(config["seed"])
    trainer, tokenizer, task = module.build_trainer(cfg, paths, args)
    metrics = MetricsCallback(config["metrics"], config["stage"], config.get("tags", {}))
    for callback in (ReportCheckpoints(), metrics, ApplyHyperparams()):
        trainer.add_callback(callback)
    trainer = prepare_trainer(trainer)
    ckpt = ray.train.get_checkpoint() or config.get("init_checkpoint")
    if ckpt is None:
        trainer.train()
    else:
        with ckpt.as_directory() as d:
            trainer.train(resume_from_checkpoint=str(Path(d) / ReportCheckpoints.CHECKPOINT_NAME))
    if config.get("export", True):
        save_final(trainer, paths["out"], getattr(cfg, "peft", None), tokenizer, task)
    if is_uri(paths["out"]):  # the scratch is in this node's cache; with a local stage dir the driver clears it
        if dist.is_initialized():
            dist.barrier()
        shutil.rmtree(scratch, ignore_errors=True)


def quarantine_long_prompts(records: Records, tokenizer, limit: int) -> None:
    """Records whose chat-formatted prompt has >= `limit` tokens leave no room for an answer; TRL's
    trainers would drop them silently: quarantine them (reason too_many_tokens), counted in the report."""
    from lmfleet.posttrain.evaluate import encode_chat

    records.quarantine("too_many_tokens", lambda r: len(encode_chat(tokenizer, prompt_of(r))[0]) >= limit)


def launch(worker, loop_config: dict, cfg, seed: int, stage: str, use_gpu: bool, storage: str, callbacks=()):
    """One Ray Train run of `worker` on the stage's workers, its run dir in `storage`/train; returns the Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker,
        train_loop_config={**loop_config, "cfg": cfg.model_dump(mode="json"), "seed": seed, "stage": stage,
                           "tty": sys.stderr.isatty()},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.bounds[0], use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name="train", storage_path=storage, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.keep_last),
        ),
    )
    return trainer.fit()


def fit(worker, loop_config: dict, cfg, ctx, use_gpu: bool):
    """Run `worker` for the stage (checkpoints in the stage's storage); returns (Result, this run's metrics)."""
    with ctx.step("train"):
        loop_config = {**loop_config, "metrics": ctx.metrics.for_workers()}
        result = launch(worker, loop_config, cfg, ctx.seed, ctx.name, use_gpu, ctx.storage)
    # metrics.jsonl is the run's log across re-runs: this run's records of this stage only (a resumed run's
    # since its first start).
    history = [h for h in read_jsonl(ctx.metrics.path) if h.get("stage") == ctx.name and h["time"] >= ctx.started]
    return result, history


def launch_trial(kind: str, paths: dict, cfg, out: Path | str, metrics: MetricsLog, seed: int, stage: str, *,
                 storage: str, samples=None, init_checkpoint=None, callbacks=(), export: bool = True,
                 steps: int | None = None, tags: dict | None = None):
    """The stage's run for a Tune search (lmfleet.tune.search.run_search): a trial writing under `out`,
    or the export of the best trial's checkpoint (steps: stop there) into out/model. (samples: pretraining's)"""
    paths = {**paths, "out": str(out)}
    loop_config = {"kind": kind, "paths": paths, "metrics": metrics, "init_checkpoint": init_checkpoint,
                   "export": export, "stop_at": steps, "tags": tags or {}}
    return launch(_worker, loop_config, cfg, seed, stage, paths["use_gpu"], storage, callbacks)


def run_hf_stage(kind: str, cfg, ctx, records: Records, paths: dict) -> dict:
    """Train `kind` on Ray Train and evaluate the result; returns the stage report."""
    out = ctx.out_dir
    records.write(out / "data")
    ctx.publish("data")  # the workers read it, on any node
    use_gpu = cfg.scaling.resolve_gpu()
    paths = {
        **{k: str(v) for k, v in paths.items()}, "out": str(ctx.out),
        "train": ctx.uri("data", "train.jsonl"), "val": ctx.uri("data", "val.jsonl"), "use_gpu": use_gpu,
    }
    module = importlib.import_module(STAGES[kind])
    if getattr(cfg, "tune", None) is not None:
        return _search_and_evaluate(kind, module, cfg, ctx, records, paths)
    result, records_logged = fit(_worker, {"kind": kind, "paths": paths}, cfg, ctx, use_gpu)
    history = [h for h in records_logged if "loss" in h]
    shutil.rmtree(out / "hf", ignore_errors=True)  # per-worker scratch; Ray Train holds the checkpoints
    evaluation = _evaluate(module, cfg, ctx, paths)
    report = {"data": records.counts(), "model": ctx.uri("model"),
              "steps": max((h.get("step", 0) for h in records_logged), default=0),
              "checkpoint": checkpoint_uri(result.checkpoint)}
    for key in ("loss", *getattr(module, "TRACKED", ())):
        values = [h[key] for h in history if key in h]
        report[f"first_{key}"], report[f"final_{key}"] = (values[0], values[-1]) if values else (None, None)
    report["eval"] = evaluation
    report["summary"] = [
        f"records: {report['data']['train']} train, {report['data']['val']} val, {report['data']['rejected']} "
        f"quarantined ({ctx.uri('data', 'rejects.jsonl')})",
        f"trained {report['steps']} steps on {cfg.scaling.bounds[0]} worker(s) ({cfg.training.strategy}): "
        f"loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}" if history else "trained: no loss logged",
        *module.summary(evaluation, report),
        f"model: {report['model']}",
    ]
    (out / "report.json").write_text(json.dumps({**report, "seconds": ctx.seconds}, indent=2), encoding="utf-8")
    return report


def _evaluate(module, cfg, ctx, paths: dict) -> dict:
    with ctx.step("evaluate"):
        evaluation = run_eval_task(module.evaluate, cfg, paths)
    (ctx.out_dir / "eval.json").write_text(json.dumps(evaluation, indent=2), encoding="utf-8")
    return evaluation


def _search_and_evaluate(kind: str, module, cfg, ctx, records: Records, paths: dict) -> dict:
    """A Tune search of trials of this stage; the best one's last checkpoint is exported and evaluated."""
    from functools import partial

    from lmfleet.tune.search import run_search

    report = run_search(cfg, ctx, partial(launch_trial, kind, paths))
    for scratch in [ctx.out_dir / "hf", *ctx.out_dir.glob("trials/*/attempts/*/hf")]:  # HF's saves (local stage dir)
        shutil.rmtree(scratch, ignore_errors=True)
    report["data"] = records.counts()
    report["eval"] = _evaluate(module, cfg, ctx, paths)
    report["summary"] = report["summary"][:3] + module.summary(report["eval"], report) + report["summary"][3:]
    (ctx.out_dir / "report.json").write_text(json.dumps({**report, "seconds": ctx.seconds}, indent=2),
                                             encoding="utf-8")
    return report


def run_eval_task(fn, cfg, paths: dict) -> dict:
    """Run `fn(cfg, paths)` as a Ray task with one worker's resources (a GPU when training had them);
    paths["trained"] is the trained model/ of the stage dir paths["out"] (a copy on the task's node)."""
    import ray

    def task(cfg, paths: dict, tty: bool) -> dict:
        if not tty:
            import transformers

            transformers.utils.logging.disable_progress_bar()
        paths = {**local_models(paths), "trained": str(local_copy(str(child(paths["out"], "model")), "model"))}
        return fn(cfg, paths)

    remote = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if paths["use_gpu"] else 0)(task)
    return ray.get(remote.options(name=f"evaluate_{fn.__module__.rsplit('.', 1)[-1]}").remote(
        cfg, paths, sys.stderr.isatty()))
