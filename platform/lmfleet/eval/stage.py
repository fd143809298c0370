"""The eval stage: models x tasks, scored by Ray actors, merged into one table with intervals.

Each task's usable records are cut into batches of `batch_size` in file order; the batches are dealt to the
actors of a model (one model loaded per actor), and each batch is scored whole by one actor, so the numbers do
not depend on how many actors there are. Models are evaluated one after another, each over all the actors
the cluster fits.

Outputs (in the stage dir, a path or URI):
  predictions/<model>/<task>.jsonl   per record: its id and what the model gave (log-likelihoods, the pick,
                                     the generation, per-record metrics)
  report.json                        per model x task: metrics with intervals, records used and rejected (by
                                     reason, with ids); a comparison table across the models
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmfleet import outputs, uri
from lmfleet.errors import InputError
from lmfleet.eval.config import EvalStageConfig
from lmfleet.eval.harness import harness_metrics
from lmfleet.eval.task_config import LmEvalTask
from lmfleet.eval.tasks import (
    Examples,
    aggregate,
    fmt_metric,
    primary_metric,
    read_examples,
    score,
    task_inputs,
)
from lmfleet.inputs import Input
from lmfleet.model.hf_config import OWN_CONFIG, checkpoint_model_config, input_model


def check_model(location: str, key: str) -> None:
    """A model the stage can score: a HF causal LM dir (or a PEFT adapter on its base) or an lmfleet causal
    export; InputError naming `key` otherwise."""
    has = lambda name: uri.info(uri.join(location, name), key).is_file  # noqa: E731 - a path or URI
    if has(OWN_CONFIG):
        if not checkpoint_model_config(location, key).causal:
            raise InputError(f"{key} {location}: an encoder (causal: false) has no left-to-right likelihood to "
                             "evaluate with these task kinds")
        return
    if not has("config.json") and not has("adapter_config.json"):
        raise InputError(f"{key} {location}: no model there (expected a stage of this run, a HF model dir or an "
                         f"lmfleet export with {OWN_CONFIG})")


def check_inputs(cfg: EvalStageConfig, upstream: set[str] = frozenset(), run_dir=None) -> list[Input]:
    inputs = []
    for k, ref in enumerate(cfg.models):
        location = input_model(ref, run_dir)
        if ref not in upstream:
            check_model(location, f"eval.models[{k}] {ref!r}:")
        inputs.append(Input(f"models.{k}", (location if uri.is_uri(location) else Path(location),)))
    for t in cfg.tasks:
        if isinstance(t, LmEvalTask) and t.include_path is not None:
            if uri.is_uri(t.include_path) or not Path(t.include_path).is_dir():
                raise InputError(f"eval.tasks.{t.name}.include_path {t.include_path!r}: no such local folder "
                                 "(expected lm-eval task YAMLs and their data files)")
            inputs.append(Input(f"tasks.{t.name}", (Path(t.include_path),)))
    return inputs + task_inputs([t for t in cfg.tasks if not isinstance(t, LmEvalTask)], "eval.tasks")


class EvalActor:
    """One model, loaded once, scoring batches of records of any task, or running lm-eval tasks."""

    def __init__(self, location: str, max_length: int, batch_size: int, use_gpu: bool, cpus_per_actor: float):
        import torch

        from lmfleet.eval.lm import EvalModel

        if not use_gpu:  # Ray gives the actor cpus_per_actor CPUs; torch would take every core of the node
            torch.set_num_threads(max(1, int(cpus_per_actor)))
        path = uri.local_copy(location, "eval.models")
        self.model = EvalModel.load(path, max_length, batch_size, torch.device("cuda" if use_gpu else "cpu"))

    def score(self, task, items: list[tuple[int, dict]], seed: int) -> list[dict]:
        return score(self.model, task, items, seed)

    def harness(self, task, files: dict[str, bytes], seed: int, bootstrap: int) -> dict:
        from lmfleet.eval.harness import run_harness

        return run_harness(self.model, task, files, seed, bootstrap)


def display_names(refs: list[str]) -> list[str]:
    """A short name per model for tables and file names: the stage name or the dir's name, the whole
    reference where two would clash."""
    short = [ref.rstrip("/").rsplit("/", 1)[-1] for ref in refs]
    short = [s if short.count(s) == 1 else ref for s, ref in zip(short, refs, strict=True)]
    return [re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or f"model{k}" for k, s in enumerate(short)]


def _read(cfg: EvalStageConfig) -> tuple[dict[str, Examples], dict[str, dict[str, bytes]]]:
    """Every file task's records (quarantined) and every lm_eval task's folder."""
    from lmfleet.eval.harness import task_folder

    examples, folders = {}, {}
    for t in cfg.tasks:
        if isinstance(t, LmEvalTask):
            folders[t.name] = task_folder(t.include_path, f"eval.tasks.{t.name}.include_path") if t.include_path else {}
            continue
        ex = examples[t.name] = read_examples(t)
        if not ex.items:
            raise InputError(f"eval.tasks.{t.name}: no usable record in {t.path} (rejected: "
                             f"{dict(ex.rejects) or 'the file has no records'})")
    return examples, folders


def run_eval_stage(cfg: EvalStageConfig, ctx) -> dict:
    import ray

    check_inputs(cfg, run_dir=ctx.run_dir)
    names = display_names(cfg.models)
    with ctx.step("read") as said:
        examples, folders = _read(cfg)
        said.append(", ".join(f"{n} {len(ex.items)}" for n, ex in examples.items()))
    # A unit of work: a batch of a file task's records, or a whole lm_eval task (lm-eval batches it itself).
    units = [(ex.task, list(range(a, min(a + cfg.batch_size, len(ex.items)))))
             for ex in examples.values() for a in range(0, len(ex.items), cfg.batch_size)]
    units += [(t, None) for t in cfg.tasks if isinstance(t, LmEvalTask)]
    s = cfg.scaling
    use_gpu = s.resolve_gpu()
    actors_per_model = min(len(units), s.num_workers)
    actor = ray.remote(num_cpus=s.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=1,
                       max_task_retries=1)(EvalActor)  # scoring is pure: a retried batch gives the same rows
    files = {n: ray.put(f) for n, f in folders.items()}
    results: dict[str, dict] = {}
    counts: dict[str, int] = {n: len(ex.items) for n, ex in examples.items()}
    for ref, name in zip(cfg.models, names, strict=True):
        location = input_model(ref, ctx.run_dir)
        with ctx.step(f"score {name}") as said:
            actors = [actor.remote(location, cfg.max_length, cfg.batch_size, use_gpu, s.cpus_per_worker)
                      for _ in range(actors_per_model)]
            try:
                rows, harnessed = _run_units(actors, units, examples, files, ctx.seed, cfg.bootstrap)
            finally:
                for a in actors:
                    ray.kill(a)
            results[name] = {}
            for t in cfg.tasks:
                if isinstance(t, LmEvalTask):
                    out = harnessed[t.name]
                    counts[t.name] = sum(out["counts"].values())
                    _write_lines(ctx, name, t.name, [{"task": k, **x} for k, v in out["samples"].items() for x in v])
                    results[name][t.name] = harness_metrics(out, cfg.confidence)
                    continue
                ex = examples[t.name]
                _write_lines(ctx, name, t.name, [{"id": it["id"], **r} for it, r in zip(ex.items, rows[t.name],
                                                                                         strict=True)])
                results[name][t.name] = aggregate(t, ex.items, rows[t.name], cfg.confidence, cfg.bootstrap, ctx.seed)
            said.append(", ".join(f"{t.name} {k} {results[name][t.name][k]['value']:.4g}"
                                  for t in cfg.tasks for k in [primary_metric(t, results[name][t.name])]))
    report = {
        "models": {name: {"ref": ref, "path": input_model(ref, ctx.run_dir)} for ref, name in zip(cfg.models, names,
                                                                                                 strict=True)},
        "tasks": {t.name: {"kind": t.kind, "path": t.include_path if isinstance(t, LmEvalTask) else t.path,
                           "records": counts[t.name],
                           "rejected": dict(examples[t.name].rejects) if t.name in examples else {},
                           "reject_ids": examples[t.name].reject_ids if t.name in examples else {}} for t in cfg.tasks},
        "confidence": cfg.confidence, "actors_per_model": actors_per_model,
        "results": results, "outputs": {"predictions": ctx.uri("predictions")},
    }
    report["summary"] = _summary(cfg, report, names)
    ctx.metrics.write(ctx.name, **{f"{t.name}/{k}/{n}": results[n][t.name][k]["value"]
                                   for n in names for t in cfg.tasks for k in [primary_metric(t, results[n][t.name])]})
    return ctx.write_report(report)


def _run_units(actors, units, examples, files, seed: int, bootstrap: int) -> tuple[dict, dict]:
    """Every unit on one model's actors (unit j on actor j mod n): each file task's rows in record order, and
    each lm_eval task's output."""
    import ray

    refs = [actors[j % len(actors)].harness.remote(task, files[task.name], seed, bootstrap) if chunk is None else
            actors[j % len(actors)].score.remote(task, [(i, examples[task.name].items[i]) for i in chunk], seed)
            for j, (task, chunk) in enumerate(units)]
    rows: dict[str, list[dict]] = {n: [] for n in examples}
    harnessed: dict[str, dict] = {}
    for (task, chunk), out in zip(units, ray.get(refs), strict=True):
        if chunk is None:
            harnessed[task.name] = out
        else:
            rows[task.name] += out
    return rows, harnessed


def _write_lines(ctx, model: str, task: str, rows: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    outputs.write_bytes(outputs.child(ctx.out, "predictions", model, f"{task}.jsonl"), lines.encode("utf-8"))


def _summary(cfg: EvalStageConfig, report: dict, names: list[str]) -> list[str]:
    lines = []
    for n, t in report["tasks"].items():
        rejected = sum(t["rejected"].values())
        lines.append(f"task {n} ({t['kind']}): {t['records']} records"
                     + (f", {rejected} rejected ({', '.join(f'{k} {v}' for k, v in t['rejected'].items())})"
                        if rejected else ""))
    pct = f"{cfg.confidence:.0%}"
    header = ["task", "metric", *[f"{n} [{pct} interval]" for n in names]]
    rows = []
    for t in cfg.tasks:
        for metric in report["results"][names[0]][t.name]:
            if metric == "per_class":
                continue
            rows.append([t.name, metric, *[fmt_metric(report["results"][n][t.name][metric]) for n in names]])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines
