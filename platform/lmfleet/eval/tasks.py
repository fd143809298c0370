"""Evaluation tasks: records read and quarantined on the driver, scored per record by a model (in an actor:
lmfleet.eval.stage), aggregated into metrics with intervals (lmfleet.eval.metrics).

Every task file is JSONL or a JSON list of records. A record a task cannot use is counted under a reason
(invalid_json, not_an_object, missing_<field>, bad_choices, bad_answer, unknown_label, bad_reference,
empty_text) with its id, never scored and never an error; only a task with no usable record stops the stage.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lmfleet import uri
from lmfleet.eval import metrics as M
from lmfleet.eval.task_config import ClassificationTask, MultipleChoiceTask, PerplexityTask, Task

EXAMPLE_IDS = 5  # ids of rejected records kept per reason


@dataclass
class Examples:
    task: Task
    items: list[dict]  # usable records, normalized per kind (with "id")
    rejects: Counter = field(default_factory=Counter)
    reject_ids: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, reason: str, rid: str) -> None:
        self.rejects[reason] += 1
        ids = self.reject_ids.setdefault(reason, [])
        if len(ids) < EXAMPLE_IDS:
            ids.append(rid)


def _raw_records(path: str) -> list[tuple[str, object]]:
    """(location, parsed record or the exception) for each record of a JSONL file or JSON list."""
    data = uri.read_bytes(path)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    text = data.decode("utf-8", errors="replace")
    if not path.endswith(".jsonl") and text.lstrip().startswith("["):
        try:
            return [(f"{name}:{i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            return [(f"{name}", err)]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{name}:{i}", json.loads(line)))
            except json.JSONDecodeError as err:
                out.append((f"{name}:{i}", err))
    return out


def read_examples(task: Task) -> Examples:
    ex = Examples(task, [])
    for where, record in _raw_records(task.path):
        if isinstance(record, Exception):
            ex.reject("invalid_json", where)
            continue
        if not isinstance(record, dict):
            ex.reject("not_an_object", where)
            continue
        rid = str(record.get("id", where))
        item = _normalized(task, record, rid, ex)
        if item is not None:
            ex.items.append(item)
            if task.limit is not None and len(ex.items) == task.limit:
                break
    return ex


def _normalized(task: Task, record: dict, rid: str, ex: Examples) -> dict | None:
    missing = [f for f in task.record_fields() if f not in record]
    if missing:
        ex.reject(f"missing_{missing[0]}", rid)
        return None
    if isinstance(task, PerplexityTask):
        text = record[task.text_field]
        if not isinstance(text, str) or not text.strip():
            ex.reject("empty_text", rid)
            return None
        return {"id": rid, "text": text}
    prompt = task.prompt.format_map(record)
    if isinstance(task, MultipleChoiceTask):
        choices = record[task.choices_field]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            ex.reject("bad_choices", rid)
            return None
        answer = record[task.answer_field]
        gold = answer if isinstance(answer, int) and not isinstance(answer, bool) else (
            choices.index(answer) if isinstance(answer, str) and answer in choices else None)
        if gold is None or not 0 <= gold < len(choices):
            ex.reject("bad_answer", rid)
            return None
        return {"id": rid, "context": prompt, "choices": choices, "gold": gold}
    if isinstance(task, ClassificationTask):
        labels = list(task.verbalizers)
        label = str(record[task.label_field])
        if label not in labels:
            ex.reject("unknown_label", rid)
            return None
        return {"id": rid, "context": prompt, "gold": labels.index(label)}
    refs = record[task.answer_field]
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        ex.reject("bad_reference", rid)
        return None
    item = {"id": rid, "prompt": prompt, "references": refs}
    if "python" in task.metrics:
        item["test"] = str(record[task.test_field])
    return item


# -- scoring (in an actor) --

def score(model, task: Task, items: list[tuple[int, dict]], seed: int) -> list[dict]:
    """Per-record results of `items` ((record index, record)) under `model` (lmfleet.eval.lm.EvalModel)."""
    if isinstance(task, PerplexityTask):
        texts = [it["text"] for _, it in items]
        return [{"logprob": lp, "tokens": n, "bytes": len(t.encode("utf-8")), "words": len(t.split())}
                for (lp, n), t in zip(model.rolling_loglikelihood(texts), texts, strict=True)]
    if isinstance(task, MultipleChoiceTask | ClassificationTask):
        verbalizers = list(task.verbalizers.values()) if isinstance(task, ClassificationTask) else None
        requests, spans = [], []
        for _, it in items:
            choices = verbalizers or it["choices"]
            spans.append((len(requests), len(choices), choices))
            requests += [(it["context"], task.delimiter + c) for c in choices]
        lls = [ll for ll, _ in model.loglikelihood(requests)]
        out = []
        for (_, it), (a, n, choices) in zip(items, spans, strict=True):
            mine = lls[a : a + n]
            raw, norm = M.choose(mine, choices)
            row = {"logliks": mine, "pred": raw, "gold": it["gold"], "acc": float(raw == it["gold"])}
            if isinstance(task, MultipleChoiceTask):
                row.update(pred_norm=norm, acc_norm=float(norm == it["gold"]))
            out.append(row)
        return out
    out = []
    for index, it in items:
        prompt = model.chat_prompt(it["prompt"]) if task.chat else it["prompt"]
        text = model.generate(prompt, task.max_new_tokens, task.stop, task.temperature, task.top_p,
                              seed=seed * 1_000_003 + index)
        row = {"prediction": text}
        refs = it["references"]
        if "exact_match" in task.metrics:
            row["exact_match"] = M.exact_match(text, refs)
        if "f1" in task.metrics:
            row["f1"] = M.token_f1(text, refs)
        if "rouge_l" in task.metrics:
            row["rouge_l"] = M.rouge_l(text, refs)
        if "python" in task.metrics:
            row["python"] = run_python(it["prompt"] + text + "\n\n" + it["test"] + "\n", task.timeout_s)
        out.append(row)
    return out


def run_python(program: str, timeout_s: float) -> float:
    """1.0 when `program` exits 0 in a fresh isolated Python (-I: no PYTHON* variables, no user site) within the
    timeout (then killed). Its environment is PATH alone: model-written code never sees the credentials or
    tokens of this process's environment."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False, encoding="utf-8") as f:
        f.write(program)
    try:
        proc = subprocess.run([sys.executable, "-I", f.name], capture_output=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir(),
                              env={"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8"})
        return float(proc.returncode == 0)
    except subprocess.TimeoutExpired:
        return 0.0
    finally:
        os.unlink(f.name)


