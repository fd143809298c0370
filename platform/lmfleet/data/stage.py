"""The data stage on Ray Data: read -> quarantine -> exact dedup -> near dedup -> tokenizer -> mix -> pack.

Outputs (in the stage dir, a path or URI: Ray Data and the packing tasks write there from any node):
  rejects/          Parquet: id, source, location, reject_reason, raw (prefix) of every bad record; pii
                    (kinds found, filter.pii: drop) and contaminated_by (evaluation files matched)
  kept/             Parquet: id, source, text (normalized), meta (other fields as JSON), uid of surviving docs
  clusters.parquet  Parquet dir: id, source, cluster_id for every doc that survived exact dedup
  pairs.parquet     Parquet dir: the near-duplicate pairs found: id_a, id_b, estimated Jaccard (null if
                    not verified)
  tokenizer/        HF tokenizer dir (AutoTokenizer.from_pretrained loads it)
  packed/           index.json + token/position shards (see lmfleet.data.packing)
  report.json       counts per step and source, seconds per step
"""

from __future__ import annotations

import functools
import itertools
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

from lmfleet.data import decontaminate, dedup, mixing, packing, pii, quality
from lmfleet.data.config import DataConfig, PackConfig, SourceConfig
from lmfleet.data.read import (
    ROW_SCHEMA,
    check_hf_split,
    expand_paths,
    named_paths,
    plan_reads,
    read_file,
    with_compressions,
)
from lmfleet.data.shuffle import gather, hash_shuffle, map_blocks, resolve
from lmfleet.data.tokenizer import check_tokenizer_dir, tokenizer_info, train_tokenizer_remote
from lmfleet.errors import InputError
from lmfleet.inputs import Input
from lmfleet.outputs import listdir
from lmfleet.uri import FileRef, filesystem, is_uri

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
    if cfg.decontaminate is not None:
        src = _eval_source(cfg)
        inputs.append(Input("decontaminate.paths", tuple(named_paths(src)), tuple(_eval_files(src))))
    return inputs


def _eval_source(cfg: DataConfig) -> SourceConfig:
    """The evaluation files to decontaminate against, named as a source so they are found as inputs are."""
    return SourceConfig(name="decontaminate", format="jsonl", paths=cfg.decontaminate.paths)


def _eval_files(src: SourceConfig) -> list[FileRef]:
    return expand_paths(src, with_compressions(decontaminate.SUFFIXES))


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _tally(table: pa.Table, key: str, chars: bool, rejects: bool | None) -> Counter:
    if not table.num_rows:  # an empty block may lack columns
        return Counter()
    if rejects is not None:
        table = _is_reject(table, rejects)
    keys = table[key].to_pylist()
    if not chars:
        return Counter(keys)
    out: Counter = Counter()
    for k, n in zip(keys, pc.utf8_length(table["text"]).to_pylist(), strict=True):
        out[k] += n
    return out


def _sum_by(blocks: list, key: str, chars: bool = False, rejects: bool | None = None) -> dict:
    """Per value of column `key` of the blocks' rows (only rejects or only the others, if said): row
    counts, or the characters of their text. Summed per block by a task each, then on the driver."""
    import ray

    out: Counter = Counter()
    for part in ray.get(map_blocks(blocks, functools.partial(_tally, key=key, chars=chars, rejects=rejects))):
        out.update(part)
    return dict(out)


def _eval_ngrams(cfg: DataConfig) -> decontaminate.EvalNgrams:
    """The evaluation files' n-grams, read on the driver (they are small)."""
    return decontaminate.load(cfg.decontaminate, _eval_files(_eval_source(cfg)))


EXAMPLES = 3  # ids per reject reason in the report (`lmfleet data inspect` shows the documents)


def _first_ids(table: pa.Table) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if table.num_rows:
        rejects = _is_reject(table, True)
        for reason, doc_id in zip(rejects["reject_reason"].to_pylist(), rejects["id"].to_pylist(), strict=True):
            ids = out.setdefault(reason, [])
            if len(ids) < EXAMPLES:
                ids.append(doc_id)
    return out


