"""The stages built on HF / TRL trainers (sft, reward, dpo, kto, orpo, simpo, distill): `HFStage`.

The driver reads and quarantines the records (`data/`), then a Ray Train run (lmfleet.runtime) runs the
stage's trainer in each worker: Ray Train starts the process group, the HF Trainer picks it up and
applies DDP, FSDP2 or DeepSpeed from `parallel.strategy`. `RayTrainReportCallback` reports every HF
checkpoint to Ray Train, which keeps the last `checkpoint.keep_last` under `ray/` and hands the newest
back to restarted workers (resume). Rank 0 writes `model/` (PEFT LoRA / IA3 adapters merged; the adapter
itself in `adapter/`) into the stage dir (a path or URI: lmfleet.outputs), then a Ray task evaluates it
(`eval.json`). Workers read the records from the stage's `data/` and log through the driver's appender
(lmfleet.runlog): nothing assumes a disk shared with the driver.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch.distributed as dist
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import TrainerCallback

from lmfleet import runtime
from lmfleet.errors import InputError
from lmfleet.outputs import child, publish, workdir
from lmfleet.posttrain.config import PeftConfig
from lmfleet.posttrain.inputs import MODEL_KEYS
from lmfleet.posttrain.models import load_tokenizer
from lmfleet.posttrain.stage import PostTrainStage, StageInputs, first_last
from lmfleet.runlog import MetricsLog, read_jsonl
from lmfleet.runtime import WorkerRun, worker_device
from lmfleet.storage import checkpoint_uri
from lmfleet.train import early_stopping
from lmfleet.train.config import EarlyStoppingConfig
from lmfleet.train.early_stopping import EarlyStopping
from lmfleet.train.memory import PeakMemory, gather_record, report_section, summary_line
from lmfleet.uri import is_uri


def training_args(cfg, out_dir: str, seed: int, use_gpu: bool, has_eval: bool, tty: bool) -> dict:
    """Keyword arguments shared by TRL's *Config classes (all TrainingArguments subclasses), from a HF-Trainer
    stage's config (lmfleet.posttrain.config._HFStage)."""
    t, opt, par = cfg.training, cfg.optimizer, cfg.parallel
    decay = cfg.lr_schedule.decay
    args = dict(
        output_dir=out_dir, seed=seed, data_seed=seed, learning_rate=opt.lr, adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1], adam_epsilon=opt.eps, weight_decay=opt.weight_decay,
        max_grad_norm=opt.grad_clip or 0.0,  # 0: no clipping
        lr_scheduler_type="constant_with_warmup" if decay == "constant" else decay,
        warmup_steps=cfg.lr_schedule.warmup_steps, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        per_device_train_batch_size=cfg.batch.micro_batch, per_device_eval_batch_size=cfg.batch.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum, logging_steps=cfg.log_every, save_strategy="steps",
        save_steps=cfg.checkpoint.every, save_total_limit=cfg.checkpoint.keep_last, report_to=[],
        use_cpu=not use_gpu, bf16=t.bf16 if t.bf16 is not None else use_gpu,
        activation_checkpointing=par.activation_checkpointing, disable_tqdm=not tty,
        ddp_find_unused_parameters=False, eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.checkpoint.every if has_eval else None,
    )
    if cfg.early_stopping is not None and has_eval:  # the best checkpoint is loaded back at the end, and exported
        args.update(load_best_model_at_end=True, metric_for_best_model=cfg.hf_metric,
                    greater_is_better=not cfg.early_stopping.minimize)
    if par.strategy == "fsdp":
        # FSDP2, fully sharded, one unit per decoder layer (the model's _no_split_modules).
        args.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True})
    elif par.strategy == "deepspeed":
        # Buckets sized by the hidden size ("auto": HF fills in pretraining's values, lmfleet.train.config.
        # DeepSpeedConfig.zero_optimization); DeepSpeed's own defaults hold every gradient of a model under
        # 5e8 parameters in one bucket.
        zero = {"stage": par.deepspeed.zero_stage, "reduce_bucket_size": "auto"}
        if par.deepspeed.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                        stage3_gather_16bit_weights_on_model_save=True)  # full weights for model/
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


def split_datasets(inputs: StageInputs) -> dict:
    """train_dataset / eval_dataset keyword arguments of a trainer, from the stage's data/ files."""
    import datasets

    val = read_jsonl(inputs.val)
    return {"train_dataset": datasets.Dataset.from_list(read_jsonl(inputs.train)),
            "eval_dataset": datasets.Dataset.from_list(val) if val else None}


class MetricsCallback(TrainerCallback):
    """Appends the trainer's logs (rank 0) to the run's metrics.jsonl, like the pretraining loop."""

    def __init__(self, log: MetricsLog, stage: str, tags: dict):
        self.log, self.stage, self.tags = log, stage, tags

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.log.write(self.stage, **self.tags, step=state.global_step, **logs)


