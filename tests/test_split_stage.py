"""The data stage reads big JSONL files by byte ranges, from a disk or a bucket, with the results of one
task per file: the same corpus as one file and as eight objects in S3 (moto on loopback), splitting on
and off, run end to end on local Ray."""

import hashlib
import json
import random

import pyarrow.parquet as pq
import pytest

from lmfleet.runner import load_run, run
from test_data_stage import edit_words
from test_read_uri import upload

from conftest import shared, write_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """C4 documents with ids, plus exact and near duplicates of some: one file, and the same lines in eight."""
    root = tmp_path_factory.mktemp("split-corpus")
    rng = random.Random(3)
    docs = [{"id": f"c4-{i}", "text": json.loads(line)["text"]}
            for i, line in enumerate(shared("c4_demo.jsonl").read_text().splitlines())]
    vocab = sorted({w for d in docs for w in d["text"].split()})
    long = [d for d in docs if len(d["text"].split()) > 150]
    docs += [{"id": f"exact-{k}", "text": d["text"]} for k, d in enumerate(long[:8])]
    docs += [{"id": f"near-{k}", "text": edit_words(d["text"], 0.02, rng, vocab)} for k, d in enumerate(long[8:24])]
    rng.shuffle(docs)
    lines = [json.dumps(d) + "\n" for d in docs]
    (root / "one").mkdir()
    (root / "one" / "all.jsonl").write_text("".join(lines))
    (root / "eight").mkdir()
    for k in range(8):
        (root / "eight" / f"part-{k}.jsonl").write_text("".join(lines[k::8]))
    return root


def _run(tmp_path, name: str, paths: list[str], split_bytes: int | None) -> tuple[dict, dict]:
    config = write_config(tmp_path / f"{name}.yaml", {"name": name, "seed": 5, "output_dir": str(tmp_path / name),
                                                      "stages": {"data": {
        "sources": [{"name": "web", "format": "jsonl", "paths": paths, "id_field": "id"}],
        "read": {"split_bytes": split_bytes},
        "filter": {"max_chars": 100_000},
        "dedup": {"verify": "estimate"},  # (the data stage tests verify exactly, the default)
        "tokenizer": {"vocab_size": 400},
        "pack": {"seq_len": 64, "val_fraction": 0.05, "samples_per_shard": 256}}}})
    report = run(load_run(config))["stages"]["data"]
    out = tmp_path / name / "data"
    clusters = sorted(tuple(r.values()) for r in pq.read_table(out / "clusters.parquet").to_pylist())
    packed = {str(p.relative_to(out / "packed")): hashlib.blake2b(p.read_bytes()).hexdigest()
              for p in sorted((out / "packed").rglob("*")) if p.is_file()}
    kept = sorted(pq.read_table(out / "kept", columns=["id"])["id"].to_pylist())
    return report, {"kept": kept, "clusters": clusters, "packed": packed}


def test_byte_range_splits_give_the_results_of_one_task_per_file(corpus, tmp_path, s3, monkeypatch, ray_local):
    env, bucket = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    remote = upload(bucket, corpus / "eight", "split-stage/eight")
    one = str(corpus / "one" / "all.jsonl")
    size = (corpus / "one" / "all.jsonl").stat().st_size
    split = 64 << 10

    one_whole, one_whole_out = _run(tmp_path, "one-whole", [one], None)
    one_split, one_split_out = _run(tmp_path, "one-split", [one], split)
    assert one_whole["read"]["tasks"] == 1 and one_whole["read"]["split_files"] == 0
    assert one_split["read"]["split_files"] == 1 and one_split["read"]["tasks"] == -(-size // split) > 8
    assert one_split_out == one_whole_out  # kept ids, clusters, packed tokens: byte for byte

    s3_whole, s3_whole_out = _run(tmp_path, "s3-whole", [f"{remote}/*.jsonl"], None)
    s3_split, s3_split_out = _run(tmp_path, "s3-split", [remote], split // 4)
    assert s3_whole["read"]["tasks"] == 8 and s3_split["read"]["split_files"] == 8 and s3_split["read"]["tasks"] > 16
    assert s3_split_out == s3_whole_out

    # One file or eight objects: the same documents kept, the same duplicate clusters (ids are the
    # records' own). Packed tokens differ: the mix's seeded order hashes each record's place in its file.
    assert s3_whole_out["kept"] == one_whole_out["kept"] and s3_whole_out["clusters"] == one_whole_out["clusters"]
    assert one_whole["exact_duplicates_removed"] == 8 and one_whole["near_duplicates_removed"] >= 12
    assert one_whole["docs_in"] == s3_split["docs_in"] == 324 and one_whole["rejected"] == 0
    assert any("split into byte ranges" in line for line in one_split["summary"])