def _examples(blocks: list) -> dict[str, list[str]]:
    """The first few rejected ids of each reason, in read order."""
    import ray

    out: dict[str, list[str]] = {}
    for part in ray.get(map_blocks(blocks, _first_ids)):
        for reason, ids in part.items():
            out.setdefault(reason, []).extend(ids)
    return {reason: ids[:EXAMPLES] for reason, ids in sorted(out.items())}


def _json_tally(table: pa.Table, column: str) -> Counter:
    """The sum of the column's JSON {name: count} cells, and the rows holding one under "documents"."""
    out: Counter = Counter()
    if table.num_rows:  # (an empty block may lack columns)
        for found in table[column].drop_null().to_pylist():
            out.update(json.loads(found))
            out["documents"] += 1
    return out


def _json_counts(blocks: list, column: str) -> tuple[int, Counter]:
    """(rows with a count, counts per name) of a JSON-counts column over every row."""
    import ray

    total: Counter = Counter()
    for part in ray.get(map_blocks(blocks, functools.partial(_json_tally, column=column))):
        total.update(part)
    return total.pop("documents", 0), total


def _pii_counts(blocks: list) -> dict:
    """{documents: with any match, matches: {kind: count}} over every row (masked ones and dropped ones)."""
    documents, total = _json_counts(blocks, "pii")
    return {"documents": documents, "matches": {kind: total.get(kind, 0) for kind in pii.KINDS}}


def _c4_counts(blocks: list) -> dict:
    """{documents_edited: kept documents that lost lines, lines_removed: {rule: lines}}."""
    documents, total = _json_counts(blocks, "lines_removed")
    return {"documents_edited": documents, "lines_removed": {r: total.get(r, 0) for r in quality.C4_LINE_RULES}}


def _ray_all(fn, args: list[tuple]) -> list:
    """fn(*a) for each a in args as Ray tasks (the first passes over split files: ~1 GB/s a core for
    newline counts, against ~50 MB/s for parsing)."""
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(*a) for a in args])


def _read_batch(table: pa.Table, norm, filt, evals=None) -> pa.Table:
    evals = resolve(evals)  # (a ref of decontaminate.EvalNgrams: one copy in the object store)
    out = [t for task in table.to_pylist() for t in read_file(task, norm, filt, evals)]
    return pa.concat_tables([ROW_SCHEMA.empty_table(), *out])


def _write_parquet(ds, path: Path | str, columns: list[str]) -> None:
    """Ray Data writes no file for an empty dataset; readers still expect a dir with the schema (that of
    ROW_SCHEMA's `columns`: an empty dataset may have none of its own). `path`: a path or URI."""
    ds = ds.select_columns(columns)
    filesys, inner = filesystem(str(path), "output_dir")
    ds.write_parquet(inner, filesystem=filesys)
    if not any(name.endswith(".parquet") for name in listdir(path)):
        schema = ds.schema()
        _write_empty(path, columns, schema.base_schema if schema is not None else None)


def _write_empty(path: Path | str, columns: list[str], schema: pa.Schema | None = None) -> None:
    """A Parquet dir of no rows with `schema` (default: ROW_SCHEMA's `columns`)."""
    filesys, inner = filesystem(str(path), "output_dir")
    schema = schema or pa.schema(
        [ROW_SCHEMA.field(c) if c in ROW_SCHEMA.names else pa.field(c, pa.string()) for c in columns])
    filesys.create_dir(inner)
    pq.write_table(schema.empty_table(), f"{inner}/empty.parquet", filesystem=filesys)


PAIRS_SCHEMA = pa.schema([("id_a", pa.string()), ("id_b", pa.string()), ("similarity", pa.float64())])


def _pair_rows(table: pa.Table | None) -> pa.Table | None:
    if table is None:
        return None
    return table.select(["u_id", "v_id", "similarity"]).rename_columns(PAIRS_SCHEMA.names)


def _write_table(table: pa.Table | None, path: str, schema: pa.Schema) -> None:
    filesys, inner = filesystem(path, "output_dir")
    pq.write_table(schema.empty_table() if table is None else table.cast(schema), inner, filesystem=filesys)


