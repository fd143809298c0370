"""Readers and record classification on real files (no Ray): every record is kept or rejected with a reason."""

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmfleet.data.config import FilterConfig, NormalizeConfig, SourceConfig
from lmfleet.data.read import check_hf_split, expand_paths, normalize_text, read_file, stdlib_dir
from lmfleet.errors import InputError


def _read(src: SourceConfig, path, max_chars=1000) -> pa.Table:
    task = {"source": src.model_dump_json(), "source_index": 0, "path": str(path), "relpath": path.name}
    return pa.concat_tables(list(read_file(task, NormalizeConfig(), FilterConfig(max_chars=max_chars))))


def _reasons(table: pa.Table) -> dict:
    out = {}
    for r in table["reject_reason"].to_pylist():
        if r:
            out[r] = out.get(r, 0) + 1
    return out


def messy_jsonl(path):
    lines = [
        json.dumps({"text": "A valid document about ships.", "url": "u1"}).encode(),
        b'{"text": "broken json", ',
        b'{"text": "bad byte \xff\xfe here"}',
        json.dumps({"text": "   \n\t "}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"body": "no text field"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": "x" * 200_000}).encode(),
        b"",
        json.dumps({"text": "Second  valid\r\ndocument\n\n\n\nwith   spaces. ", "id": "custom-7"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_bad_records_are_classified_not_lost(tmp_path):
    path = messy_jsonl(tmp_path / "messy.jsonl")
    t = _read(SourceConfig(name="web", format="jsonl", paths=[str(path)], id_field="id"), path)
    assert _reasons(t) == {"invalid_json": 1, "invalid_utf8": 1, "empty_text": 1, "text_not_string": 1,
                           "missing_text": 1, "not_an_object": 1, "too_long": 1}
    good = t.filter(pa.compute.is_null(t["reject_reason"])).to_pylist()
    assert [g["text"] for g in good] == ["A valid document about ships.", "Second valid\ndocument\n\nwith spaces."]
    assert good[0]["id"] == "web/messy.jsonl:1" and json.loads(good[0]["meta"]) == {"url": "u1"}
    assert good[1]["id"] == "custom-7" and good[1]["source"] == "web"
    rejected = {r["reject_reason"]: r for r in t.to_pylist() if r["reject_reason"]}
    assert rejected["invalid_json"]["location"].endswith("messy.jsonl:2")
    assert "bad byte" in rejected["invalid_utf8"]["raw"]


def test_json_list_text_fields_joined(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add.", "input": "2+2", "output": 4},
        "junk",
    ]))
    src = SourceConfig(name="alpaca", format="json", paths=[str(path)], text_field=["instruction", "input", "output"])
    t = _read(src, path)
    assert _reasons(t) == {"text_not_string": 1, "not_an_object": 1}
    assert t["text"][0].as_py() == "Name a color.\n\nBlue."


def test_bom_and_top_level_scalars(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first line"}).encode() + b"\n")
    assert _read(SourceConfig(name="b", format="jsonl", paths=[str(bom)]), bom)["text"].to_pylist() == ["first line"]
    scalar = tmp_path / "five.json"
    scalar.write_text("5")
    assert _reasons(_read(SourceConfig(name="j", format="json", paths=[str(scalar)]), scalar)) == {"not_an_object": 1}


def test_text_blocks_parquet_and_hf_dataset(tmp_path):
    txt = tmp_path / "play.txt"
    txt.write_text("ROMEO:\nHello there.\n\n\nJULIET:\nGood night.\n  \n")
    t = _read(SourceConfig(name="s", format="text", paths=[str(txt)], text_unit="block"), txt)
    assert t["text"].to_pylist() == ["ROMEO:\nHello there.", "JULIET:\nGood night."]

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert _reasons(_read(SourceConfig(name="s", format="text", paths=[str(bad)]), bad)) == {"invalid_utf8": 1}

    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["one doc", None, "two doc"], "n": [1, 2, 3]}), pqf)
    t = _read(SourceConfig(name="p", format="parquet", paths=[str(pqf)], text_field="content"), pqf)
    assert t["text"].to_pylist() == ["one doc", None, "two doc"] and _reasons(t) == {"empty_text": 1}
    assert json.loads(t["meta"][2].as_py()) == {"n": 3}

    hf = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["alpha beta", ""]})}).save_to_disk(str(hf))
    t = _read(SourceConfig(name="h", format="hf_dataset", paths=[str(hf)]), hf)
    assert t["text"].to_pylist() == ["alpha beta", None] and _reasons(t) == {"empty_text": 1}


