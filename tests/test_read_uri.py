"""Readers on an object store (moto's S3 server on loopback, through pyarrow's own S3 client, as Ray's)
and byte-range splits of big JSONL files: the same records, ids and rejects as from a local disk and one task."""

import bz2
import gzip
import itertools
import json
import lzma
import random
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmfleet.data.config import FilterConfig, NormalizeConfig, SourceConfig
from lmfleet.data.read import (
    byte_ranges,
    count_newlines,
    expand_paths,
    first_lines,
    newline_spans,
    normalize_text,
    plan_reads,
    read_file,
    scan_text_range,
)
from lmfleet.errors import InputError
from lmfleet.uri import cache_root

from conftest import posttrain, pretrain, shared

NORM, FILT = NormalizeConfig(), FilterConfig(max_chars=5000)


@pytest.fixture
def bucket(s3, monkeypatch):
    env, filesystem = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return filesystem


def upload(filesystem, folder: Path, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with filesystem.open_output_stream(f"lmfleet/{prefix}/{path.relative_to(folder)}", compression=None) as out:
                out.write(path.read_bytes())
    return f"s3://lmfleet/{prefix}"


def zstd(data: bytes) -> bytes:
    return pa.compress(data, codec="zstd", asbytes=True)


def jsonl(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({"text": f"Document {i} about the sea and its ships.", "n": i}).encode() + b"\n"
                    for i in range(start, start + n))


def every_format(folder: Path) -> dict[str, tuple[str, dict]]:
    """One input of each format and compression; name -> (format, extra source settings)."""
    folder.mkdir()
    body = jsonl(5) + b'{"text": "broken\n' + jsonl(2, start=5)
    (folder / "web").mkdir()
    (folder / "web/plain.jsonl").write_bytes(body)
    (folder / "web/a.jsonl.gz").write_bytes(gzip.compress(body))
    (folder / "web/b.jsonl.zst").write_bytes(zstd(body))
    (folder / "web/c.ndjson.bz2").write_bytes(bz2.compress(body))
    (folder / "web/d.jsonl.xz").write_bytes(lzma.compress(body))
    (folder / "list.json.gz").write_bytes(gzip.compress(json.dumps([{"text": "one"}, {"text": "two"}, 3]).encode()))
    pq.write_table(pa.table({"text": ["p one", "p two", None]}), folder / "t.parquet")
    (folder / "play.txt.zst").write_bytes(zstd(b"ROMEO:\nHello.\n\n\nJULIET:\nGood night.\n"))
    (folder / "mod.py").write_text('"""A module."""\n\ndef f(x):\n    """Return x."""\n    return x\n')
    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).save_to_disk(str(folder / "hf"))
    return {"web": ("jsonl", {}), "list.json.gz": ("json", {}), "t.parquet": ("parquet", {}),
            "play.txt.zst": ("text", {"text_unit": "block"}), "mod.py": ("python_docstrings", {}),
            "hf": ("hf_dataset", {})}


def serial(fn, args: list[tuple]) -> list:
    return [fn(*a) for a in args]


def read_all(src: SourceConfig, split_bytes: int | None = None) -> list[dict]:
    """Every row of a source, its files split into byte ranges as the data stage plans them."""
    tasks, _ = plan_reads([src], {src.name: expand_paths(src)}, split_bytes, serial)
    return [r for task in tasks for t in read_file(task, NORM, FILT) for r in t.to_pylist()]


def comparable(rows: list[dict], root: str) -> list[tuple]:
    """Rows without where the input lives: locations relative to the folder or prefix that was read."""
    return [(r["id"].replace(root, "<root>"), r["text"], r["reject_reason"], r["uid"], (r["location"] or "").replace(root, "<root>"),
             (r["meta"] or "").replace(root, "<root>")) for r in rows]


def test_every_format_and_compression_reads_the_same_from_s3_as_from_disk(tmp_path, bucket):
    local = tmp_path / "in"
    inputs = every_format(local)
    remote = upload(bucket, local, "formats")
    for name, (fmt, extra) in inputs.items():
        from_disk = read_all(SourceConfig(name="s", format=fmt, paths=[str(local / name)], **extra))
        from_s3 = read_all(SourceConfig(name="s", format=fmt, paths=[f"{remote}/{name}"], **extra))
        assert from_disk and comparable(from_s3, remote) == comparable(from_disk, str(local.resolve())), name
    web = read_all(SourceConfig(name="s", format="jsonl", paths=[f"{remote}/web"]))
    # Five files (each compression), each with 7 documents and one broken line.
    assert sum(r["reject_reason"] is None for r in web) == 35
    assert sorted({r["id"].split(":")[0] for r in web if not r["reject_reason"]}) == [
        "s/a.jsonl.gz", "s/b.jsonl.zst", "s/c.ndjson.bz2", "s/d.jsonl.xz", "s/plain.jsonl"]
    assert {r["reject_reason"] for r in web} == {None, "invalid_json"}
    assert [r["text"] for r in read_all(SourceConfig(name="s", format="text", text_unit="block", paths=[
        f"{remote}/play.txt.zst"])) if r["text"]] == ["ROMEO:\nHello.", "JULIET:\nGood night."]


