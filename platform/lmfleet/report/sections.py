"""The report's sections: the run's header, then one per stage, by what the stage is (data, pretraining,
an HF post-training stage, an RL stage, a search). Each returns HTML and how many plots it holds."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmfleet.outputs import child
from lmfleet.report import markup as m
from lmfleet.report.load import RunView, StageView
from lmfleet.report.plots import Marks, Panel, auto_panels, bars, data_uri, grid, panels_figure
from lmfleet.runlog import read_jsonl
from lmfleet.tune import trials as tune_trials

RL_KINDS = {"ppo", "grpo", "rloo"}
# What HF trainers log that a plot does not help with (run times, counters).
HF_SKIP = {"epoch", "num_tokens", "eval_num_tokens", "eval_runtime", "eval_samples_per_second",
           "eval_steps_per_second", "train_runtime", "train_samples_per_second", "train_steps_per_second",
           "train_loss", "total_flos", "time", "attempt"}
MAX_MARKS = 60  # checkpoint lines drawn; more would hide the curves


@dataclass
class Section:
    id: str
    title: str
    body: str
    plots: int


def _when(t: float | None) -> str | None:
    return None if not t else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _seconds(stage: StageView) -> float:
    return round(sum((stage.report.get("seconds") or {}).values()), 1)


def run_header(run: RunView) -> Section:
    """The run: status, where, seed, versions, hardware, wall time per stage (a plot), the config."""
    r = run.report
    env = r.get("environment", {})
    starts = [s.state.get("started") for s in run.stages if s.state.get("started")]
    facts = {"status": r.get("status"), "run dir": r.get("run_dir", str(run.dir)), "seed": run.config.get("seed"),
             "started": _when(min(starts) if starts else None),
             "wall time": f"{r['seconds']:.1f} s" if r.get("seconds") is not None else None,
             "failed stage": r.get("failed_stage"), "error": r.get("error"),
             "versions": ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()) or None,
             "driver": env.get("host")}
    rows = []
    for s in run.stages:
        cluster = s.report.get("cluster") or {}
        hw = (f"{cluster['nodes']} node(s), {cluster['cpus']:g} CPU, {cluster['gpus']:g} GPU"
              + (f" ({', '.join(cluster['accelerators'])})" if cluster.get("accelerators") else "")) if cluster else ""
        steps = ", ".join(f"{k} {v:.1f}" for k, v in (s.report.get("seconds") or {}).items())
        rows.append([s.name, s.kind, s.status, _seconds(s), steps, hw])
    body = m.kv(facts) + m.h3("stages") + m.table(rows, ["stage", "kind", "status", "seconds", "steps (s)", "cluster"])
    timed = [s for s in run.stages if s.report.get("seconds")]
    plots = 0
    if timed:
        fig, (ax,) = grid(1, 1)
        fig.set_size_inches(9, 0.5 + 0.45 * len(timed))
        for y, s in enumerate(reversed(timed)):
            left = 0.0
            for i, (phase, sec) in enumerate(s.report["seconds"].items()):
                ax.barh(y, sec, left=left, color=f"C{i % 10}", edgecolor="white")
                if sec > 0.08 * max(_seconds(t) for t in timed):
                    ax.text(left + sec / 2, y, phase, ha="center", va="center", fontsize=7, color="white")
                left += sec
        ax.set_yticks(range(len(timed)), [s.name for s in reversed(timed)], fontsize=8)
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_title("wall time per stage and step", fontsize=9)
        body += m.figure(data_uri(fig), "wall time of each stage, by step")
        plots = 1
    body += m.details("config (resolved: every default filled in)", m.pre(run.config_text))
    return Section("run", f"run {r.get('name', '')}", body, plots)


def stage_section(run: RunView, stage: StageView) -> Section:
    if stage.kind == "data":
        body, plots = _data(stage)
    elif "trials" in stage.report:
        body, plots = _search(stage)
    elif stage.kind == "pretrain":
        body, plots = _pretrain(stage)
    elif stage.kind in RL_KINDS:
        body, plots = _rl(stage)
    elif stage.kind == "prune":
        body, plots = _prune(stage)
    elif stage.kind == "eval":
        body, plots = _eval(stage)
    elif stage.kind == "distill_data":
        body, plots = _distill_data(stage)
    else:
        body, plots = _hf(stage)
    status = {"skipped": "up to date: not re-run; its last run's results"}.get(stage.status, stage.status)
    head = m.kv({"kind": stage.kind, "status": status, "output": str(stage.dir), "started": _when(stage.state.get("started")),
                 "finished": _when(stage.state.get("finished")), "seconds": _seconds(stage) or None})
    summary = [x for x in stage.report.get("summary", []) if not x.startswith("|")]  # tables: drawn as tables here
    return Section(f"stage-{stage.name}", f"[{stage.name}] {stage.kind}", head + m.lines(summary) + body, plots)


# -- data --

def _data(stage: StageView) -> tuple[str, int]:
    r = stage.report
    if "docs_in" not in r:
        return "<p>the stage did not finish: no counts</p>", 0
    valid = r.get("valid_docs", r["docs_in"] - r.get("rejected", 0))
    exact = valid - r.get("exact_duplicates_removed", 0)
    funnel = (["read", "valid (rejects out)", "after exact dedup", "kept (after near dedup)"],
              [r["docs_in"], valid, exact, r.get("docs_kept", exact)])
    draw = [lambda ax: bars(ax, *funnel, "documents: read to kept")]
    rejects = r.get("rejects") or {}
    if rejects:
        draw.append(lambda ax: bars(ax, list(rejects), list(rejects.values()), "rejected, by reason", "C3"))
    sizes = {int(k): v for k, v in (r.get("cluster_sizes") or {}).items()}
    if sizes:
        def clusters(ax):
            from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

            ax.bar(list(sizes), list(sizes.values()), color="C1", width=0.8)
            if max(sizes.values()) > 20 * min(sizes.values()):  # pairs outnumber big clusters by decades
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("documents in the cluster", fontsize=8)
            ax.set_title(f"near-duplicate clusters by size ({sum(sizes.values()):,})", fontsize=9)
            ax.tick_params(labelsize=7)
        draw.append(clusters)
    per_source = r.get("per_source") or {}
    if per_source:
        names = list(per_source)

        def sources(ax):
            y = list(range(len(names)))[::-1]
            ax.barh([v + 0.2 for v in y], [per_source[n]["docs_in"] for n in names], height=0.4, label="read")
            ax.barh([v - 0.2 for v in y], [per_source[n]["docs_kept"] for n in names], height=0.4, label="kept")
            ax.set_yticks(y, names, fontsize=7)
            ax.legend(fontsize=6)
            ax.set_title("documents per source", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        draw.append(sources)
    packing = (r.get("packing") or {}).get("per_source") or {}
    if packing:
        draw.append(lambda ax: bars(ax, list(packing), [v["train_tokens"] for v in packing.values()],
                                    "training tokens per source (after mixing)", "C2"))
    fig, axes = grid(len(draw), 3)
    for ax, fn in zip(axes, draw, strict=True):
        fn(ax)
    body = m.figure(data_uri(fig), "the document funnel, rejections, cluster sizes and sources")
    examples = r.get("reject_examples") or {}
    body += m.h3("rejected") + (m.table([[k, n, ", ".join(examples.get(k, [])[:3])] for k, n in rejects.items()],
                                        ["reason", "documents", "examples (ids)"]) or "<p>none</p>")
    mixing = r.get("mixing") or {}
    rows = [[n, v["docs_in"], v["docs_kept"], v.get("chars_kept"), (mixing.get(n) or {}).get("share"),
             (mixing.get(n) or {}).get("rate"), (packing.get(n) or {}).get("train_tokens"),
             (packing.get(n) or {}).get("val_tokens")] for n, v in per_source.items()]
    body += m.h3("sources and mixing") + m.table(rows, ["source", "read", "kept", "chars kept", "share", "rate",
                                                        "train tokens", "val tokens"])
    extra = {k: r[k] for k in ("lsh", "c4", "pii", "decontamination", "tokenizer") if r.get(k)}
    if extra:
        body += m.h3("dedup and filters") + m.kv({k: m.fmt(v) for k, v in extra.items()})
    return body, 1


# -- pruning --

def _prune(stage: StageView) -> tuple[str, int]:
    r = stage.report
    parts = [p for p in ("before", "pruned", "recovered") if p in r]
    if not parts:
        return "<p>the stage did not finish: no figures</p>", 0
    fig, (a, b, c) = grid(3, 3)
    bars(a, parts, [r[p]["val_perplexity"] for p in parts], "validation perplexity", "C3")
    bars(b, parts, [r[p]["params"] for p in parts], "parameters", "C0")
    bars(c, parts, [100 * r[p]["sparsity"] for p in parts], "prunable weights at zero (%)", "C2")
    body = m.figure(data_uri(fig), "the model before pruning, pruned, and after recovery")
    rows = [[p, r[p]["params"], r[p]["sparsity"], r[p]["val_loss"], r[p]["val_perplexity"]] for p in parts]
    body += m.table(rows, ["model", "parameters", "zero fraction (prunable)", "val loss", "val perplexity"])
    records = _steps(stage, "step")
    uri = panels_figure(records, "step", [Panel("loss", ["loss", "val_loss"])]) if records else None
    return body + (m.figure(uri, "recovery fine-tuning") if uri else ""), 1 + bool(uri)


# -- dataset distillation --

def _distill_data(stage: StageView) -> tuple[str, int]:
    r = stage.report
    per_source = r.get("per_source") or {}
    if not per_source:
        return "<p>the stage did not finish: no counts</p>", 0
    names = list(per_source)
    fig, (a, b) = grid(2, 2)
    for ax, key, title in ((a, "docs", "documents per source"), (b, "chars", "characters per source")):
        y = list(range(len(names)))[::-1]
        ax.barh([v + 0.2 for v in y], [per_source[n][f"{key}_in"] for n in names], height=0.4, label="in")
        ax.barh([v - 0.2 for v in y], [per_source[n][f"{key}_kept"] for n in names], height=0.4, label="kept")
        ax.set_yticks(y, names, fontsize=7)
        ax.legend(fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    body = m.figure(data_uri(fig), f"{r.get('method')}: what each source gave and kept")
    rows = [[n, v["docs_in"], v["docs_kept"], v["chars_in"], v["chars_kept"]] for n, v in per_source.items()]
    body += m.table(rows, ["source", "documents in", "kept", "characters in", "kept"])
    scores = {k: v for k, v in (r.get("scores") or {}).items() if v}
    if scores:
        body += m.h3("scores (dsir: log importance weight; perplexity: mean token loss; random: the noise)")
        body += m.table([[k, v["min"], v["median"], v["max"]] for k, v in scores.items()], ["documents", "min", "median",
                                                                                           "max"])
    return body, 1


# -- evaluation --

def _eval(stage: StageView) -> tuple[str, int]:
    r = stage.report
    results, tasks = r.get("results") or {}, r.get("tasks") or {}
    if not results:
        return "<p>the stage did not finish: no results</p>", 0
    models = list(results)
    pct = f"{r.get('confidence', 0.95):.0%}"
    metrics = {t: [k for k in results[models[0]][t] if k != "per_class"] for t in tasks}
    fig, axes = grid(len(tasks), 3)
    for ax, (t, info) in zip(axes, tasks.items(), strict=True):
        key = metrics[t][0] if info["kind"] != "multiple_choice" else "acc_norm"
        cells = [results[n][t][key] for n in models]
        y = list(range(len(models)))[::-1]
        err = [[c["value"] - c["ci"][0] if c.get("ci") else 0 for c in cells],
               [c["ci"][1] - c["value"] if c.get("ci") else 0 for c in cells]]
        ax.barh(y, [c["value"] for c in cells], xerr=err, color="C0", capsize=3)
        ax.set_yticks(y, models, fontsize=7)
        ax.set_title(f"{t}: {key} ({pct} interval)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    body = m.figure(data_uri(fig), f"the first metric of each task per model, with its {pct} interval")
    for t, info in tasks.items():
        rows = [[n, *[_interval(results[n][t][k]) for k in metrics[t]]] for n in models]
        rejected = ", ".join(f"{k} {v}" for k, v in info["rejected"].items())
        body += m.h3(f"{t} ({info['kind']}, {info['records']} records{'; rejected: ' + rejected if rejected else ''})")
        body += m.table(rows, ["model", *[f"{k} [{pct}]" for k in metrics[t]]])
    return body, 1


def _interval(cell: dict) -> str:
    v, ci = cell["value"], cell.get("ci")
    return f"{v:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


# -- training stages --

def _steps(stage: StageView, x: str) -> list[dict]:
    return [r for r in stage.records if x in r]


def _pretrain(stage: StageView) -> tuple[str, int]:
    records = _steps(stage, "step")
    starts = [r for r in stage.records if r.get("event") == "workers_started"]
    every = (stage.config.get("checkpoint") or {}).get("every")
    last = max((r["step"] for r in records), default=0)
    checkpoints = list(range(every, last + 1, every)) if every else []
    marks = Marks(checkpoints if len(checkpoints) <= MAX_MARKS else [], [r["from_step"] for r in starts[1:]])
    sources = {k for r in records for k in r if k.startswith("loss/")}
    per_source = ["loss/*"] if len(sources) > 1 else []  # one source's loss is the loss
    panels = [Panel("loss (train, validation, per source)" if per_source else "loss (train, validation)",
                    ["loss", "val_loss", *per_source]),
              Panel("learning rate", ["lr"]), Panel("grad norm", ["grad_norm"], log=True),
              Panel("tokens/s", ["tokens_per_s"]), Panel("MFU", ["mfu"]),
              Panel("workers", ["world_size"], step=True), Panel("mixing weights", ["weight/*"]),
              Panel("eval tasks (eval_tasks)", ["task/*"])]
    uri = panels_figure(records, "step", panels, marks)
    caption = ("pretraining over steps; dotted: checkpoints, dashed red: restarts of the workers"
               if marks.restarts else "pretraining over steps; dotted: checkpoints")
    body = m.figure(uri, caption) if uri else "<p>no steps logged</p>"
    if starts:
        body += m.h3("worker group starts") + m.table(
            [[_when(r["time"]), r["from_step"], r["world_size"]] for r in starts], ["at", "from step", "workers"])
    body += _memory(stage.report)
    if not any("mfu" in r and r["mfu"] is not None for r in records):
        body += "<p>MFU: not measured (no known peak FLOP/s for this device; CPU runs have none)</p>"
    return body, int(uri is not None)


def _memory(report: dict) -> str:
    mem = report.get("memory") or {}
    if not mem.get("peak_bytes_per_rank"):
        return ""
    rows = [[rank, peak / 2**20, init / 2**20] for rank, (peak, init) in
            enumerate(zip(mem["peak_bytes_per_rank"], mem.get("init_bytes_per_rank") or [0] * 99, strict=False))]
    return m.h3(f"memory per rank (MiB; {mem.get('measure', '')})") + m.table(rows, ["rank", "peak", "model in place"])


def _evaluation(report: dict) -> str:
    e = report.get("eval") or {}
    flat = {}
    for k, v in e.items():
        if k == "examples":
            continue
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    body = m.h3("evaluation") + m.kv(flat) if flat else ""
    examples = e.get("examples") or []
    if examples:
        cols = [c for c in ("prompt", "expected", "before", "after", "answer") if any(c in x for x in examples)]
        body += m.h3("sample generations: the input model (before) and the trained one (after)") + m.table(
            [[x.get(c, "") for c in cols] for x in examples], cols, cls="samples")
    return body


def _hf(stage: StageView) -> tuple[str, int]:
    records = _steps(stage, "step")
    panels = auto_panels(records, "step", [Panel("loss", ["loss", "eval_loss"]),
                                           Panel("learning rate", ["learning_rate"]),
                                           Panel("grad norm", ["grad_norm"], log=True),
                                           Panel("eval tasks (eval_tasks)", ["task/*"])], HF_SKIP)
    uri = panels_figure(records, "step", panels)
    body = m.figure(uri, f"{stage.kind} training over steps (eval_: held-out records)") if uri else "<p>no steps logged</p>"
    return body + _evaluation(stage.report) + _memory(stage.report), int(uri is not None)


def _rl(stage: StageView) -> tuple[str, int]:
    records = _steps(stage, "iteration")
    panels = auto_panels(records, "iteration", [
        Panel("reward of the rollouts (total and parts)", ["score", "reward/*"]), Panel("KL to the reference", ["kl"]),
        Panel("loss", ["loss"]), Panel("response length (tokens)", ["response_length"]),
        Panel("fraction ending in EOS", ["eos_fraction"]),
        Panel("seconds per iteration (per worker)", ["generation_seconds", "scoring_seconds", "training_seconds"]),
        Panel("rollout tokens/s", ["rollout_tokens_per_s"])], {"seconds", "time", "attempt"})
    uri = panels_figure(records, "iteration", panels)
    body = m.figure(uri, f"{stage.kind} over iterations") if uri else "<p>no iterations logged</p>"
    return body + _evaluation(stage.report) + _memory(stage.report), int(uri is not None)


def _search(stage: StageView) -> tuple[str, int]:
    r = stage.report
    trials = r["trials"]
    records = {t["id"]: read_jsonl(child(stage.dir, "trials", t["id"], "metrics.jsonl")) for t in trials}
    fig, axes = grid(2, 2)
    tune_trials.draw(axes[0], trials, records, r["metric"])
    tune_trials.draw(axes[1], trials, records, tune_trials.lr_key(records))
    for ax in axes:
        ax.set_title(f"{ax.get_ylabel()} of every trial (dotted: an exploit)", fontsize=9)
    body = m.figure(data_uri(fig), "each trial over its steps; after an exploit its line continues from the donor")
    keys = sorted({k for t in trials for k in t["config"]})
    rows = []
    for t in trials:
        status = "error" if t.get("error") else "stopped early" if t.get("stopped_early") else "completed"
        lineage = "; ".join(f"step {e['step']} <- {e['donor']}" for e in t["exploits"])
        rows.append([t["id"], status, t.get("step"), t.get("final"), t.get("best"),
                     *[t["config"].get(k) for k in keys], lineage])
    body += m.h3(f"trials ({r.get('scheduler')}, {r.get('search')}; best: {r['best']['id']})") + m.table(
        rows, ["trial", "status", "step", f"final {r['metric']}", f"best {r['metric']}", *keys, "lineage (exploits)"])
    return body, 1
