"""Post-training records (no Ray): real SFT/preference files -> TRL conversational records or rejects."""

import json

import pytest

from lmfleet.data.read import stdlib_dir
from lmfleet.errors import ConfigError, InputError
from lmfleet.posttrain.config import DatasetConfig
from lmfleet.posttrain.records import DOCSTRING_PROMPT, REJECT_REASONS, read_preferences, read_sft

from conftest import shared


def _cfg(*paths, **kw) -> DatasetConfig:
    return DatasetConfig(paths=[str(p) for p in paths], **kw)


def _reasons(records) -> dict:
    return records.counts()["rejected_by_reason"]


def _is_preference(rec) -> bool:
    return (
        set(rec) == {"prompt", "chosen", "rejected"} and rec["prompt"][-1]["role"] == "user"
        and [m["role"] for m in rec["chosen"] + rec["rejected"]] == ["assistant", "assistant"]
        and rec["chosen"][0]["content"] != rec["rejected"][0]["content"]
    )


def test_alpaca_becomes_user_assistant_messages():
    r = read_sft(_cfg(shared("alpaca_5000.json")), seed=0)
    c = r.counts()
    # Two records of the real file have an empty output: quarantined, not trained on.
    assert c["read"] == 5000 and c["kept"] == 4998 and _reasons(r) == {"empty": 2}
    assert sorted(x["location"].rsplit("/", 1)[1] for x in r.rejects) == [
        "alpaca_5000.json:[2335]", "alpaca_5000.json:[4658]"]
    records = r.train + r.val
    assert all([m["role"] for m in rec["messages"]] == ["user", "assistant"] for rec in records)
    with_input = [rec for rec in records if "\n\nSentence 1: I am going" in rec["messages"][0]["content"]]
    assert with_input[0]["messages"][0]["content"].startswith("Are the two sentences below grammatically")


def test_hh_transcripts_split_into_shared_prompt_and_final_answers():
    r = read_preferences(_cfg(shared("hh_rlhf_harmless_base_test.jsonl.gz"), max_chars=100_000), seed=0)
    c = r.counts()
    # The real file has 4 empty chosen answers and 5 pairs whose earlier turns differ.
    assert c["read"] == 2312 and c["kept"] == 2303 and _reasons(r) == {"empty": 4, "prompt_mismatch": 5}
    assert all(_is_preference(rec) for rec in r.train + r.val)
    first = next(rec for rec in r.train + r.val if rec["prompt"][0]["content"].startswith("what are some pr"))
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant"] * 2 + ["user"]
    assert first["chosen"][0]["content"].startswith("No, sorry!")


def test_dpo_conversations_read_whole_with_system_turns():
    r = read_preferences(_cfg(shared("dpo_en_demo.json"), max_chars=100_000), seed=0)
    assert r.counts()["kept"] == 300 and not r.rejects
    records = r.train + r.val
    assert all(_is_preference(rec) for rec in records)
    assert sum(rec["prompt"][0]["role"] == "system" for rec in records) == 80
    # With the default max_chars the long conversations are quarantined, counted by reason.
    short = read_preferences(_cfg(shared("dpo_en_demo.json")), seed=0)
    assert set(_reasons(short)) == {"too_long"} and short.counts()["kept"] + len(short.rejects) == 300


def _write_lines(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


def test_messy_sft_records_are_classified_not_lost(tmp_path):
    lines = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        b'{"instruction": "broken',
        b"[1, 2]",
        {"text": "no known format"},
        {"messages": [{"role": "user"}]},
        {"instruction": "Count.", "output": 42},
        {"instruction": "Say nothing.", "input": "", "output": "   "},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]},
        {"instruction": "Repeat.", "input": "", "output": "x" * 300},
        b"",
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        b'{"instruction": "bad byte \xff", "output": "x"}',
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    path = _write_lines(tmp_path / "messy.jsonl", lines)
    r = read_sft(_cfg(path, max_chars=200, val_fraction=0), seed=0)
    assert _reasons(r) == {"invalid_json": 1, "not_an_object": 1, "unknown_format": 2, "missing_field": 1,
                           "bad_type": 1, "empty": 1, "bad_role": 2, "too_long": 1, "invalid_utf8": 1}
    assert set(_reasons(r)) <= set(REJECT_REASONS)
    assert r.counts() == {"read": 14, "kept": 3, "train": 3, "val": 0, "rejected": 11,
                          "rejected_by_reason": _reasons(r)}
    where = {x["location"].rsplit(":", 1)[1]: x["reason"] for x in r.rejects}
    assert where == {"2": "invalid_json", "3": "not_an_object", "4": "unknown_format", "5": "missing_field",
                     "6": "bad_type", "7": "empty", "8": "bad_role", "9": "bad_role", "10": "too_long",
                     "13": "invalid_utf8", "15": "unknown_format"}
    assert all(x["location"].startswith(str(path)) for x in r.rejects)
    assert next(x for x in r.rejects if x["reason"] == "too_long")["raw"] == json.dumps(lines[9])[:500]
    assert [[(m["role"], m["content"]) for m in rec["messages"]] for rec in r.train] == [
        [("user", "Name a colour."), ("assistant", "Blue.")],
        [("user", "Hi"), ("assistant", "Hello!")],
        [("user", "Translate.\n\nchat"), ("assistant", "cat")],
    ]