class TaskEvalCallback(TrainerCallback):
    """eval_tasks every `every` steps and at the last: the first worker scores the model in place (DDP keeps a
    whole copy on every rank) while the others wait at the next step's all-reduce; logged with the step."""

    def __init__(self, cfg, tasks, tokenizer, log: MetricsLog, stage: str, tags: dict, seed: int, max_length: int):
        self.cfg, self.tasks, self.tok, self.log = cfg, tasks, tokenizer, log
        self.stage, self.tags, self.seed, self.max_length = stage, tags, seed, max_length

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if not state.is_world_process_zero or (step % self.cfg.every and step != state.max_steps):
            return
        import torch

        from lmfleet.eval.lm import EvalModel
        from lmfleet.eval.tasks import score_tasks

        was_training = model.training
        model.eval()
        em = EvalModel(model, self.tok, True, self.cfg.max_length or self.max_length, self.cfg.batch_size,
                       next(model.parameters()).device)
        with torch.no_grad():
            metrics = score_tasks(em, self.tasks, self.seed)
        model.train(was_training)
        self.log.write(self.stage, **self.tags, step=step, **metrics)


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


def early_stopping_summary(cfg: EarlyStoppingConfig, state) -> dict:
    """EarlyStopping.summary() of a HF Trainer's final state (stopped: before its max_steps)."""
    stopped = state.global_step < state.max_steps
    return EarlyStopping(cfg, best=state.best_metric, best_step=state.best_global_step,
                         stopped_at=state.global_step if stopped else None).summary()


def start_measure(cfg, use_gpu: bool) -> PeakMemory:
    """This worker's peak memory from here (lmfleet.train.memory). PEFT and DeepSpeed are imported first;
    TRL and transformers load most of their modules lazily, so on CPU the trainer's and the model's code
    pages still count (in the "model in place" figure: 66-74 MiB per worker, model included, in the
    demo's SFT and reward stages); on GPU code never does."""
    if getattr(cfg, "peft", None) is not None:
        import peft  # noqa: F401
    if getattr(getattr(cfg, "parallel", None), "strategy", None) == "deepspeed":
        import deepspeed  # noqa: F401
    memory = PeakMemory(worker_device(use_gpu))
    memory.start()
    return memory