def _write_tables(refs: list, path: str, schema: pa.Schema) -> None:
    """The tables behind `refs` as one Parquet dir (a file each, in order, written by tasks where they
    are; an empty one if there are none): nothing passes through the driver."""
    import ray

    filesys, inner = filesystem(path, "output_dir")
    filesys.create_dir(inner)
    write = ray.remote(num_cpus=1)(_write_table)
    ray.get([write.remote(ref, f"{path.rstrip('/')}/part-{i:05d}.parquet", schema)
             for i, ref in enumerate(refs or [None])])


def _own_cluster(table: pa.Table) -> pa.Table:
    return table.append_column("cluster_id", table["id"])


def _is_reject(table: pa.Table, want: bool) -> pa.Table:
    return table.filter(pc.is_valid(table["reject_reason"]) if want else pc.is_null(table["reject_reason"]))


def run_data_stage(cfg: DataConfig, ctx) -> dict:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # deterministic outputs
    out = ctx.out_dir  # the driver's files; Ray Data and the packing tasks write to ctx.out
    cpus = _cluster_cpus()
    report: dict = {"outputs": {}}

    with ctx.step("read") as said:
        files = source_files(cfg)
        # Empty files hold no record: counted, not read.
        empty = [ref.path for src in cfg.sources for ref in files[src.name] if ref.size == 0]
        if len(empty) == sum(map(len, files.values())):
            raise InputError(f"every input file is empty: {', '.join(sorted(empty))}")
        split = cfg.read.split_for(sum(ref.size for refs in files.values() for ref in refs), cpus)
        tasks, report["read"] = plan_reads(cfg.sources, files, split, _ray_all)
        evals = None if cfg.decontaminate is None else ray.put(_eval_ngrams(cfg))
        records = (
            ray.data.from_items(tasks, override_num_blocks=min(len(tasks), 4 * cpus))
            .map_batches(_read_batch, batch_size=1, batch_format="pyarrow",
                         fn_kwargs={"norm": cfg.normalize, "filt": cfg.filter, "evals": evals})
            .materialize()
        )
        blocks = records.to_arrow_refs()
        reasons = _sum_by(blocks, "reject_reason", rejects=True)
        columns = ["id", "source", "location", "reject_reason", "raw", "pii", "contaminated_by"]
        if reasons:
            rejects = records.map_batches(_is_reject, batch_format="pyarrow", fn_kwargs={"want": True})
            _write_parquet(rejects, ctx.uri("rejects"), columns)
        else:  # a pass over every block to write nothing: ~1 s of dedup_peers' 9 s read on 2 cores
            _write_empty(ctx.uri("rejects"), columns)
        docs_in_by_source = _sum_by(blocks, "source")
        valid = records.map_batches(_is_reject, batch_format="pyarrow", fn_kwargs={"want": False}).drop_columns(
            ["reject_reason", "raw", "pii", "contaminated_by", "lines_removed"]
        ).materialize()
        n_in, n_valid = sum(docs_in_by_source.values()), valid.count()
        if n_valid == 0:
            raise InputError(f"no valid documents among {n_in} records (rejects: {dict(reasons)}; see "
                             f"{ctx.uri('rejects')}); check text_field and the filter settings")
        report.update(files=sum(map(len, files.values())), empty_files=len(empty), docs_in=n_in, rejected=n_in - n_valid,
                      rejects=dict(sorted(reasons.items())), reject_examples=_examples(blocks), valid_docs=n_valid)
        said.append(f"{n_in:,} documents, {n_in - n_valid:,} rejected")
        if cfg.filter.c4 is not None:
            report["c4"] = _c4_counts(blocks)
        if cfg.filter.pii != "off":
            report["pii"] = {"action": cfg.filter.pii, **_pii_counts(blocks)}
        if cfg.decontaminate is not None:
            by_file = _sum_by(blocks, "contaminated_by", rejects=True)
            by_file.pop(None, None)
            counts = Counter()
            for files, n in by_file.items():
                for name in json.loads(files):
                    counts[name] += n
            report["decontamination"] = {"ngram": cfg.decontaminate.ngram, "documents": reasons.get("contaminated", 0),
                                         "by_eval_file": dict(sorted(counts.items()))}
        report["outputs"]["rejects"] = ctx.uri("rejects")

    partitions = max(cpus, math.ceil((valid.size_bytes() or 1) / 128e6))
    with ctx.step("exact_dedup") as said:
        unique = dedup.exact_dedup(valid, partitions).materialize() if cfg.dedup.exact else valid
        n_unique = unique.count()
        report["exact_duplicates_removed"] = n_valid - n_unique
        said.append(f"{n_valid - n_unique:,} removed" if cfg.dedup.exact else "off")

    with ctx.step("near_dedup") as said:
        params = dedup.LshParams.from_config(cfg.dedup, ctx.seed) if cfg.dedup.near else None
        found = dedup.near_duplicates(unique, params, partitions) if params else None
        _write_tables([] if found is None else map_blocks(found.pairs, _pair_rows), str(ctx.uri("pairs.parquet")),
                      PAIRS_SCHEMA)
        if found is None:
            clustered = unique.map_batches(_own_cluster, batch_format="pyarrow")
            kept = unique
        else:
            clustered = dedup.with_cluster_ids(unique, found.members)
            kept = dedup.drop_uids(unique, found.removed)
        _write_parquet(clustered, ctx.uri("clusters.parquet"), ["id", "source", "cluster_id"])
        kept = kept.select_columns(OUTPUT_COLUMNS + ["uid"]).materialize()
        _write_parquet(kept, ctx.uri("kept"), OUTPUT_COLUMNS + ["uid"])  # uid: what distill_data re-packs by
        counts = found.counts if found else {}
        report.update(
            near_duplicates_removed=counts.get("removed", 0),
            clusters=counts.get("clusters", 0),
            cluster_sizes={str(k): v for k, v in counts.get("sizes", {}).items()},  # size -> clusters of 2 or more
            docs_kept=kept.count(),
            lsh=None if params is None else {
                "num_perm": params.num_perm, "ngram": params.ngram, "bands": params.bands, "rows": params.rows,
                "threshold": params.threshold, "verify": params.verify, "candidate_pairs": counts["candidate_pairs"],
                "verified_edges": counts["verified_pairs"], "clustering_rounds": counts["rounds"]},
        )
        report["outputs"].update(kept=ctx.uri("kept"), clusters=ctx.uri("clusters.parquet"),
                                 pairs=ctx.uri("pairs.parquet"))
        removed = f"{counts['removed']:,} removed in {counts['clusters']:,} clusters, " if found else "off, "
        said.append(f"{removed}{report['docs_kept']:,} kept")

    blocks = kept.to_arrow_refs()
    kept_chars = _sum_by(blocks, "source", chars=True)
    kept_by_source = _sum_by(blocks, "source")
    report["per_source"] = {
        s.name: {"docs_in": docs_in_by_source.get(s.name, 0), "docs_kept": kept_by_source.get(s.name, 0),
                 "chars_kept": kept_chars.get(s.name, 0)} for s in cfg.sources
    }

    with ctx.step("tokenizer") as said:
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
            sample = blocks if limit is None else kept.map_batches(
                _sample_rows, batch_format="pyarrow", fn_kwargs={"fraction": limit / max(report["docs_kept"], 1),
                                                                 "seed": ctx.seed}).to_arrow_refs()
            report["tokenizer_training"] = train_tokenizer_remote(sample, cfg.tokenizer, tok_dir)
            ctx.publish("tokenizer")
        tok = {**tokenizer_info(tok_dir, cfg.tokenizer), "path": tok_at}
        report["tokenizer"] = tok
        said.append(f"vocab {tok['vocab_size']:,}")
        report["outputs"]["tokenizer"] = tok_at

    if cfg.pack is not None:
        with ctx.step("mix_and_pack") as said:
            report["mixing"] = plan = mixing.mixing_rates({k: kept_chars.get(k, 0) for k in
                                                            (s.name for s in cfg.sources)}, cfg.mixing)
            report["packing"] = mix_and_pack(kept, cfg.pack, ctx.seed, tok, plan, ctx.uri("packed"), out / "packed",
                                             cpus)
            report["outputs"]["packed"] = ctx.uri("packed")
            said.append(f"{sum(report['packing']['samples'].values()):,} samples of {cfg.pack.seq_len}+1 tokens")

    report["summary"] = _summary(report)
    ctx.write_report(report)
    ctx.metrics.write(ctx.name, **{k: report[k] for k in ("docs_in", "rejected", "exact_duplicates_removed",
                                                           "near_duplicates_removed", "docs_kept")})
    return report