# -- aggregation (on the driver) --

def aggregate(task: Task, items: list[dict], rows: list[dict], confidence: float, resamples: int, seed: int) -> dict:
    """The task's metrics over every record's row: {metric: {value, stderr?, ci}}, plus extras per kind."""
    s = zlib.crc32(task.name.encode()) ^ seed  # a bootstrap stream per task, the same for every model
    boot = lambda stat: M.bootstrap(stat, len(rows), resamples, confidence, s)  # noqa: E731
    if isinstance(task, PerplexityTask):
        cols = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in ("logprob", "tokens", "bytes", "words")}
        ppl = lambda idx, k: M.perplexities(*(cols[c][idx] for c in ("logprob", "tokens", "bytes", "words")))[k]  # noqa: E731
        return {k: boot(lambda idx, k=k: ppl(idx, k)) for k in ("bits_per_byte", "token_perplexity", "word_perplexity")}
    if isinstance(task, MultipleChoiceTask):
        return {k: M.mean_with_stderr([r[k] for r in rows], confidence) for k in ("acc", "acc_norm")}
    if isinstance(task, ClassificationTask):
        labels = list(task.verbalizers)
        gold, pred = np.array([r["gold"] for r in rows]), np.array([r["pred"] for r in rows])
        report = M.classification_report(gold, pred, labels)
        return {"acc": M.mean_with_stderr([r["acc"] for r in rows], confidence),
                "macro_f1": boot(lambda idx: M.classification_report(gold[idx], pred[idx], labels)["macro_f1"]),
                "per_class": report["per_class"]}
    out = {k: M.mean_with_stderr([r[k] for r in rows], confidence) for k in task.metrics if k != "bleu"}
    if "bleu" in task.metrics:
        preds = [r["prediction"] for r in rows]
        refs = [it["references"] for it in items]
        out["bleu"] = boot(lambda idx: M.corpus_bleu([preds[i] for i in idx], [refs[i] for i in idx]))
    return out