def test_globs_on_an_object_store_follow_python_glob_rules(tmp_path, bucket):
    local = tmp_path / "in"
    every_format(local)
    (local / "web/deeper").mkdir()
    (local / "web/deeper/e.jsonl").write_bytes(jsonl(1))
    remote = upload(bucket, local, "globs")
    rels = lambda pattern: [f.rel for f in expand_paths(SourceConfig(name="s", format="jsonl", paths=[pattern]))]  # noqa: E731
    assert rels(f"{remote}/web/*.jsonl*") == ["a.jsonl.gz", "b.jsonl.zst", "d.jsonl.xz", "plain.jsonl"]
    assert rels(f"{remote}/**/*.jsonl") == ["web/deeper/e.jsonl", "web/plain.jsonl"]
    assert rels(f"{remote}/web/[ab].*") == ["a.jsonl.gz", "b.jsonl.zst"]
    assert rels(f"{remote}/web") == ["a.jsonl.gz", "b.jsonl.zst", "c.ndjson.bz2", "d.jsonl.xz", "deeper/e.jsonl",
                                     "plain.jsonl"]  # a prefix: files with the format's suffixes under it
    hf = expand_paths(SourceConfig(name="h", format="hf_dataset", paths=[f"{remote}/h*"]))
    assert [(f.path, f.rel) for f in hf] == [(f"{remote}/hf", "hf")] and hf[0].size > 0
    assert rels(f"{remote}/nothing-*.jsonl") == []  # a glob may match nothing, as locally


