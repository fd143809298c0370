"""The data stage on Ray Data: read -> quarantine -> exact dedup -> near dedup -> tokenizer -> mix -> pack.

Outputs (in the stage dir, a path or URI: Ray Data and the packing tasks write there from any node):
  rejects/          Parquet: id, source, location, reject_reason, raw (prefix) of every bad record
  kept/             Parquet: id, source, text (normalized), meta (other fields as JSON) of surviving docs
  clusters.parquet  Parquet dir: id, source, cluster_id for every doc that survived exact dedup
  pairs.parquet     the near-duplicate pairs found: id_a, id_b, estimated Jaccard (null if not verified)
  tokenizer/        HF tokenizer dir (AutoTokenizer.from_pretrained loads it)
  packed/           index.json + token/position shards (see lmfleet.data.packing)
  report.json       counts per step and source, seconds per step
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmfleet.data import dedup, mixing, packing
from lmfleet.data.config import DataConfig
from lmfleet.data.read import (
    ROW_SCHEMA,
    byte_ranges,
    check_hf_split,
    count_newlines,
    expand_paths,
    first_lines,
    named_paths,
    newline_spans,
    read_file,
)
from lmfleet.data.tokenizer import check_tokenizer_dir, tokenizer_info, train_tokenizer
from lmfleet.errors import InputError
from lmfleet.inputs import Input
from lmfleet.outputs import listdir
from lmfleet.uri import FileRef, compression, filesystem, is_uri

OUTPUT_COLUMNS = ["id", "source", "text", "meta"]


def source_files(cfg: DataConfig) -> dict[str, list[FileRef]]:
    """Every input file of each source; InputError for a path or URI that is missing or unreadable."""
    files = {src.name: expand_paths(src) for src in cfg.sources}
    for src in cfg.sources:
        if src.format == "hf_dataset":
            for ref in files[src.name]:
                check_hf_split(src, ref.path)
    return files


def check_inputs(cfg: DataConfig, upstream: set[str] = frozenset(), run_dir: Path | None = None) -> list[Input]:
    """Every source path exists and is readable, and a reused tokenizer dir has a tokenizer."""
    files = source_files(cfg)
    inputs = [Input(f"sources.{src.name}", tuple(named_paths(src)), tuple(files[src.name])) for src in cfg.sources]
    if cfg.tokenizer.path is not None:
        check_tokenizer_dir(cfg.tokenizer.path)
        inputs.append(Input("tokenizer.path", (Path(cfg.tokenizer.path),)))
    return inputs


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _sum_by(ds, key: str, value=None) -> dict:
    """Per value of column `key`: row counts, or sums of `value(row_text)`. Summed per block and then on
    the driver, with no shuffle."""

    def partial(table: pa.Table) -> pa.Table:
        sums: Counter = Counter()
        keys = table[key].to_pylist()
        texts = table["text"].to_pylist() if value else [None] * len(keys)
        for k, t in zip(keys, texts, strict=True):
            sums[k] += value(t) if value else 1
        return pa.table({"key": list(sums), "n": list(sums.values())})

    out: Counter = Counter()
    for row in ds.map_batches(partial, batch_format="pyarrow", batch_size=None).iter_rows():
        out[row["key"]] += row["n"]
    return dict(out)


def _read_tasks(cfg: DataConfig, files: dict[str, list[FileRef]]) -> tuple[list[dict], dict]:
    """One read task per file, or per byte range of an uncompressed JSONL file over read.split_bytes (its
    ranges' first line numbers from a newline count of each range, run as Ray tasks: about 1 GB/s a core,
    against ~50 MB/s for parsing). Also what the report says of splitting."""
    import ray

    split = cfg.read.split_bytes
    counter = ray.remote(num_cpus=1)(count_newlines)
    tasks, counts, unsplit = [], [], []
    for i, src in enumerate(cfg.sources):
        for ref in files[src.name]:
            if ref.size == 0:
                continue
            task = {"source": src.model_dump_json(), "source_index": i, "path": ref.path, "relpath": ref.rel}
            codec = compression(ref.path)
            if src.format != "jsonl" or not split or ref.size <= split:
                tasks.append(task)
            elif codec:
                unsplit.append({"file": ref.path, "bytes": ref.size,
                                "why": f"{codec} streams cannot be read from an offset"})
                tasks.append(task)
            else:
                ranges = byte_ranges(ref.size, split)
                group = [{**task, "start": a, "end": b} for a, b in ranges]
                counts.append((group, [counter.remote(ref.path, a, b) for a, b in newline_spans(ranges)]))
                tasks.extend(group)
    for group, refs in counts:
        for task, first in zip(group, first_lines([(t["start"], t["end"]) for t in group], ray.get(refs)), strict=True):
            task["first_line"] = first
    return tasks, {"tasks": len(tasks), "split_files": len(counts), "split_bytes": split,
                   "unsplittable": unsplit}


def _read_batch(table: pa.Table, norm, filt) -> pa.Table:
    out = [t for task in table.to_pylist() for t in read_file(task, norm, filt)]
    return pa.concat_tables([ROW_SCHEMA.empty_table(), *out])


def _write_parquet(ds, path: Path | str, columns: list[str]) -> None:
    """Ray Data writes no file for an empty dataset; readers still expect a dir with the schema (that of
    ROW_SCHEMA's `columns`: an empty dataset may have none of its own). `path`: a path or URI."""
    ds = ds.select_columns(columns)
    filesys, inner = filesystem(str(path), "output_dir")
    ds.write_parquet(inner, filesystem=filesys)
    if not any(name.endswith(".parquet") for name in listdir(path)):
        schema = ds.schema()
        schema = schema.base_schema if schema is not None else pa.schema(
            [ROW_SCHEMA.field(c) if c in ROW_SCHEMA.names else pa.field(c, pa.string()) for c in columns])
        filesys.create_dir(inner)
        pq.write_table(schema.empty_table(), f"{inner}/empty.parquet", filesystem=filesys)


def _is_reject(table: pa.Table, want: bool) -> pa.Table:
    return table.filter(pc.is_valid(table["reject_reason"]) if want else pc.is_null(table["reject_reason"]))


def run_data_stage(cfg: DataConfig, ctx) -> dict:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # deterministic outputs
    out = ctx.out_dir  # the driver's files; Ray Data and the packing tasks write to ctx.out
    cpus = _cluster_cpus()
    report: dict = {"outputs": {}}

    with ctx.step("read"):
        files = source_files(cfg)
        # Empty files hold no record: counted, not read.
        empty = [ref.path for src in cfg.sources for ref in files[src.name] if ref.size == 0]
        if len(empty) == sum(map(len, files.values())):
            raise InputError(f"every input file is empty: {', '.join(sorted(empty))}")
        tasks, report["read"] = _read_tasks(cfg, files)
        records = (
            ray.data.from_items(tasks, override_num_blocks=min(len(tasks), 4 * cpus))
            .map_batches(_read_batch, batch_size=1, batch_format="pyarrow",
                         fn_kwargs={"norm": cfg.normalize, "filt": cfg.filter})
            .materialize()
        )
        rejects = records.map_batches(_is_reject, batch_format="pyarrow", fn_kwargs={"want": True})
        _write_parquet(rejects, ctx.uri("rejects"), ["id", "source", "location", "reject_reason", "raw"])
        reasons = _sum_by(rejects, "reject_reason")
        docs_in_by_source = _sum_by(records, "source")
        valid = records.map_batches(_is_reject, batch_format="pyarrow", fn_kwargs={"want": False}).drop_columns(
            ["reject_reason", "raw"]
        ).materialize()
        n_in, n_valid = sum(docs_in_by_source.values()), valid.count()
        if n_valid == 0:
            raise InputError(f"no valid documents among {n_in} records (rejects: {dict(reasons)}; see "
                             f"{ctx.uri('rejects')}); check text_field and the filter settings")
        report.update(files=sum(map(len, files.values())), empty_files=len(empty), docs_in=n_in, rejected=n_in - n_valid,
                      rejects=dict(sorted(reasons.items())), valid_docs=n_valid)
        report["outputs"]["rejects"] = ctx.uri("rejects")

    partitions = max(cpus, math.ceil((valid.size_bytes() or 1) / 128e6))
    with ctx.step("exact_dedup"):
        unique = dedup.exact_dedup(valid, partitions).materialize() if cfg.dedup.exact else valid
        n_unique = unique.count()
        report["exact_duplicates_removed"] = n_valid - n_unique

    with ctx.step("near_dedup"):
        params = dedup.LshParams.from_config(cfg.dedup, ctx.seed) if cfg.dedup.near else None
        edges = dedup.candidate_edges(unique, params, partitions) if params else dedup.EDGE_SCHEMA.empty_table()
        clusters = dedup.clusters_from_edges(edges)
        pq.write_table(edges.select(["u_id", "v_id", "similarity"]).rename_columns(["id_a", "id_b", "similarity"]),
                       out / "pairs.parquet")
        clustered = dedup.with_cluster_ids(unique, clusters)
        _write_parquet(clustered, ctx.uri("clusters.parquet"), ["id", "source", "cluster_id"])
        kept = dedup.drop_removed(clustered, clusters).select_columns(OUTPUT_COLUMNS + ["uid"]).materialize()
        _write_parquet(kept, ctx.uri("kept"), OUTPUT_COLUMNS)
        report.update(
            near_duplicates_removed=len(clusters.removed_uids),
            clusters=clusters.num_clusters,
            docs_kept=kept.count(),
            lsh=None if params is None else {
                "num_perm": params.num_perm, "ngram": params.ngram, "bands": params.bands, "rows": params.rows,
                "threshold": params.threshold, "verified_edges": len(edges)},
        )
        report["outputs"].update(kept=ctx.uri("kept"), clusters=ctx.uri("clusters.parquet"),
                                 pairs=ctx.uri("pairs.parquet"))

    kept_chars = _sum_by(kept, "source", len)
    kept_by_source = _sum_by(kept, "source")
    report["per_source"] = {
        s.name: {"docs_in": docs_in_by_source.get(s.name, 0), "docs_kept": kept_by_source.get(s.name, 0),
                 "chars_kept": kept_chars.get(s.name, 0)} for s in cfg.sources
    }

    with ctx.step("tokenizer"):
        tok_at = ctx.uri("tokenizer")  # where the packing tasks read it
        if cfg.tokenizer.path is not None:
            tok_dir = Path(cfg.tokenizer.path).resolve()
            if is_uri(ctx.out):  # the cluster's nodes do not see this machine's folder: the stage carries a copy
                shutil.copytree(tok_dir, out / "tokenizer")
                ctx.publish("tokenizer")
            else:
                tok_at = str(tok_dir)
        else:
            tok_dir = out / "tokenizer"
            limit = cfg.tokenizer.max_train_docs
            sample = kept if limit is None else kept.map_batches(
                _sample_rows, batch_format="pyarrow", fn_kwargs={"fraction": limit / max(report["docs_kept"], 1),
                                                                 "seed": ctx.seed})
            texts = (t for b in sample.iter_batches(batch_size=1000, batch_format="pyarrow") for t in b["text"].to_pylist())
            report["tokenizer_training"] = train_tokenizer(texts, cfg.tokenizer, tok_dir)
            ctx.publish("tokenizer")
        tok = {**tokenizer_info(tok_dir, cfg.tokenizer), "path": tok_at}
        report["tokenizer"] = tok
        report["outputs"]["tokenizer"] = tok_at

    if cfg.pack is not None:
        with ctx.step("mix_and_pack"):
            report["mixing"] = plan = mixing.mixing_rates({k: kept_chars.get(k, 0) for k in
                                                            (s.name for s in cfg.sources)}, cfg.mixing)
            report["packing"] = _mix_and_pack(kept, cfg, ctx.seed, tok, plan, ctx.uri("packed"), out / "packed", cpus)
            report["outputs"]["packed"] = ctx.uri("packed")

    report["summary"] = _summary(report)
    (out / "report.json").write_text(json.dumps({**report, "seconds": ctx.seconds}, indent=2), encoding="utf-8")
    ctx.metrics.write(ctx.name, **{k: report[k] for k in ("docs_in", "rejected", "exact_duplicates_removed",
                                                           "near_duplicates_removed", "docs_kept")})
    return report


def _sample_rows(table: pa.Table, fraction: float, seed: int) -> pa.Table:
    return table.filter(pa.array(mixing.unit_hash(table["uid"].to_numpy(), seed, epoch=-3) < fraction))


def _with_part(table: pa.Table, parts: dict[str, int], seed: int) -> pa.Table:
    h = mixing.unit_hash(table["uid"].to_numpy(), seed, epoch=-4)
    n = np.array([parts[f"{s}/{sp}"] for s, sp in zip(table["source"].to_pylist(), table["split"].to_pylist(), strict=True)])
    return table.append_column("part", pa.array((h * n).astype(np.int64)))


def _mix_and_pack(kept, cfg: DataConfig, seed: int, tok: dict, plan: dict, out: str, index_dir: Path,
                  cpus: int) -> dict:
    """Shards are written to `out` (a path or URI) by the packing tasks; index.json into `index_dir` (the
    driver's copy of `out`)."""
    sample_len = cfg.pack.seq_len + 1
    rates = {k: v["rate"] for k, v in plan.items()}
    mixed = kept.map_batches(mixing.apply_rates, batch_format="pyarrow",
                             fn_kwargs={"rates": rates, "seed": seed, "val_fraction": cfg.pack.val_fraction})
    # Shards per (source, split) from an estimate of its tokens (~4 chars per token): about
    # samples_per_shard samples each, but never so many that padded shard tails cost > 0.5%.
    parts = {}
    for name, p in plan.items():
        for split, share in (("train", p["rate"] * (1 - cfg.pack.val_fraction)), ("val", cfg.pack.val_fraction)):
            est_samples = p["chars"] * share / 4 / sample_len
            parts[f"{name}/{split}"] = int(max(1, min(math.ceil(est_samples / cfg.pack.samples_per_shard),
                                                      est_samples // 200)))
    shards = (
        mixed.map_batches(_with_part, batch_format="pyarrow", fn_kwargs={"parts": parts, "seed": seed})
        .groupby(["split", "source", "part"], num_partitions=max(1, min(len(parts) * 2, 4 * cpus)))
        .map_groups(packing.pack_group, batch_format="pyarrow", fn_kwargs={
            "tokenizer_dir": tok["path"], "out_dir": str(out), "sample_len": sample_len, "eos_id": tok["eos_id"],
            "pad_id": tok["pad_id"], "vocab_size": tok["vocab_size"], "seed": seed})
        .take_all()
    )
    index_dir.mkdir(parents=True, exist_ok=True)
    index = packing.write_index(index_dir, shards, {
        "sample_len": sample_len, "seq_len": cfg.pack.seq_len, "eos_id": tok["eos_id"], "pad_id": tok["pad_id"],
        "vocab_size": tok["vocab_size"], "tokenizer": _relative(tok["path"], out),
        "tokens_dtype": str(packing.token_dtype(tok["vocab_size"])),
    })
    real = sum(s["real_tokens"] for s in shards)
    total = real + sum(s["pad_tokens"] for s in shards)
    per_source: dict = {}
    for s in shards:
        d = per_source.setdefault(s["source"], {"train_tokens": 0, "val_tokens": 0, "docs": 0})
        d[f"{s['split']}_tokens"] += s["real_tokens"]
        d["docs"] += s["docs"]
    return {
        "seq_len": cfg.pack.seq_len, "samples": {k: v["num_samples"] for k, v in index["splits"].items()},
        "real_tokens": real, "pad_tokens": total - real, "efficiency": round(real / total, 5) if total else 0.0,
        "shards": len(shards), "per_source": per_source,
    }


def _relative(path: str, start: str) -> str:
    """`path` relative to the folder `start` (both paths, or both URIs of one bucket)."""
    if is_uri(start):
        return posixpath.relpath(path.split("://", 1)[1], start.split("://", 1)[1])
    return os.path.relpath(path, start)


def _summary(r: dict) -> list[str]:
    rejects = ", ".join(f"{k} {v}" for k, v in r["rejects"].items()) or "none"
    lines = [
        f"documents read: {r['docs_in']} from {r['files']} files"
        + (f" ({r['empty_files']} empty)" if r["empty_files"] else "") + f"; rejected {r['rejected']} ({rejects})",
        *([f"read: {r['read']['split_files']} files over read.split_bytes split into byte ranges; "
            f"{r['read']['tasks']} read tasks"] if r["read"]["split_files"] else []),
        *([f"read: {len(r['read']['unsplittable'])} compressed files over read.split_bytes read by one task each "
           "(a compressed stream cannot be read from an offset)"] if r["read"]["unsplittable"] else []),
        f"exact duplicates removed: {r['exact_duplicates_removed']}",
        f"near duplicates removed: {r['near_duplicates_removed']} in {r['clusters']} clusters"
        + (f" (MinHash {r['lsh']['num_perm']} perms, {r['lsh']['bands']}x{r['lsh']['rows']} bands, "
           f"threshold {r['lsh']['threshold']})" if r.get("lsh") else ""),
        f"documents kept: {r['docs_kept']}",
        f"tokenizer: vocab {r['tokenizer']['vocab_size']} at {r['tokenizer']['path']}",
    ]
    if "packing" in r:
        p = r["packing"]
        lines.append(f"packed: {p['samples']} samples of {p['seq_len']}+1 tokens, {p['real_tokens']} real tokens, "
                     f"efficiency {100 * p['efficiency']:.2f}%")
    return lines
