"""The pretraining stage: resolves its input, starts a Ray Train TorchTrainer, collects the results.

Outputs (in the stage dir, a path or URI):
  model/          the exported model (HF LlamaForCausalLM dir when Llama-compatible, else lmfleet format)
  ray/            Ray Train's run dir (checkpoints step_XXXXXXXX/, keep_last), unless the run has a storage_path
  samples.jsonl   with log_samples: the sample ids of every step
  report.json     final loss, val loss / perplexity, tokens/s, MFU, steps, world sizes seen
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from lmfleet import outputs, runtime, uri
from lmfleet.config import format_validation_error
from lmfleet.errors import InputError
from lmfleet.eval.tasks import TaskRecords, task_inputs, tasks_section, training_tasks
from lmfleet.inputs import Input
from lmfleet.model.config import ModelConfig
from lmfleet.model.hf_config import checkpoint_model_config, continued_model, input_model, loss_model
from lmfleet.runlog import LineLog, MetricsLog
from lmfleet.runtime import WorkerRun
from lmfleet.storage import checkpoint_uri
from lmfleet.train import early_stopping
from lmfleet.train.config import PretrainConfig
from lmfleet.train.curriculum import Curriculum
from lmfleet.train.memory import report_section, summary_line
from lmfleet.train.objectives import NEEDS, TOKENS, ObjectiveTokens


def packed_dir(cfg: PretrainConfig, run_dir: Path | str | None) -> str:
    """Where the packed data is (an absolute path or a URI): `data` names a stage of this run (its dir under
    the run dir), or is a data stage dir or its packed/ dir, on a disk or an object store."""
    ref = cfg.data if run_dir is None or "/" in cfg.data else str(outputs.child(run_dir, cfg.data))
    if uri.is_uri(ref):
        base = ref.rstrip("/")
        return base if uri.info(uri.join(base, "index.json"), "pretrain.data").is_file else uri.join(base, "packed")
    base = Path(ref)
    packed = base / "packed" if (base / "packed").is_dir() or not (base / "index.json").exists() else base
    return str(packed.resolve())


def read_index(packed: str) -> dict:
    return json.loads(uri.read_bytes(uri.join(packed, "index.json")).decode("utf-8"))


def init_model(cfg: PretrainConfig, run_dir: Path | str | None) -> tuple[str, ModelConfig]:
    """`init_from`'s location (an absolute path or a URI: a stage of this run's model/, or a model dir or a
    stage dir holding one) and the model to train: the checkpoint's architecture with the run settings the
    config sets; InputError naming the key the config disagrees on."""
    location = input_model(cfg.init_from, run_dir)
    where = f"pretrain.init_from {location}"
    return location, continued_model(cfg.model, checkpoint_model_config(location, "pretrain.init_from"),
                                     "pretrain.model", where)


def check_inputs(cfg: PretrainConfig, upstream: set[str] = frozenset(), run_dir: Path | None = None) -> list[Input]:
    path = packed_dir(cfg, run_dir)
    # upstream: an earlier stage writes it
    if cfg.data not in upstream and not uri.info(uri.join(path, "index.json"), "pretrain.data").is_file:
        raise InputError(f"pretrain.data {cfg.data!r}: no packed data at {path} (expected a data stage output dir)")
    inputs = [Input("data", (path if uri.is_uri(path) else Path(path),))]
    if cfg.init_from is not None:
        if cfg.init_from in upstream:
            location = input_model(cfg.init_from, run_dir)
        else:  # a Llama / lmfleet model dir whose architecture the config agrees with
            location, _ = init_model(cfg, run_dir)
        inputs.append(Input("init_from", (location if uri.is_uri(location) else Path(location),)))
    if cfg.eval_tasks is not None:
        inputs += task_inputs(cfg.eval_tasks.tasks, "pretrain.eval_tasks.tasks")
    proxy = cfg.curriculum.proxy if cfg.curriculum is not None else None
    if proxy is not None:
        location = input_model(proxy, run_dir)
        if proxy not in upstream:
            checkpoint_model_config(location, "pretrain.curriculum.proxy")  # InputError when there is no model
        inputs.append(Input("curriculum.proxy", (location if uri.is_uri(location) else Path(location),)))
    return inputs


def _continued(cfg: PretrainConfig, index: dict, packed: str, run_dir) -> PretrainConfig:
    """init_from: the checkpoint's architecture (the config's model keys must match it), and the packed
    data must come from the checkpoint's tokenizer (where the checkpoint has one)."""
    location, model = init_model(cfg, run_dir)
    where = f"pretrain.init_from {location}"
    if index["vocab_size"] > model.vocab_size:
        raise InputError(f"{where}: the packed data's tokenizer has {index['vocab_size']} tokens, the checkpoint "
                         f"{model.vocab_size}: pack the data with the checkpoint's tokenizer (data stage "
                         f"tokenizer.path: {location})")
    theirs = uri.join(location, "tokenizer.json")
    if uri.info(theirs).is_file:
        ours = uri.join(uri.relative(packed, index["tokenizer"]), "tokenizer.json")
        if uri.read_bytes(ours) != uri.read_bytes(theirs):
            raise InputError(f"{where}: the packed data was tokenized with another tokenizer ({ours}): pack it "
                             f"with the checkpoint's (data stage tokenizer.path: {location})")
    try:  # the config's checks (tp_size dividing the heads, ...) against the checkpoint's architecture
        return PretrainConfig.model_validate({**cfg.model_dump(), "model": model.model_dump(), "init_from": location})
    except ValidationError as err:
        raise InputError(format_validation_error(err, f"pretrain with the model of {where}", ("pretrain",))) from None