def test_missing_objects_buckets_and_schemes_fail_before_work_naming_key_and_uri(bucket):
    cases = [
        ("s3://lmfleet/none/x.jsonl", r"sources.s.paths: s3://lmfleet/none/x.jsonl: no such object or prefix"),
        ("s3://no-such-bucket/x.jsonl", r"bucket 'no-such-bucket' does not exist, or the credentials"),
        ("ftp://host/x.jsonl", r"sources.s.paths: ftp://host/x.jsonl: unknown URI scheme 'ftp'; lmfleet reads"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            expand_paths(SourceConfig(name="s", format="jsonl", paths=[path]))
    with pytest.raises(InputError, match=r"no .jsonl/.* files under s3://lmfleet/formats-none"):
        bucket.create_dir("lmfleet/formats-none")
        with bucket.open_output_stream("lmfleet/formats-none/readme.md", compression=None) as out:
            out.write(b"not data")
        expand_paths(SourceConfig(name="s", format="jsonl", paths=["s3://lmfleet/formats-none"]))


def test_damaged_compressed_objects_keep_the_records_before_the_damage(tmp_path, bucket):
    """A truncated gzip or zstd object: its first records are kept and one damaged_file reject names it
    (the stream cannot be decoded past the damage, so the rest is unreadable, not silently dropped)."""
    # Text that compresses about 2x, over several zstd blocks (128 KiB of content each, decoded whole).
    rng = random.Random(0)
    body = b"".join(json.dumps({"text": rng.randbytes(40).hex()}).encode() + b"\n" for _ in range(6000))
    for name, packed in (("cut.jsonl.gz", gzip.compress(body)), ("cut.jsonl.zst", zstd(body))):
        with bucket.open_output_stream(f"lmfleet/damaged/{name}", compression=None) as out:
            out.write(packed[: len(packed) // 2])
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):
        rows = read_all(SourceConfig(name="s", format="jsonl", paths=[f"s3://lmfleet/damaged/{name}"]))
        kept = [r for r in rows if r["reject_reason"] is None]
        damaged = [r for r in rows if r["reject_reason"] == "damaged_file"]
        assert 1000 < len(kept) < 6000 and len(damaged) == 1, name
        assert damaged[0]["location"] == f"s3://lmfleet/damaged/{name}" and "before this point" in damaged[0]["raw"]
        assert [r["id"] for r in kept] == [f"s/{name}:{i}" for i in range(1, len(kept) + 1)]  # a prefix of the file


def tricky_jsonl() -> bytes:
    """Lines of every length around the split points: a BOM, blank lines, CRLF, an undecodable line,
    broken JSON, long lines, and no newline at the end."""
    lines = [b"\xef\xbb\xbf" + json.dumps({"text": "first, after a BOM"}).encode(), b"", b"  ",
             json.dumps({"text": "crlf line"}).encode() + b"\r", b'{"text": "bad \xff byte"}', b'{"text": ']
    lines += [json.dumps({"text": "x" * (i * 37 % 300 + 1), "i": i}).encode() for i in range(120)]
    lines += [b"", json.dumps({"text": "last, no newline"}).encode()]
    return b"\n".join(lines)


def test_byte_range_splits_give_the_rows_of_one_task(tmp_path, bucket):
    path = tmp_path / "big.jsonl"
    path.write_bytes(tricky_jsonl())
    remote = upload(bucket, tmp_path, "split")
    src = SourceConfig(name="s", format="jsonl", paths=[str(path)])
    whole = read_all(src)
    assert len(whole) == 125 and whole[0]["text"] == "first, after a BOM" and whole[-1]["text"] == "last, no newline"
    assert {r["reject_reason"] for r in whole} == {None, "invalid_utf8", "invalid_json"}
    for split in (1024, 1500, 4099, 8000):  # ranges of 2 to 14 per file, splitting lines at every offset kind
        assert len(byte_ranges(path.stat().st_size, split)) > 1
        assert read_all(src, split) == whole, split
        from_s3 = read_all(SourceConfig(name="s", format="jsonl", paths=[f"{remote}/big.jsonl"]), split)
        assert comparable(from_s3, remote) == comparable(whole, str(tmp_path.resolve())), split
    # Every split point inside a small file: each line read once, by the range holding its first byte.
    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"text": "a"}\n\n{"text": "bb"}\n{"text": "ccc"}\n')
    one = read_all(SourceConfig(name="s", format="jsonl", paths=[str(small)]))
    for offset in range(1, small.stat().st_size):
        ranges = [(0, offset), (offset, small.stat().st_size)]
        starts = first_lines(ranges, [count_newlines(str(small), a, b) for a, b in newline_spans(ranges)])
        task = {"source": SourceConfig(name="s", format="jsonl", paths=[str(small)]).model_dump_json(),
                "source_index": 0, "path": str(small.resolve()), "relpath": "small.jsonl"}
        rows = [r for (a, b), first in zip(ranges, starts, strict=True)
                for t in read_file({**task, "start": a, "end": b, "first_line": first}, NORM, FILT) for r in t.to_pylist()]
        assert rows == one, offset


def test_text_blocks_split_into_byte_ranges_are_the_blocks_of_one_task(tmp_path, bucket):
    """`text_unit: block` files read by ranges: the blocks (ids = indices of re.split(r"\n\\s*\n") over the
    whole file, empty ones counted) of a one-task read, for random texts of blank lines, CR, Unicode
    whitespace and a BOM split at every offset, and a play split at four sizes from disk and from S3."""
    rng = random.Random(0)
    src = SourceConfig(name="s", format="text", text_unit="block", paths=[str(tmp_path / "t.txt")])
    task = {"source": src.model_dump_json(), "source_index": 0, "path": str((tmp_path / "t.txt").resolve()),
            "relpath": "t.txt"}
    pieces = ["a", "b c", " ", "\t", "\n", "\n", "\n", "\r", "\u2028", "\xa0", "é"]
    for trial in range(300):
        body = ("\ufeff" if trial % 7 == 0 else "") + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 24)))
        data = body.encode()
        (tmp_path / "t.txt").write_bytes(data)
        whole = [r for t in read_file(task, NORM, FILT) for r in t.to_pylist()]
        want = [(i, b) for i, b in enumerate(re.split(r"\n\s*\n", body.removeprefix("\ufeff"))) if b.strip()]
        assert [(r["id"], r["text"]) for r in whole] == [(f"s/t.txt:{i}", normalize_text(b, NORM)) for i, b in want]
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 2))) if trial % 2 else []
        for offsets in ([[c] for c in range(1, len(data))] if trial % 2 == 0 else [cuts]):
            bounds = [0, *offsets, len(data)]
            group = [{**task, "start": a, "end": b} for a, b in itertools.pairwise(bounds)]
            found = [scan_text_range(task["path"], a, b) for a, b in itertools.pairwise(bounds)]
            blocks, prev = 0, None
            for part, scan in zip(group, found, strict=True):
                part["first_block"], part["prev_line"] = blocks, prev
                blocks, prev = blocks + scan["separators"], scan["last"] or prev
            rows = [r for part in group for t in read_file(part, NORM, FILT) for r in t.to_pylist()]
            assert rows == whole, (body, offsets)
    play = shared("tinyshakespeare.txt").read_bytes()[:40_000] + b"\n\n\n  \nEND\n"
    (tmp_path / "play").mkdir()
    (tmp_path / "play" / "play.txt").write_bytes(play)
    remote = upload(bucket, tmp_path / "play", "split-text")
    whole = read_all(SourceConfig(name="s", format="text", text_unit="block", paths=[str(tmp_path / "play")]))
    assert len(whole) > 200 and "END" in whole[-1]["text"]
    for split in (1024, 3000, 7777, 20_000):
        tasks, report = plan_reads([src.model_copy(update={"paths": [f"{remote}/play.txt"]})],
                                   {"s": expand_paths(SourceConfig(name="s", format="text", text_unit="block",
                                                                   paths=[f"{remote}/play.txt"]))}, split, serial)
        assert len(tasks) == len(byte_ranges(len(play), split)) > 1 and report["split_files"] == 1
        from_s3 = [r for task in tasks for t in read_file(task, NORM, FILT) for r in t.to_pylist()]
        assert comparable(from_s3, remote) == comparable(whole, str((tmp_path / "play").resolve())), split
    # Not UTF-8: read by one task, so that the whole file is rejected as one record, as unsplit.
    (tmp_path / "bad.txt").write_bytes(play[:5000] + b"\xff" + play[5000:9000])
    bad = SourceConfig(name="s", format="text", text_unit="block", paths=[str(tmp_path / "bad.txt")])
    tasks, report = plan_reads([bad], {"s": expand_paths(bad)}, 1024, serial)
    assert len(tasks) == 1 and report["unsplittable"][0]["why"].startswith("not UTF-8")
    assert [r["reject_reason"] for t in read_file(tasks[0], NORM, FILT) for r in t.to_pylist()] == ["invalid_utf8"]