def test_python_docstrings_carry_signatures(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text('"""Module doc."""\n\nclass K:\n    """Class doc."""\n\n'
                   '    def f(self, x: int = 1) -> int:\n        """Method doc."""\n        return x\n')
    t = _read(SourceConfig(name="py", format="python_docstrings", paths=[str(mod)]), mod)
    rows = {r["id"]: r for r in t.to_pylist()}
    assert set(rows) == {"py/m.py:<module>", "py/m.py:K", "py/m.py:K.f"}
    assert json.loads(rows["py/m.py:K.f"]["meta"])["signature"] == "f(self, x: int=1)"
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    assert _reasons(_read(SourceConfig(name="py", format="python_docstrings", paths=[str(broken)]), broken)) == {
        "invalid_python": 1}


def test_expand_paths_errors_and_defaults(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        expand_paths(SourceConfig(name="a", format="jsonl", paths=[str(tmp_path / "missing*.jsonl")]))
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no .jsonl"):
        expand_paths(SourceConfig(name="a", format="jsonl", paths=[str(tmp_path / "d")]))
    with pytest.raises(InputError, match="save_to_disk"):
        expand_paths(SourceConfig(name="a", format="hf_dataset", paths=[str(tmp_path / "d")]))
    hf = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(hf))
    with pytest.raises(InputError, match="has no split 'test'"):
        check_hf_split(SourceConfig(name="h", format="hf_dataset", paths=[str(hf)], split="test"), hf)
    files = expand_paths(SourceConfig(name="std", format="python_docstrings"))
    assert len(files) > 500 and all(
        f.path.endswith(".py") and stdlib_dir().resolve() in Path(f.path).parents for f in files)
    assert ("json/decoder.py" in {f.rel for f in files})  # ids relative to the folder named


def test_expand_paths_dedupes_and_ids_relative_to_what_was_named(tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for f in ("d/a.jsonl", "d/sub/b.jsonl"):
        (tmp_path / f).write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    src = SourceConfig(name="s", format="jsonl", paths=["d/**", "d", str(tmp_path / "d" / "a.jsonl")])
    files = expand_paths(src)
    assert [f.rel for f in files] == ["a.jsonl", "sub/b.jsonl"]  # each file once
    assert all(Path(f.path).is_absolute() and f.size == 3 for f in files)


def test_normalize_nfkc_and_whitespace():
    assert normalize_text("ﬁne\u00a0 ｔｅｘｔ\t\tend  \r\n\r\n\r\n\r\nnext ", NormalizeConfig()) == "fine text end\n\nnext"
    assert normalize_text("ﬁ  x", NormalizeConfig(nfkc=False, whitespace=False)) == "ﬁ  x"


def test_normalize_matches_its_definition_on_random_whitespace():
    """The fast paths (a regex only when a substring test finds work for it) against the definition, line
    by line: every Unicode whitespace run within a line -> one space, lines trimmed, at most one blank line."""
    import random
    import re
    import sys
    import unicodedata

    def reference(text: str, cfg: NormalizeConfig) -> str:
        if cfg.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if cfg.whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            text = "\n".join(re.sub(r"[^\S\n]+", " ", line).strip() for line in text.split("\n"))
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
        return text

    spaces = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()]
    pieces = ["a", "b c", "é", "ﬁ", "ｔ", "\u200b", "  ", "\r\n", "\n\n\n", *spaces]
    rng = random.Random(0)
    for cfg in (NormalizeConfig(), NormalizeConfig(nfkc=False), NormalizeConfig(whitespace=False)):
        for _ in range(20_000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            assert normalize_text(text, cfg) == reference(text, cfg), (repr(text), cfg)


def test_auto_split_bytes_gives_every_cpu_work_within_bounds():
    from lmfleet.data.config import ReadConfig

    auto = ReadConfig()
    assert auto.split_bytes == "auto"
    assert auto.split_for(67_500_000, 2) == 67_500_000 // 16  # 8 ranges per CPU
    assert auto.split_for(10_000_000, 2) == 4 << 20  # never under 4 MiB: small inputs stay one task a file
    assert auto.split_for(10**13, 64) == 128 << 20  # never over 128 MiB
    assert ReadConfig(split_bytes=1 << 20).split_for(10**12, 2) == 1 << 20
    assert ReadConfig(split_bytes=None).split_for(10**12, 2) is None
    with pytest.raises(ValueError, match="must be at least 1024"):
        ReadConfig(split_bytes=100)