def _sample_rows(table: pa.Table, fraction: float, seed: int) -> pa.Table:
    return table.filter(pa.array(mixing.unit_hash(table["uid"].to_numpy(), seed, epoch=-3) < fraction))


def _mixed_with_part(table: pa.Table, rates: dict, seed: int, val_fraction: float, parts: dict[str, int]) -> pa.Table:
    """The mix (rows repeated or sampled by their source's rate, `epoch`, `split`) and each row's shard
    `part` within its (source, split), from a seeded hash of its uid."""
    table = mixing.apply_rates(table, rates, seed, val_fraction)
    h = mixing.unit_hash(table["uid"].to_numpy(), seed, epoch=-4)
    n = np.array([parts[f"{s}/{sp}"] for s, sp in zip(table["source"].to_pylist(), table["split"].to_pylist(), strict=True)])
    return table.append_column("part", pa.array((h * n).astype(np.int64)))


def _group_of(table: pa.Table, partitions: int, groups: dict[str, int]) -> np.ndarray:
    keys = zip(table["split"].to_pylist(), table["source"].to_pylist(), table["part"].to_pylist(), strict=True)
    return np.array([groups[f"{sp}/{s}/{k}"] for sp, s, k in keys], dtype=np.int64) % partitions


def _pack_groups(table: pa.Table, **pack) -> pa.Table:
    """packing.pack_group for each (split, source, part) group among the rows."""
    table = table.sort_by([("split", "ascending"), ("source", "ascending"), ("part", "ascending")])
    keys = list(zip(table["split"].to_pylist(), table["source"].to_pylist(), table["part"].to_pylist(), strict=True))
    bounds = [i for i in range(len(keys) + 1) if i in (0, len(keys)) or keys[i] != keys[i - 1]]
    return pa.concat_tables([packing.pack_group(table.slice(a, b - a), **pack) for a, b in itertools.pairwise(bounds)])