def _worker(config: dict) -> None:
    import datasets
    import transformers
    from ray.train.huggingface.transformers import prepare_trainer

    run: WorkerRun = config["run"]
    stage: type[HFStage] = run.stage_class
    cfg, inputs = run.cfg, run.inputs
    if not run.tty:
        datasets.disable_progress_bars()  # TRL's dataset preparation: one bar per map otherwise
    local = replace(inputs, **{k: inputs.local(k) for k in MODEL_KEYS})
    scratch = workdir(child(inputs.out, "hf"))  # HF's own saves, which Ray Train copies to its storage
    args = training_args(cfg, str(scratch), run.seed, inputs.use_gpu, has_eval=bool(read_jsonl(inputs.val)),
                         tty=run.tty)
    if run.stop_at:
        args["max_steps"] = run.stop_at
    # New weights (a reward model's score head, PEFT adapters) are drawn while the model is built, before
    # the HF Trainer seeds anything.
    transformers.set_seed(run.seed)
    memory = start_measure(cfg, inputs.use_gpu)
    trainer, tokenizer = stage.build_trainer(cfg, local, args)
    memory.mark("init")
    callbacks = [ReportCheckpoints(), MetricsCallback(run.metrics, run.stage, run.tags), ApplyHyperparams()]
    if args.get("load_best_model_at_end"):
        callbacks.append(transformers.EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.min_delta))
    if inputs.tasks:
        callbacks.append(TaskEvalCallback(cfg.eval_tasks, inputs.tasks, tokenizer, run.metrics, run.stage, run.tags,
                                          run.seed, cfg.training.max_length))
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer = prepare_trainer(trainer)
    with runtime.latest_checkpoint(run.init_checkpoint) as d:
        if d is None:
            trainer.train()
        else:
            trainer.train(resume_from_checkpoint=str(d / ReportCheckpoints.CHECKPOINT_NAME))
    record = gather_record(memory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        run.metrics.write(run.stage, **run.tags, **record)
        if args.get("load_best_model_at_end"):
            run.metrics.write(run.stage, **run.tags, event="early_stopping", max_steps=trainer.state.max_steps,
                              **early_stopping_summary(cfg.early_stopping, trainer.state))
    if run.export:
        save_final(trainer, inputs.out, getattr(cfg, "peft", None), tokenizer, stage.TASK)
    if is_uri(inputs.out):  # the scratch is in this node's cache; with a local stage dir the driver clears it
        if dist.is_initialized():
            dist.barrier()
        shutil.rmtree(scratch, ignore_errors=True)


def launch_trial(stage: type[HFStage], inputs: StageInputs, cfg, out: Path | str, metrics: MetricsLog, seed: int,
                 name: str, *, storage: str, samples=None, init_checkpoint=None, callbacks=(), export: bool = True,
                 steps: int | None = None, tags: dict | None = None):
    """The stage's run for a Tune search (lmfleet.tune.search.run_search): a trial writing under `out`,
    or the export of the best trial's checkpoint (steps: stop there) into out/model. (samples: pretraining's)"""
    run = WorkerRun(cfg, stage, replace(inputs, out=str(out)), seed, name, metrics, tags=tags or {},
                    init_checkpoint=init_checkpoint, stop_at=steps, export=export, tty=runtime.tty())
    return runtime.launch(_worker, run, storage=storage, use_gpu=inputs.use_gpu, callbacks=callbacks)


class HFStage(PostTrainStage):
    """A stage whose workers run a HF / TRL trainer. Subclasses implement `build_trainer` (and read /
    evaluate / summary); TRACKED: logged keys whose first and final values the report keeps."""

    TRACKED: ClassVar[tuple[str, ...]] = ()
    TASK: ClassVar[str] = "CAUSAL_LM"  # or SEQ_CLS: how a PEFT adapter is merged on export

    @classmethod
    def build_trainer(cls, cfg, inputs: StageInputs, args: dict):
        """(trainer, tokenizer) in a worker: `inputs` has this node's copies of the models; `args` are the
        TrainingArguments keywords (training_args)."""
        raise NotImplementedError

    @classmethod
    def train(cls, cfg, ctx, records, inputs: StageInputs) -> dict:
        if getattr(cfg, "tune", None) is not None:
            return cls._search(cfg, ctx, inputs)
        if cfg.early_stopping is not None and not records.counts()["val"]:
            raise InputError(f"{ctx.name}.early_stopping: no held-out records to evaluate on (dataset.val_fraction "
                             f"{cfg.dataset.val_fraction} held out none of {records.counts()['train']})")
        with ctx.step("train"):
            result = launch_trial(cls, inputs, cfg, ctx.out, ctx.metrics.for_workers(), ctx.seed, ctx.name,
                                  storage=ctx.storage)
        logged = ctx.history()
        history = [h for h in logged if "loss" in h]
        shutil.rmtree(ctx.out_dir / "hf", ignore_errors=True)  # per-worker scratch; Ray Train holds the checkpoints
        report = {"steps": max((h.get("step", 0) for h in logged), default=0),
                  "checkpoint": checkpoint_uri(result.checkpoint), **first_last(history, ("loss", *cls.TRACKED))}
        counts = records.counts()
        memory = report_section(logged)
        if memory:
            report["memory"] = memory
        stopping = []
        if cfg.early_stopping is not None:
            report["early_stopping"] = early_stopping.report_section(cfg.early_stopping, ctx.history("event"),
                                                                     report["steps"])
            stopping = [report["early_stopping"]["summary"]]
        report["summary"] = [
            f"records: {counts['train']} train, {counts['val']} val, {counts['rejected']} quarantined "
            f"({ctx.uri('data', 'rejects.jsonl')})",
            f"trained {report['steps']} steps on {cfg.scaling.bounds[0]} worker(s) ({cfg.parallel.strategy}): "
            f"loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}" if history else "trained: no loss logged",
            *stopping,
            *summary_line(memory),
        ]
        return report

    @classmethod
    def _search(cls, cfg, ctx, inputs: StageInputs) -> dict:
        """A Tune search of trials of this stage; the best one's last checkpoint is exported (and evaluated
        by `run`)."""
        from functools import partial

        from lmfleet.tune.search import run_search

        report = run_search(cfg, ctx, partial(launch_trial, cls, inputs))
        for scratch in [ctx.out_dir / "hf", *ctx.out_dir.glob("trials/*/attempts/*/hf")]:  # HF's saves (local dir)
            shutil.rmtree(scratch, ignore_errors=True)
        lines = report.pop("summary")
        return {**report, "summary": lines[:3], "summary_after": lines[3:]}

    @classmethod
    def build(cls, trainer_cls, config_cls, cfg, inputs: StageInputs, args: dict, model=None, **options):
        """`trainer_cls` (a TRL trainer) on the input model (or `model`), its records and the stage's PEFT,
        with `config_cls(**args, max_length=..., **options)`; returns (trainer, tokenizer)."""
        from transformers import AutoModelForCausalLM

        tok = load_tokenizer(Path(inputs.model), getattr(cfg, "chat_template", None))
        trainer = trainer_cls(
            model=model if model is not None else AutoModelForCausalLM.from_pretrained(inputs.model),
            args=config_cls(**args, max_length=cfg.training.max_length, **options),
            **split_datasets(inputs),
            processing_class=tok,
            peft_config=peft_config(getattr(cfg, "peft", None), cls.TASK),
        )
        return trainer, tok
