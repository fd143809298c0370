"""Stage kind `distill_data`: a smaller training set chosen from a data stage's kept documents, packed with that
stage's tokenizer into a dir pretrain reads as it reads a data stage (packed/index.json and shards).

Methods (`method`):
- `dsir`: importance resampling toward the reference texts of `target` (lmfleet.data.dsir; Xie et al. 2023):
  the documents most like the target under hashed n-gram models, sampled in proportion to the importance
  weights, so the subset follows the target distribution rather than its mode;
- `perplexity`: the documents a proxy model trained on reference text finds likeliest (lowest mean token loss
  per document; CCNet's perplexity filter, Wenzek et al. 2020; reference-model pruning, Marion et al. 2023);
- `random`: a seeded uniform sample, the baseline every selection should beat.
Each document's key (dsir: log weight + Gumbel noise; perplexity: minus its loss; random: the noise) is
computed on Ray Data; the k largest keys win (ties: the smaller uid). The noise is a seeded hash of the
document's uid, so a selection depends on the seed only, not on blocks or workers.

Outputs (in the stage dir, a path or URI):
  kept/         Parquet: the chosen documents (id, source, text, meta, uid) and their `score`
  packed/       index.json + shards, as the data stage writes them (the input's tokenizer)
  report.json   documents and characters in / kept per source, the keys' range kept and left, packing
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import fs

from lmfleet import outputs, uri
from lmfleet.data import dsir
from lmfleet.data.config import DistillDataConfig, FilterConfig, NormalizeConfig, PackConfig
from lmfleet.data.shuffle import ready, resolve
from lmfleet.errors import InputError
from lmfleet.inputs import Input


def stage_dir(ref: str, run_dir) -> str:
    """The input data stage's dir: a stage of this run or a path / URI."""
    if run_dir is not None and "/" not in ref and not uri.is_uri(ref):
        return str(outputs.child(run_dir, ref))
    return ref if uri.is_uri(ref) else str(Path(ref).resolve())


def check_inputs(cfg: DistillDataConfig, upstream: set[str] = frozenset(), run_dir=None) -> list[Input]:
    from lmfleet.data.read import expand_paths, named_paths
    from lmfleet.model.hf_config import checkpoint_model_config, input_model

    where = stage_dir(cfg.data, run_dir)
    if cfg.data not in upstream and not (uri.info(uri.join(where, "report.json"), "distill_data.data").is_file
                                         and uri.info(uri.join(where, "kept")).type == fs.FileType.Directory):
        raise InputError(f"distill_data.data {cfg.data!r}: no data stage output at {where} (expected its kept/ and "
                         "report.json)")
    inputs = [Input("data", (where if uri.is_uri(where) else Path(where),))]
    if cfg.target is not None:
        inputs.append(Input("target", tuple(named_paths(cfg.target)), tuple(expand_paths(cfg.target))))
    if cfg.proxy is not None:
        location = input_model(cfg.proxy, run_dir)
        if cfg.proxy not in upstream:
            checkpoint_model_config(location, "distill_data.proxy")
        inputs.append(Input("proxy", (location if uri.is_uri(location) else Path(location),)))
    return inputs


def target_texts(cfg: DistillDataConfig) -> list[str]:
    """The reference texts: the target source read as the data stage reads (normalized; rejects left out)."""
    from lmfleet.data.read import expand_paths, read_file

    texts = []
    for ref in expand_paths(cfg.target):
        task = {"source": cfg.target.model_dump_json(), "source_index": 0, "path": ref.path, "relpath": ref.rel}
        for table in read_file(task, NormalizeConfig(), FilterConfig()):
            texts += [t for t in table["text"].to_pylist() if t]
    if not texts:
        raise InputError(f"distill_data.target: no text read from {cfg.target.paths}")
    return texts


def _bucket_counts(table: pa.Table, buckets: int, ngrams: tuple[int, ...], seed: int) -> pa.Table:
    counts = dsir.bucket_counts(table["text"].to_pylist(), buckets, ngrams, seed)
    return pa.table({"counts": [counts.tolist()]})