def _resolved(cfg: PretrainConfig, index: dict, packed: str, run_dir=None) -> PretrainConfig:
    """Fill the model's vocab size from the packed data's index (or the model from `init_from`); check the
    context length and sources fit."""
    if cfg.init_from is not None:
        cfg = _continued(cfg, index, packed, run_dir)
    model = cfg.model
    if model.vocab_size is None:
        model = model.model_copy(update={"vocab_size": index["vocab_size"]})
    elif model.vocab_size < index["vocab_size"]:
        raise InputError(f"pretrain.model.vocab_size {model.vocab_size} < the tokenizer's {index['vocab_size']}")
    if model.max_seq_len < index["seq_len"]:
        raise InputError(f"pretrain.model.max_seq_len {model.max_seq_len} < packed seq_len {index['seq_len']}")
    objective_tokens(cfg, packed, index)  # its special tokens are in the tokenizer
    if cfg.curriculum is not None and cfg.curriculum.proxy is not None:
        location = input_model(cfg.curriculum.proxy, run_dir)
        loss_model(location, index["vocab_size"], "pretrain.curriculum.proxy", "scoring samples by loss")
        cfg = cfg.model_copy(update={"curriculum": cfg.curriculum.model_copy(update={"proxy": location})})
    column = cfg.curriculum.column if cfg.curriculum is not None else None
    if column is not None and column not in index.get("columns", []):
        raise InputError(f"pretrain.curriculum.score {cfg.curriculum.score!r}: the packed data at {packed} has no "
                         f"column {column!r} (it has {index.get('columns') or 'none'}): add it to the data stage's "
                         "pack.columns and pack again")
    if cfg.early_stopping is not None and not index["splits"].get("val", {}).get("num_samples"):
        raise InputError(f"pretrain.early_stopping: the packed data at {packed} has no val split to evaluate on "
                         "(set the data stage's pack.val_fraction)")
    if cfg.mixing is not None:
        packed_sources = {s["source"] for s in index["splits"]["train"]["shards"]}
        unknown = sorted(cfg.mixing.source_names() - packed_sources)
        if unknown:
            raise InputError(f"pretrain.mixing: unknown sources {unknown}; the packed data has {sorted(packed_sources)}")
    return cfg.model_copy(update={"model": model})


def _ends_sentence(text: str) -> bool:
    return "\n" in text or text.rstrip(" \"')]").endswith((".", "!", "?"))


def objective_tokens(cfg: PretrainConfig, packed: str, index: dict) -> ObjectiveTokens | None:
    """The token ids `cfg.objective` uses, from the packed data's tokenizer; InputError naming the special tokens
    it lacks. None for clm."""
    kind = cfg.objective.kind
    if kind == "clm":
        return None
    from tokenizers import Tokenizer

    where = uri.join(uri.relative(packed, index["tokenizer"]), "tokenizer.json")
    tok = Tokenizer.from_str(uri.read_bytes(where).decode("utf-8"))
    ids = {name: tok.token_to_id(TOKENS[name]) for name in NEEDS[kind]}
    missing = [TOKENS[name] for name, i in ids.items() if i is None]
    if missing:
        raise InputError(f"pretrain.objective {kind!r} needs the special tokens {', '.join(missing)}, which the packed "
                         f"data's tokenizer ({where}) does not have: re-pack with a tokenizer that has them (the "
                         f"data stage's default tokenizer.special_tokens include them)")
    special = sorted(tok.get_added_tokens_decoder())
    vocab = tok.get_vocab_size()
    ends: tuple[int, ...] = ()
    if kind in ("sentence_permutation", "mlm_nsp"):
        texts = tok.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
        ends = tuple(i for i, text in enumerate(texts) if i not in set(special) and _ends_sentence(text))
    return ObjectiveTokens(eos=index["eos_id"], pad=index["pad_id"], vocab_size=vocab, special=tuple(special),
                           sentence_end=ends, **ids)