def test_pretraining_reads_packed_data_from_a_bucket_as_from_disk(tmp_path, bucket, packed, ray_local):
    """The same steps and losses, and an export with the data stage's tokenizer, from s3:// as from a path:
    each node's workers read a verified local copy (lmfleet.uri.local_copy), made once."""
    remote = upload(bucket, packed, "pretrain-input/data")
    disk, _ = pretrain(tmp_path, packed, name="disk", steps=3)
    s3, report = pretrain(tmp_path, remote, name="s3", steps=3, export=True)
    assert [(s["step"], s["loss"]) for s in s3] == [(s["step"], s["loss"]) for s in disk]
    assert (tmp_path / "s3" / "pretrain" / "model" / "tokenizer.json").is_file() and report["export"]
    copies = [json.loads(p.read_text()) for p in cache_root().glob("*.manifest.json")]
    # packed/ and tokenizer/, each copied once on this one-node cluster
    assert sum("index.json" in c for c in copies) == 1 and sum("tokenizer.json" in c for c in copies) == 1


def test_post_training_reads_its_model_and_dataset_from_a_bucket_as_from_disk(tmp_path, bucket, base_lm, ray_local):
    """SFT whose model dir (a stage dir holding model/) and zstd-compressed dataset are in S3: the same
    records, steps and losses as from a disk (the driver, each worker and the evaluation task read a
    node-local copy of the model)."""
    local = tmp_path / "in"
    (local / "base").mkdir(parents=True)
    records = json.loads(shared("alpaca_5000.json").read_text())[:48]
    (local / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (local / "a.jsonl.zst").write_bytes(zstd((local / "a.jsonl").read_bytes()))
    upload(bucket, base_lm.parent, "posttrain-input/base")  # model/ and tokenizer/
    upload(bucket, local, "posttrain-input/data")
    settings = {"training": {"max_length": 128, "max_steps": 3}, "batch": {"micro_batch": 8},
                "optimizer": {"lr": 3e-3}, "log_every": 1, "eval": {"samples": 2, "generation": {"max_new_tokens": 4}}}
    disk, _ = posttrain(tmp_path, "sft", name="disk", model=str(base_lm), dataset={
        "paths": [str(local / "a.jsonl")], "val_fraction": 0.1}, **settings)
    s3, out = posttrain(tmp_path, "sft", name="s3", model="s3://lmfleet/posttrain-input/base", dataset={
        "paths": ["s3://lmfleet/posttrain-input/data/a.jsonl.zst"], "val_fraction": 0.1}, **settings)
    assert s3["data"] == disk["data"] and s3["data"]["train"] > 30
    assert (s3["steps"], s3["first_loss"], s3["final_loss"]) == (disk["steps"], disk["first_loss"], disk["final_loss"])
    assert s3["eval"]["perplexity_before"] == disk["eval"]["perplexity_before"]
    assert (out / "model" / "config.json").is_file()