def _keys(table: pa.Table, method: str, seed: int, log_ratio=None, ngrams=(), scorer=None) -> pa.Table:
    """uid, source, chars and the selection key (and score) of each document."""
    log_ratio = resolve(log_ratio)
    uids = table["uid"].to_numpy()
    texts = table["text"].to_pylist()
    noise = dsir.gumbel(uids, seed)
    if method == "dsir":
        score = dsir.log_weights(texts, log_ratio, ngrams, seed)
        key = score + noise
    elif method == "perplexity":
        score = scorer(texts)
        key = -score
    else:
        score, key = noise, noise
    return pa.table({"uid": pa.array(uids, pa.uint64()), "source": table["source"],
                     "chars": pa.array([len(t) for t in texts], pa.int64()), "score": score, "key": key})


class ProxyLoss:
    """A Ray Data actor: the proxy model's mean token loss on each document (rolling windows: every token once)."""

    def __init__(self, location: str, max_length: int):
        import torch

        from lmfleet.eval.lm import EvalModel

        torch.set_num_threads(1)
        self.model = EvalModel.load(uri.local_copy(location, "distill_data.proxy"), max_length, 8, torch.device("cpu"))

    def __call__(self, table: pa.Table, seed: int) -> pa.Table:
        def scorer(texts):
            return np.array([-lp / max(n, 1) for lp, n in self.model.rolling_loglikelihood(texts)])

        return _keys(table, "perplexity", seed, scorer=scorer)


def run_distill_data_stage(cfg: DistillDataConfig, ctx) -> dict:
    import ray

    from lmfleet.data.stage import _cluster_cpus, _write_parquet, mix_and_pack

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    check_inputs(cfg, run_dir=ctx.run_dir)
    where = stage_dir(cfg.data, ctx.run_dir)
    upstream = json.loads(uri.read_bytes(uri.join(where, "report.json")).decode("utf-8"))
    cpus = _cluster_cpus()
    with ctx.step("read") as said:
        docs = ray.data.read_parquet(uri.join(where, "kept"))
        if "uid" not in docs.schema().names:
            raise InputError(f"distill_data.data {where}/kept: no uid column (written by the data stage since "
                             "2026-12-02): run that data stage again")
        docs = docs.materialize()
        n = docs.count()
        if n == 0:
            raise InputError(f"distill_data.data {where}/kept: no documents")
        said.append(f"{n:,} documents")
    report: dict = {"method": cfg.method, "docs_in": n, "input": where}
    with ctx.step("score") as said:
        if cfg.method == "dsir":
            d = cfg.dsir
            texts = target_texts(cfg)
            target = dsir.bucket_counts(texts, d.buckets, tuple(d.ngrams), ctx.seed)
            raw = sum(np.asarray(c, dtype=np.int64) for c in docs.map_batches(
                _bucket_counts, batch_format="pyarrow", fn_kwargs={"buckets": d.buckets, "ngrams": tuple(d.ngrams),
                                                                    "seed": ctx.seed}).to_pandas()["counts"])
            log_ratio = dsir.log_frequencies(target, d.smoothing) - dsir.log_frequencies(raw, d.smoothing)
            keys = docs.map_batches(_keys, batch_format="pyarrow", fn_kwargs={
                "method": "dsir", "seed": ctx.seed, "log_ratio": log_ratio, "ngrams": tuple(d.ngrams)})
            report["dsir"] = {**d.model_dump(), "target_docs": len(texts), "target_ngrams": int(target.sum()),
                              "raw_ngrams": int(raw.sum())}
        elif cfg.method == "perplexity":
            from lmfleet.model.hf_config import input_model, loss_model

            location = input_model(cfg.proxy, ctx.run_dir)
            proxy = loss_model(location, upstream["tokenizer"]["vocab_size"], "distill_data.proxy", "scoring documents")
            keys = docs.map_batches(ProxyLoss, batch_format="pyarrow", batch_size=64, fn_kwargs={"seed": ctx.seed},
                                    fn_constructor_kwargs={"location": location, "max_length": proxy.max_seq_len},
                                    compute=ray.data.ActorPoolStrategy(size=cpus), num_cpus=1)
            report["proxy"] = location
        else:
            keys = docs.map_batches(_keys, batch_format="pyarrow", fn_kwargs={"method": "random", "seed": ctx.seed})
        table = pa.concat_tables(ray.get(keys.to_arrow_refs()))
        uids, key, chars = table["uid"].to_numpy(), table["key"].to_numpy(), table["chars"].to_numpy()
        if cfg.docs is not None or cfg.unit == "docs":
            k = min(n, cfg.docs) if cfg.docs is not None else max(1, round(cfg.fraction * n))
            chosen = dsir.top_k(key, uids, k)
            report["budget"] = {"unit": "docs", "target": k}
        else:
            budget = cfg.fraction * float(chars.sum())
            chosen = dsir.top_size(key, uids, chars, budget)
            report["budget"] = {"unit": "chars", "target": round(budget)}
        report["docs_kept"] = len(chosen)
        said.append(f"{cfg.method}: {len(chosen):,} of {n:,} documents kept")
    mask = np.isin(uids, chosen)
    score = table["score"].to_numpy()
    report["scores"] = {part: _quantiles(score[m]) for part, m in (("kept", mask), ("left", ~mask))}
    report["per_source"] = _per_source(table, mask)
    order = np.argsort(uids)
    refs = {"chosen": ray.put(chosen), "uids": ray.put(uids[order]), "scores": ray.put(score[order])}
    ready(*refs.values())
    kept = docs.map_batches(_with_score, batch_format="pyarrow", fn_kwargs=refs).materialize()
    _write_parquet(kept, ctx.uri("kept"), ["id", "source", "text", "meta", "uid", "score"])
    with ctx.step("pack") as said:
        tok = upstream["tokenizer"]
        index = json.loads(uri.read_bytes(uri.join(where, "packed", "index.json")).decode("utf-8")) if uri.info(
            uri.join(where, "packed", "index.json")).is_file else {}
        pack = cfg.pack or PackConfig(seq_len=index.get("seq_len", PackConfig().seq_len))
        plan = {s: {"rate": 1.0, "chars": v["chars_kept"]} for s, v in report["per_source"].items()}
        report["packing"] = mix_and_pack(kept, pack, ctx.seed, tok, plan, ctx.uri("packed"), ctx.out_dir / "packed", cpus)
        said.append(f"{sum(report['packing']['samples'].values()):,} samples of {pack.seq_len}+1 tokens")
    report["outputs"] = {"kept": ctx.uri("kept"), "packed": ctx.uri("packed"), "tokenizer": tok["path"]}
    report["summary"] = _summary(cfg, report)
    return ctx.write_report(report)