def curriculum_scores(cfg: PretrainConfig, packed: str, index: dict, out: Path | str) -> tuple[str, dict]:
    """Score every train sample (lmfleet.train.scoring) into out/curriculum/scores.npy, which every worker (and a
    search's every trial) reads; returns that dir and the report's curriculum section."""
    import io

    import numpy as np

    from lmfleet.train.scoring import compute_scores

    c = cfg.curriculum
    scores = compute_scores(packed, index, c, c.proxy)
    where = outputs.child(out, "curriculum")
    buffer = io.BytesIO()
    np.save(buffer, scores)
    outputs.write_bytes(outputs.child(where, "scores.npy"), buffer.getvalue())
    scored = scores[~np.isnan(scores)]  # column scores: NaN where no document of the sample has a value
    if len(scores) and not len(scored):
        raise InputError(f"pretrain.curriculum.score {c.score!r}: no train sample of the packed data at {packed} has "
                         "a value (see the data stage's report: packing.columns)")
    steps = Curriculum(c, scores, cfg.steps).steps
    q = np.quantile(scored, [0, 0.5, 1]).tolist() if len(scored) else [0.0] * 3
    what = {"length": "mean document length", "loss": f"loss of {c.proxy}"}.get(
        c.score, f"token-weighted mean of the documents' {c.column}")
    unscored = len(scores) - len(scored)
    section = {**c.model_dump(), "steps": steps, "scores": {"min": q[0], "median": q[1], "max": q[2]},
               "unscored_samples": unscored,
               "summary": f"curriculum: {c.score} scores ({what}) {q[0]:.2f}-{q[2]:.2f}, median {q[1]:.2f}; "
                          f"{'easiest' if c.order == 'easy_first' else 'hardest'} {c.start_fraction:.0%} at step 0, "
                          f"every sample from step {steps} ({c.pacing} pacing)"
                          + (f"; {unscored} samples without a value come last" if unscored else "")}
    return str(where), section


@dataclass(frozen=True)
class PretrainInputs:
    """What the driver hands each pretraining worker (paths or URIs: workers read a URI through a node-local
    copy, lmfleet.uri.local_copy)."""

    packed: str  # the packed data dir (an absolute path or a URI)
    tokenizer: str
    export: str | None  # model/ of the stage dir, None: no export
    use_gpu: bool
    samples: LineLog | None = None  # log_samples: every step's sample ids
    init_from: str | None = None  # the checkpoint whose weights the model starts from (resolved init_from)
    objective_tokens: ObjectiveTokens | None = None  # the ids the objective uses (None: clm)
    curriculum_scores: str | None = None  # the dir holding scores.npy (a path or URI; None: no curriculum)
    tasks: tuple[TaskRecords, ...] = ()  # eval_tasks: their records, read by the driver


def launch(cfg: PretrainConfig, out: Path | str, metrics: MetricsLog, seed: int, stage: str, *, storage: str,
           samples: LineLog | None = None, init_checkpoint=None, callbacks=(), export: bool = True,
           steps: int | None = None, tags: dict | None = None, curriculum: str | None = None,
           tasks: tuple[TaskRecords, ...] = ()):
    """One training run of `cfg` (lmfleet.runtime), writing to `out` (model/: a path or URI),
    `metrics` and `samples` (logs of the driver's node, lmfleet.runlog), and its checkpoints to
    `storage`/train (a path or URI); returns its Result. init_checkpoint: where a run without checkpoints of
    its own starts (a Tune trial's donor). steps: stop there instead of at cfg.steps (the schedule still
    spans cfg.steps). tags: added to every metrics record. curriculum: the dir of its scores.npy
    (curriculum_scores). tasks: eval_tasks' records (lmfleet.eval.tasks.training_tasks)."""
    from lmfleet.train.loop import train_loop_per_worker

    packed = cfg.data  # resolved by the caller (workers run in other working dirs): an absolute path or a URI
    use_gpu = cfg.scaling.resolve_gpu()
    index = read_index(packed)
    inputs = PretrainInputs(
        packed=packed, tokenizer=uri.relative(packed, index["tokenizer"]),
        export=str(outputs.child(out, "model")) if export else None,
        use_gpu=use_gpu,
        samples=samples if cfg.log_samples else None, init_from=cfg.init_from,
        objective_tokens=objective_tokens(cfg, packed, index),
        curriculum_scores=curriculum, tasks=tasks,
    )
    run = WorkerRun(cfg, None, inputs, seed, stage, metrics, tags=tags or {}, init_checkpoint=init_checkpoint,
                    stop_at=steps or cfg.steps, export=export)
    return runtime.launch(train_loop_per_worker, run, storage=storage, use_gpu=use_gpu, callbacks=callbacks)