def test_messy_preference_records_are_classified_not_lost(tmp_path):
    hh = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: What is 2+2?\n\nAssistant: "
    lines = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"chosen": hh + "It is 4.", "rejected": hh + "It is 5."},
        {"chosen": hh + "It is 4.", "rejected": hh.replace("Hello.", "Hey.") + "It is 5."},
        {"prompt": "p", "chosen": "Same.", "rejected": " Same. "},
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "human", "value": "a"},
         "rejected": {"from": "gpt", "value": "b"}},
        {"prompt": "p", "chosen": 3, "rejected": "b"},
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt"},
         "rejected": {"from": "gpt", "value": "b"}},
        {"chosen": hh, "rejected": hh + "It is 5."},
        {"chosen": "no turns at all", "rejected": "none here either"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a" * 300, "rejected": "b"},
        {"instruction": "an SFT record", "output": "x"},
    ]
    path = _write_lines(tmp_path / "prefs.jsonl", lines)
    r = read_preferences(_cfg(path, max_chars=200), seed=0)
    where = {x["location"].rsplit(":", 1)[1]: x["reason"] for x in r.rejects}
    assert where == {"3": "prompt_mismatch", "4": "same_answer", "5": "bad_role", "6": "bad_type",
                     "7": "missing_field", "8": "empty", "9": "bad_role", "10": "empty", "11": "too_long",
                     "12": "unknown_format"}
    kept = r.train + r.val
    assert len(kept) == 2 and all(_is_preference(rec) for rec in kept)
    hh_rec = next(rec for rec in kept if len(rec["prompt"]) == 3)
    assert [m["content"] for m in hh_rec["prompt"]] == ["Hi there", "Hello.", "What is 2+2?"]
    assert hh_rec["chosen"] == [{"role": "assistant", "content": "It is 4."}]


def test_json_files_dirs_explicit_formats_and_system_prompt(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([
        {"instruction": "Hi", "input": "", "output": "Hello there."},
        5,
        {"instruction": "Hi", "output": None},
        {"messages": [{"role": "system", "content": "Own prompt."}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]},
    ]))
    (d / "b.json").write_text('{"instruction": "not a list", ')  # not JSON at all: one reject, whole file
    (d / "notes.txt").write_text("ignored: not a record file")
    r = read_sft(_cfg(d, system_prompt="Be brief.", val_fraction=0), seed=0)
    assert sorted((x["location"].removeprefix(str(d.resolve())), x["reason"]) for x in r.rejects) == [
        ("/a.json:[1]", "not_an_object"), ("/a.json:[2]", "bad_type"), ("/b.json", "invalid_json")]
    assert [rec["messages"][0]["content"] for rec in r.train] == ["Be brief.", "Own prompt."]
    assert [m["role"] for m in r.train[0]["messages"]] == ["system", "user", "assistant"]
    # An explicit format does not guess: a messages record read as alpaca lacks its fields.
    alpaca = read_sft(_cfg(d / "a.json", format="alpaca"), seed=0)
    assert _reasons(alpaca) == {"not_an_object": 1, "bad_type": 1, "missing_field": 1}
    with pytest.raises(ConfigError, match="hh"):
        read_sft(_cfg(d, format="hh"), seed=0)


def test_missing_paths_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl"):
        read_sft(_cfg(tmp_path / "nope.jsonl"), seed=0)
    with pytest.raises(InputError, match=r"missing\*\.json"):
        read_preferences(_cfg(tmp_path / "missing*.json"), seed=0)


