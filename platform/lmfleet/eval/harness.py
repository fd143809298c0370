"""lm-evaluation-harness on lmfleet's model adapter (task kind `lm_eval`).

lm-eval asks a model three things (LM.loglikelihood, loglikelihood_rolling, generate_until); LMFleetLM answers
them with lmfleet.eval.lm.EvalModel, the adapter the native tasks use, so a task scored natively and through
lm-eval sees the same log-likelihoods. The task folder (`include_path`: YAMLs and their data files) is read by
the driver and written into a temporary folder on the actor's node, which is the working directory while
lm-eval loads the datasets: a relative `data_files` path works on any node. Nothing is downloaded: the
Hugging Face Hub is switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) unless the environment says otherwise.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from statistics import NormalDist

from lmfleet.errors import InputError

MAX_FOLDER_BYTES = 256 * 2**20  # the task folder travels through Ray's object store


def task_folder(path: str, key: str) -> dict[str, bytes]:
    """The files under `path` (relative name -> bytes), read on the driver."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{key} {path!r}: no such folder (expected task YAMLs and their data files)")
    files, total = {}, 0
    for f in sorted(root.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            total += f.stat().st_size
            if total > MAX_FOLDER_BYTES:
                raise InputError(f"{key} {path!r}: more than {MAX_FOLDER_BYTES >> 20} MiB; keep only the tasks' YAMLs "
                                 "and data files there")
            files[f.relative_to(root).as_posix()] = f.read_bytes()
    return files


def make_lm(model, seed: int):
    """An lm_eval LM over `model` (an EvalModel)."""
    from lm_eval.api.model import LM

    class LMFleetLM(LM):
        def loglikelihood(self, requests):
            return model.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests):
            return [lp for lp, _ in model.rolling_loglikelihood([r.args[0] for r in requests])]

        def generate_until(self, requests):
            out = []
            for k, r in enumerate(requests):
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
                out.append(model.generate(context, int(kwargs.get("max_gen_toks", 256)), until,
                                          float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                          float(kwargs.get("top_p", 1.0)), seed=seed * 1_000_003 + k))
            return out

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return model.tok.apply_chat_template(chat_history, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)

        @property
        def tokenizer_name(self) -> str:
            return getattr(model.tok, "name_or_path", "lmfleet")

    return LMFleetLM()


def run_harness(model, task, files: dict[str, bytes], seed: int, bootstrap: int) -> dict:
    """lm-eval's simple_evaluate of `task` (LmEvalTask) on `model`: {"results": per lm-eval task {metric: value},
    "counts": records per lm-eval task, "samples": per lm-eval task its logged samples}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="lmfleet-lm-eval-") as tmp:
        for rel, data in files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            manager = TaskManager(include_path=tmp if files else None, include_defaults=task.include_defaults)
            out = lm_eval.simple_evaluate(
                model=make_lm(model, seed), tasks=list(task.tasks), num_fewshot=task.num_fewshot, limit=task.limit,
                task_manager=manager, bootstrap_iters=bootstrap, log_samples=True, apply_chat_template=task.chat,
                confirm_run_unsafe_code=task.allow_code_execution, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
        finally:
            os.chdir(cwd)
    counts = {t: int(n.get("effective", n.get("original", 0))) for t, n in (out.get("n-samples") or {}).items()}
    samples = {t: json.loads(json.dumps(rows, default=str)) for t, rows in (out.get("samples") or {}).items()}
    return {"results": json.loads(json.dumps(out["results"], default=str)), "counts": counts, "samples": samples}


def harness_metrics(out: dict, confidence: float) -> dict:
    """lm-eval's results as the stage's metrics: "<lm-eval task>/<metric>" (with its filter when not `none`) ->
    {value, stderr, ci}: the interval is the normal one on lm-eval's stderr (its bootstrap for non-mean metrics)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    metrics = {}
    for t, values in out["results"].items():
        for key, v in values.items():
            if "," not in key or "_stderr," in key or not isinstance(v, int | float):
                continue
            name, filt = key.split(",", 1)
            se = values.get(f"{name}_stderr,{filt}")
            se = float(se) if isinstance(se, int | float) and math.isfinite(se) else None
            label = f"{t}/{name}" + ("" if filt == "none" else f" ({filt})")
            metrics[label] = {"value": float(v), "stderr": se,
                              "ci": [float(v) - z * se, float(v) + z * se] if se is not None else None}
    return metrics