def _with_score(table: pa.Table, chosen: np.ndarray, uids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """The chosen documents of a block with their score (`uids` sorted, `scores` in their order)."""
    chosen, uids, scores = resolve(chosen), resolve(uids), resolve(scores)
    table = table.filter(pa.array(np.isin(table["uid"].to_numpy(), chosen)))
    return table.append_column("score", pa.array(scores[np.searchsorted(uids, table["uid"].to_numpy())]))


def _quantiles(x: np.ndarray) -> dict | None:
    if not len(x):
        return None
    q = np.quantile(x, [0, 0.5, 1])
    return {"min": float(q[0]), "median": float(q[1]), "max": float(q[2])}


def _per_source(table: pa.Table, mask: np.ndarray) -> dict:
    sources = np.array(table["source"].to_pylist())
    chars = table["chars"].to_numpy()
    return {s: {"docs_in": int((sources == s).sum()), "docs_kept": int(((sources == s) & mask).sum()),
                "chars_in": int(chars[sources == s].sum()), "chars_kept": int(chars[(sources == s) & mask].sum())}
            for s in sorted(set(sources.tolist()))}


def _summary(cfg: DistillDataConfig, r: dict) -> list[str]:
    method = {"dsir": "importance resampling toward the target (DSIR)", "perplexity": f"lowest loss under {cfg.proxy}",
              "random": "a seeded uniform sample"}[cfg.method]
    p = r["packing"]
    chars_in = sum(v["chars_in"] for v in r["per_source"].values())
    chars_kept = sum(v["chars_kept"] for v in r["per_source"].values())
    return [f"kept {r['docs_kept']:,} of {r['docs_in']:,} documents, {chars_kept:,} of {chars_in:,} characters "
            f"({r['budget']['unit']} budget {r['budget']['target']:,}): {method}",
            "per source (kept / in): " + ", ".join(f"{s} {v['docs_kept']}/{v['docs_in']}" for s, v in r["per_source"].items()),
            f"packed: {p['samples']} samples of {p['seq_len']}+1 tokens, {p['real_tokens']} real tokens"]