PRIMARY = {"perplexity": "bits_per_byte", "multiple_choice": "acc_norm", "classification": "acc"}


def primary_metric(task: Task, results: dict) -> str:
    """The metric a task is summed up by: per kind, a generate task's first, an lm_eval task's first reported."""
    return PRIMARY.get(task.kind) or (task.metrics[0] if task.kind == "generate" else next(iter(results)))


def fmt_metric(m: dict) -> str:
    v = m["value"]
    if m.get("ci") is None or any(not math.isfinite(x) for x in m["ci"]):
        return f"{v:.4g}"
    return f"{v:.4g} [{m['ci'][0]:.4g}, {m['ci'][1]:.4g}]"


# -- tasks during training (`eval_tasks:` of pretrain and sft) --

@dataclass(frozen=True)
class TaskRecords:
    """A task's usable records, read and quarantined by the driver: what a training worker scores."""

    task: Task
    items: tuple[dict, ...]


def task_inputs(tasks, key: str) -> list:
    """Preflight of file tasks (a training stage's eval_tasks.tasks, an eval stage's tasks): each file exists,
    else InputError naming `key`.<task>.path; returns them as the stage's inputs (lmfleet.inputs)."""
    from pathlib import Path

    from lmfleet.errors import InputError
    from lmfleet.inputs import Input

    inputs = []
    for t in tasks:
        if not uri.info(t.path, f"{key}.{t.name}.path").is_file:
            raise InputError(f"{key}.{t.name}.path {t.path!r}: no such file (expected JSONL or a JSON list)")
        inputs.append(Input(f"{key.split('.', 1)[1]}.{t.name}", (t.path if uri.is_uri(t.path) else Path(t.path),)))
    return inputs


def training_tasks(tasks: list[Task], key: str) -> tuple[tuple[TaskRecords, ...], dict]:
    """The records of `eval_tasks.tasks` for the workers, and the report's view of them (records, rejects);
    InputError (naming `key`) for a task without a usable record."""
    from lmfleet.errors import InputError

    out, report = [], {}
    task_inputs(tasks, key)
    for t in tasks:
        ex = read_examples(t)
        if not ex.items:
            raise InputError(f"{key}.{t.name}: no usable record in {t.path} (rejected: "
                             f"{dict(ex.rejects) or 'the file has no records'})")
        out.append(TaskRecords(t, tuple(ex.items)))
        report[t.name] = {"kind": t.kind, "path": t.path, "records": len(ex.items), "rejected": dict(ex.rejects)}
    return tuple(out), report


def score_tasks(model, tasks: tuple[TaskRecords, ...], seed: int) -> dict[str, float]:
    """Every task's metrics on `model` (an EvalModel) as task/<name>/<metric> values (no intervals: a curve)."""
    out = {}
    for tr in tasks:
        rows = score(model, tr.task, list(enumerate(tr.items)), seed)
        for metric, value in aggregate(tr.task, list(tr.items), rows, 0.95, 0, seed).items():
            if metric != "per_class":
                out[f"task/{tr.task.name}/{metric}"] = value["value"]
    return out


def tasks_section(tasks: dict, records: list[dict]) -> dict:
    """A training stage report's `eval_tasks`: each task's records and rejects, and the metrics of its last
    evaluation (the stage's metrics records hold every one: task/<name>/<metric>)."""
    scored = [r for r in records if any(k.startswith("task/") for k in r)]
    last = scored[-1] if scored else {}
    values = {k.removeprefix("task/"): v for k, v in last.items() if k.startswith("task/")}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items()) or "none"
    return {"tasks": tasks, "step": last.get("step"), "last": values,
            "summary": f"eval tasks at step {last.get('step')}: {shown}"}