def mix_and_pack(kept, pack: PackConfig, seed: int, tok: dict, plan: dict, out: str, index_dir: Path,
                 cpus: int) -> dict:
    """Mix (`plan`: each source's rate and chars) and pack the `kept` documents (a Ray dataset of id, source,
    text, meta, uid) with the tokenizer `tok` (path, eos_id, pad_id, vocab_size); returns the report's
    packing section. Shards are written to `out` (a path or URI) by the packing tasks; index.json into
    `index_dir` (the driver's copy of `out`)."""
    sample_len = pack.seq_len + 1
    rates = {k: v["rate"] for k, v in plan.items()}
    # Shards per (source, split) from an estimate of its tokens (~4 chars per token): about
    # samples_per_shard samples each, but never so many that padded shard tails cost > 0.5%.
    parts = {}
    for name, p in plan.items():
        for split, share in (("train", p["rate"] * (1 - pack.val_fraction)), ("val", pack.val_fraction)):
            est_samples = p["chars"] * share / 4 / sample_len
            parts[f"{name}/{split}"] = int(max(1, min(math.ceil(est_samples / pack.samples_per_shard),
                                                      est_samples // 200)))
    # One shard per (split, source, part) group; the groups are dealt round-robin to the packing tasks.
    groups = [f"{split}/{name}/{k}" for key, n in parts.items() for name, split in [key.rsplit("/", 1)] for k in range(n)]
    refs = hash_shuffle(
        kept.to_arrow_refs(), functools.partial(_group_of, groups={g: i for i, g in enumerate(groups)}),
        functools.partial(_pack_groups, tokenizer_dir=tok["path"], out_dir=str(out), sample_len=sample_len,
                          eos_id=tok["eos_id"], pad_id=tok["pad_id"], vocab_size=tok["vocab_size"], seed=seed,
                          columns=tuple(pack.columns)),
        max(1, min(len(groups), 4 * cpus)),
        prepare=functools.partial(_mixed_with_part, rates=rates, seed=seed,
                                  val_fraction=pack.val_fraction, parts=parts))
    shards = gather(refs, packing.SHARD_SCHEMA).to_pylist()
    index_dir.mkdir(parents=True, exist_ok=True)
    index = packing.write_index(index_dir, shards, {
        "sample_len": sample_len, "seq_len": pack.seq_len, "eos_id": tok["eos_id"], "pad_id": tok["pad_id"],
        "vocab_size": tok["vocab_size"], "tokenizer": _relative(tok["path"], out),
        "tokens_dtype": str(packing.token_dtype(tok["vocab_size"])), "columns": list(pack.columns),
    })
    real = sum(s["real_tokens"] for s in shards)
    total = real + sum(s["pad_tokens"] for s in shards)
    per_source: dict = {}
    for s in shards:
        d = per_source.setdefault(s["source"], {"train_tokens": 0, "val_tokens": 0, "docs": 0})
        d[f"{s['split']}_tokens"] += s["real_tokens"]
        d["docs"] += s["docs"]
    gaps = [json.loads(s["column_gaps"]) for s in shards]
    columns = {c: {"docs_without_value": sum(g[c][0] for g in gaps), "samples_without_value": sum(g[c][1] for g in gaps)}
               for c in pack.columns}
    return {
        "seq_len": pack.seq_len, "samples": {k: v["num_samples"] for k, v in index["splits"].items()},
        "real_tokens": real, "pad_tokens": total - real, "efficiency": round(real / total, 5) if total else 0.0,
        "shards": len(shards), "per_source": per_source, **({"columns": columns} if columns else {}),
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
        *([f"read: {n} file(s) over read.split_bytes read by one task: {why}" for why, n in
           Counter(u["why"] for u in r["read"]["unsplittable"]).items()]),
        *([f"C4 line rules: {r['c4']['documents_edited']} kept documents edited; lines removed: "
           + ", ".join(f"{k} {v}" for k, v in r["c4"]["lines_removed"].items())] if "c4" in r else []),
        *([f"personal data ({r['pii']['action']}): {r['pii']['documents']} documents; "
           + ", ".join(f"{k} {v}" for k, v in r["pii"]["matches"].items())] if "pii" in r else []),
        *([f"decontaminated ({r['decontamination']['ngram']}-grams): {r['decontamination']['documents']} documents"
           + "".join(f"; {f} {n}" for f, n in r["decontamination"]["by_eval_file"].items())]
          if "decontamination" in r else []),
        f"exact duplicates removed: {r['exact_duplicates_removed']}",
        f"near duplicates removed: {r['near_duplicates_removed']} in {r['clusters']} clusters"
        + (f" (MinHash {r['lsh']['num_perm']} perms, {r['lsh']['bands']}x{r['lsh']['rows']} bands, "
           f"threshold {r['lsh']['threshold']}, verify {r['lsh']['verify']}; {r['lsh']['candidate_pairs']} "
           f"candidate pairs, {r['lsh']['verified_edges']} kept)" if r.get("lsh") else ""),
        f"documents kept: {r['docs_kept']}",
        f"tokenizer: vocab {r['tokenizer']['vocab_size']} at {r['tokenizer']['path']}",
    ]
    if "packing" in r:
        p = r["packing"]
        lines.append(f"packed: {p['samples']} samples of {p['seq_len']}+1 tokens, {p['real_tokens']} real tokens, "
                     f"efficiency {100 * p['efficiency']:.2f}%")
        lines += [f"column {c} kept per sample (token-weighted mean): {g['docs_without_value']} packed documents "
                  f"without a number there, {g['samples_without_value']} samples with none (NaN)"
                  for c, g in p.get("columns", {}).items()]
    return lines