def run_pretrain_stage(cfg: PretrainConfig, ctx) -> dict:
    check_inputs(cfg, run_dir=ctx.run_dir)
    packed = packed_dir(cfg, ctx.run_dir)
    cfg = _resolved(cfg, read_index(packed), packed, ctx.run_dir).model_copy(update={"data": packed})
    scores, curriculum = None, None
    if cfg.curriculum is not None:
        with ctx.step("curriculum"):
            scores, curriculum = curriculum_scores(cfg, packed, read_index(packed), ctx.out)
    tasks, task_section = training_tasks(cfg.eval_tasks.tasks, "pretrain.eval_tasks.tasks") if cfg.eval_tasks else ((), {})
    if cfg.tune is not None:
        from lmfleet.tune.search import run_search

        return run_search(cfg, ctx, partial(launch, curriculum=scores, tasks=tasks))
    with ctx.step("train"):
        log = ctx.metrics.for_workers()
        result = launch(cfg, ctx.out, log, ctx.seed, ctx.name, storage=ctx.storage, export=cfg.export,
                        samples=log.child(ctx.out_dir / "samples.jsonl"), curriculum=scores, tasks=tasks)
    history = ctx.history("loss")
    final = history[-1] if history else {}
    report = {
        "steps": final.get("step", cfg.steps), "final_loss": final.get("loss"), "val_loss": final.get("val_loss"),
        "val_perplexity": final.get("val_perplexity"),
        # the first step pays for warm-up; the median of the rest is the steady state
        "tokens_per_s": statistics.median([h["tokens_per_s"] for h in history[1:]] or [final.get("tokens_per_s", 0.0)]),
        "mfu": final.get("mfu"), "world_sizes": sorted({h["world_size"] for h in history}),
        "checkpoint": checkpoint_uri(result.checkpoint),
    }
    if curriculum is not None:
        report["curriculum"] = curriculum
    if tasks:
        report["eval_tasks"] = tasks_section(task_section, ctx.history())
    if cfg.early_stopping is not None:
        report["early_stopping"] = early_stopping.report_section(cfg.early_stopping, ctx.history("event"), cfg.steps)
    memory = report_section(ctx.history("memory_per_rank"))
    if memory:
        report["memory"] = memory
    export = outputs.read_json(outputs.child(ctx.out, "model", "export.json"))  # written by rank 0, on any node
    if export:
        report["export"] = {"path": ctx.uri("model"), **export}
    report["summary"] = [
        f"trained {report['steps']} steps ({cfg.parallel.strategy}, tp {cfg.parallel.tp_size}, pp {cfg.parallel.pp_size}, "
        f"workers {report['world_sizes']}): loss {report['final_loss']:.4f}",
        f"validation: loss {report['val_loss']:.4f}, perplexity {report['val_perplexity']:.2f}"
        if report["val_loss"] is not None else "validation: no val split",
        f"throughput: {report['tokens_per_s']:.0f} tokens/s" + (f", MFU {100 * report['mfu']:.1f}%" if report["mfu"] else ""),
    ] + ([f"model: {report['export']['path']} ({report['export']['format']}, step {report['export']['step']})"]
         if "export" in report else [])
    if "early_stopping" in report:
        report["summary"].insert(1, report["early_stopping"]["summary"])
    if curriculum is not None:
        report["summary"].insert(1, curriculum["summary"])
    if tasks:
        report["summary"].append(report["eval_tasks"]["summary"])
    report["summary"] += summary_line(memory)
    return ctx.write_report(report)