def test_split_is_seeded_by_content_and_max_records_samples(tmp_path):
    cfg = _cfg(shared("alpaca_5000.json"), val_fraction=0.2)
    a, b = read_sft(cfg, seed=1), read_sft(cfg, seed=1)
    assert a.train == b.train and a.val == b.val
    assert 850 < len(a.val) < 1150  # 20% of 4998, within ~3.5 standard deviations
    # Order does not matter: the same records reversed land in the same splits.
    records = json.loads(shared("alpaca_5000.json").read_text())
    (tmp_path / "rev.json").write_text(json.dumps(records[::-1]))
    rev = read_sft(_cfg(tmp_path / "rev.json", val_fraction=0.2), seed=1)
    assert sorted(map(json.dumps, rev.val)) == sorted(map(json.dumps, a.val))
    assert read_sft(cfg, seed=2).val != a.val

    few = _cfg(shared("alpaca_5000.json"), max_records=100)
    s1, s2 = read_sft(few, seed=3), read_sft(few, seed=3)
    assert s1.counts()["kept"] == 100 and s1.counts()["read"] == 5000
    assert s1.train + s1.val == s2.train + s2.val
    s4 = read_sft(few, seed=4)
    assert s4.train + s4.val != s1.train + s1.val


def test_write_outputs_jsonl_that_reads_back(tmp_path):
    r = read_sft(_cfg(shared("alpaca_5000.json"), max_records=50), seed=0)
    r.write(tmp_path / "out")
    for name, rows in (("train", r.train), ("val", r.val), ("rejects", r.rejects)):
        lines = (tmp_path / "out" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(x) for x in lines] == rows
    again = read_sft(_cfg(tmp_path / "out" / "train.jsonl", format="messages", val_fraction=0), seed=0)
    assert again.train == r.train


def test_python_functions_from_source_never_imported(tmp_path):
    (tmp_path / "mod.py").write_text(
        "raise SystemExit('never imported')\n"
        "def area(w: float, h: float = 1.0, *rest, scale=2, **kw) -> float:\n"
        "    '''Return the area of a rectangle of width w and height h.\n\n    More details.\n    '''\n"
        "class Box:\n"
        "    async def fetch(self, key):\n"
        "        '''Fetch the value stored under key from the box.'''\n"
        "    def _hidden(self):\n        '''A private helper with a long enough docstring.'''\n"
        "    def __len__(self):\n        '''Number of things inside the box, counted.'''\n"
        "def short():\n    '''Too short.'''\n"
    )
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text("def test_x():\n    '''A test, long docstring here.'''\n")
    r = read_sft(_cfg(tmp_path, format="python_functions", val_fraction=0), seed=0)
    broken = str(tmp_path / "broken.py")
    assert [(x["reason"], x["location"]) for x in r.rejects] == [("invalid_python", broken)]
    assert [rec["messages"] for rec in r.train] == [
        [{"role": "user",
          "content": DOCSTRING_PROMPT + "def area(w: float, h: float=1.0, *rest, scale=2, **kw) -> float:"},
         {"role": "assistant", "content": "Return the area of a rectangle of width w and height h."}],
        [{"role": "user", "content": DOCSTRING_PROMPT + "async def fetch(self, key):"},
         {"role": "assistant", "content": "Fetch the value stored under key from the box."}],
    ]
    prefs = read_preferences(_cfg(tmp_path, format="python_functions", val_fraction=0), seed=0)
    assert [(rec["chosen"][0]["content"][:5], rec["rejected"][0]["content"][:5]) for rec in prefs.train] == [
        ("Retur", "Fetch"), ("Fetch", "Retur")]


def test_python_functions_from_the_stdlib():
    sft = read_sft(DatasetConfig(format="python_functions"), seed=0)  # default: this Python's stdlib
    records = sft.train + sft.val
    assert len(records) > 3000 and not sft.rejects
    prefixes = (DOCSTRING_PROMPT + "def ", DOCSTRING_PROMPT + "async def ")
    assert all(rec["messages"][0]["content"].startswith(prefixes) for rec in records)

    cfg = _cfg(stdlib_dir() / "json", stdlib_dir() / "email", format="python_functions")
    prefs = read_preferences(cfg, seed=0)
    kept = prefs.train + prefs.val
    assert len(kept) > 100 and all(_is_preference(rec) for rec in kept)
    assert prefs.train == read_preferences(cfg, seed=0).train
    other_seed = read_preferences(cfg, seed=1)
    assert [rec["rejected"] for rec in other_seed.train + other_seed.val] != [rec["rejected"] for rec in kept]
