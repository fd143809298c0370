"""Post-training records: dataset files -> TRL conversational records, or quarantined rejects.

SFT records are `{"messages": [{role, content}, ...]}` ending with the assistant's answer; preference
records are `{"prompt": [...ending with a user turn], "chosen": [assistant], "rejected": [assistant]}`.
As in the data stage's readers, a bad record never raises: it becomes a reject (reason, location, a
prefix of the raw record) so every record read is counted. Only a missing path raises (InputError).
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmfleet.data.config import SourceConfig
from lmfleet.data.read import (
    DAMAGED,
    content_hash,
    expand_paths,
    named_paths,
    printable,
    valid_unicode,
    with_compressions,
)
from lmfleet.errors import ConfigError
from lmfleet.posttrain.config import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    UNPAIRED_FORMATS,
    DatasetConfig,
)
from lmfleet.uri import FileRef, open_input, read_bytes

REJECT_REASONS = (
    "invalid_json",
    "invalid_utf8",
    "invalid_unicode",
    "damaged_file",
    "invalid_python",
    "not_an_object",
    "unknown_format",
    "missing_field",
    "bad_type",
    "empty",
    "bad_role",
    "prompt_mismatch",
    "same_answer",
    "too_long",
    "too_many_tokens",
)
RAW_PREFIX = 500  # chars of a rejected record kept, enough to see what was wrong
RECORD_SUFFIXES = with_compressions((".json", ".jsonl", ".ndjson"))
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
DOCSTRING_PROMPT = "Write the docstring of this Python function:\n"
MIN_DOCSTRING_CHARS = 20  # shorter summaries ("Return x.") teach little
_TEST_DIRS = {"test", "tests", "idle_test"}
_FORMATS = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS,
            "unpaired": UNPAIRED_FORMATS}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass
class Records:
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    read: int = 0  # records seen: kept + rejected + valid ones left out by max_records

    def counts(self) -> dict:
        return {
            "read": self.read,
            "kept": len(self.train) + len(self.val),
            "train": len(self.train),
            "val": len(self.val),
            "rejected": len(self.rejects),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in self.rejects).items())),
        }

    def quarantine(self, reason: str, rejected) -> None:
        """Move the records for which `rejected(record)` is true to the rejects (location split[index])."""
        for split in ("train", "val"):
            kept = []
            for i, record in enumerate(getattr(self, split)):
                if rejected(record):
                    self.rejects.append({"reason": reason, "location": f"{split}[{i}]",
                                         "raw": json.dumps(record, ensure_ascii=False)[:RAW_PREFIX]})
                else:
                    kept.append(record)
            setattr(self, split, kept)

    def write(self, out_dir: str | Path) -> None:
        """train.jsonl, val.jsonl and rejects.jsonl in out_dir, one JSON object per line."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", self.train), ("val", self.val), ("rejects", self.rejects)):
            with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def prompt_of(record: dict) -> list[dict]:
    """The prompt messages of an SFT or preference record."""
    return record["prompt"] if "prompt" in record else record["messages"][:-1]


class Reject(Exception):
    """A record that cannot become a training record; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_sft(cfg: DatasetConfig, seed: int) -> Records:
    return _read(cfg, seed, "sft")


def read_preferences(cfg: DatasetConfig, seed: int) -> Records:
    return _read(cfg, seed, "preference")


def read_unpaired(cfg: DatasetConfig, seed: int) -> Records:
    """Unpaired feedback (kto): `{"prompt": messages, "completion": [assistant], "label": bool}`."""
    return _read(cfg, seed, "unpaired")


def read_prompts(cfg: DatasetConfig, seed: int) -> Records:
    """Prompt records of the RL stages: `{"prompt": messages, ...the record's other fields}`."""
    return _read(cfg, seed, "prompt")


def _read(cfg: DatasetConfig, seed: int, kind: str) -> Records:
    formats = _FORMATS[kind]
    if cfg.format not in (*formats, "auto"):
        raise ConfigError(f"dataset format {cfg.format!r} has no {kind} records; use {formats} or auto")
    items = _functions(cfg, kind, seed) if cfg.format == "python_functions" else _file_values(cfg)
    out, valid = Records(), []
    for location, raw, value in items:
        out.read += 1
        try:
            if isinstance(value, Reject):
                raise value
            record = value if cfg.format == "python_functions" else _convert(value, cfg.format, kind)
            valid.append(_finish(record, cfg, kind))
        except Reject as r:
            out.rejects.append({"reason": r.reason, "location": printable(location), "raw": printable(raw[:RAW_PREFIX])})
    if cfg.max_records is not None and len(valid) > cfg.max_records:
        # A seeded sample, kept in file order so outputs read like their inputs.
        keep = random.Random(seed).sample(range(len(valid)), cfg.max_records)
        valid = [valid[i] for i in sorted(keep)]
    for record in valid:
        # By the prompt's content, not position: the split does not change when files are reordered or
        # grow, a prompt with several answers stays on one side, and every stage (SFT, reward, PPO, DPO)
        # holds out the same prompts of shared data.
        prompt = json.dumps(prompt_of(record), sort_keys=True, ensure_ascii=False)
        h = int(content_hash(f"{seed}\0{prompt}"), 16)
        (out.val if h / 2**128 < cfg.val_fraction else out.train).append(record)
    return out


def _source(cfg: DatasetConfig) -> SourceConfig:
    """The dataset's paths as a data stage source: the same path rules (folders, globs, links)."""
    fmt = "python_docstrings" if cfg.format == "python_functions" else "jsonl"
    return SourceConfig(name="dataset", format=fmt, paths=cfg.paths)


def dataset_files(cfg: DatasetConfig) -> list[FileRef]:
    """Each input file (absolute path or URI, path relative to what was named); InputError if one is missing."""
    return expand_paths(_source(cfg), None if cfg.format == "python_functions" else RECORD_SUFFIXES)


def dataset_paths(cfg: DatasetConfig) -> list[Path | str]:
    """What the dataset's paths name (files, folders, the folders of globs)."""
    return named_paths(_source(cfg))


def _file_values(cfg: DatasetConfig) -> Iterator[tuple[str, str, object]]:
    """(location, raw text, JSON value or Reject) of each record of the input files."""
    for ref in dataset_files(cfg):
        path = ref.path
        if path.endswith(with_compressions((".json",))):
            try:
                raw = read_bytes(path)
            except DAMAGED as err:
                yield path, f"{type(err).__name__}: {err}", Reject("damaged_file")
                continue
            try:
                data = json.loads(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                reason = "invalid_utf8" if isinstance(e, UnicodeDecodeError) else "invalid_json"
                yield path, raw[: RAW_PREFIX * 4].decode("utf-8", errors="replace"), Reject(reason)
                continue
            for i, value in enumerate(data if isinstance(data, list) else [data]):
                yield f"{path}:[{i}]", json.dumps(value, ensure_ascii=False), value
            continue
        try:
            yield from _jsonl_values(path)
        except DAMAGED as err:  # as in the data stage: the records before the damage are kept
            yield path, f"{type(err).__name__}: {err} (records before this point were read)", Reject(
                "damaged_file")


def _jsonl_values(path: str) -> Iterator[tuple[str, str, object]]:
    with open_input(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines separate nothing in JSONL; they are not records
            location = f"{path}:{lineno}"
            try:
                # A BOM is not content.
                text = line.rstrip(b"\r\n").decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                yield location, line.decode("utf-8", errors="replace"), Reject("invalid_utf8")
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = Reject("invalid_json")
            yield location, text, value


def _convert(value: object, fmt: str, kind: str) -> dict:
    """A parsed record in a user format -> the TRL record (not yet checked as a whole)."""
    if not isinstance(value, dict):
        raise Reject("not_an_object")
    fmt = _detect(value) if fmt == "auto" else fmt
    if fmt not in _FORMATS[kind]:
        raise Reject("unknown_format")
    if fmt == "unpaired":
        label = _field(value, "label", bool)
        prompt = _field(value, "prompt", (str, list))
        turns = [_turn(m, "role", "content") for m in prompt] if isinstance(prompt, list) else [_msg("user", prompt)]
        return {"prompt": turns, "completion": [_msg("assistant", _field(value, "completion"))], "label": label}
    if fmt == "prompts":  # the other fields stay: reward functions read them (an answer, tests, ...)
        prompt = value.get("prompt")
        if isinstance(prompt, list):
            turns = [_turn(m, "role", "content") for m in prompt]
        else:
            turns = [_msg("user", _field(value, "prompt"))]
        return {**value, "prompt": turns}
    if fmt == "alpaca":
        extra = value.get("input") or ""
        if not isinstance(extra, str):
            raise Reject("bad_type")
        user = _field(value, "instruction") + (f"\n\n{extra}" if extra.strip() else "")
        return {"messages": [_msg("user", user), _msg("assistant", _field(value, "output"))]}
    if fmt == "messages":
        if "messages" in value:
            return {"messages": [_turn(m, "role", "content") for m in _field(value, "messages", list)]}
        return {"messages": [_turn(m, "from", "value") for m in _field(value, "conversations", list)]}
    if fmt == "hh":
        chosen, rejected = _hh_turns(_field(value, "chosen")), _hh_turns(_field(value, "rejected"))
        if chosen[:-1] != rejected[:-1]:
            raise Reject("prompt_mismatch")
        return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    if fmt == "conversations":
        return {
            "prompt": [_turn(m, "from", "value") for m in _field(value, "conversations", list)],
            "chosen": [_turn(_field(value, "chosen", dict), "from", "value")],
            "rejected": [_turn(_field(value, "rejected", dict), "from", "value")],
        }
    return {  # pairs
        "prompt": [_msg("user", _field(value, "prompt"))],
        "chosen": [_msg("assistant", _field(value, "chosen"))],
        "rejected": [_msg("assistant", _field(value, "rejected"))],
    }


def _detect(value: dict) -> str | None:
    if "chosen" in value and "rejected" in value:
        return "pairs" if "prompt" in value else "conversations" if "conversations" in value else "hh"
    if "completion" in value and "label" in value:
        return "unpaired"
    if "prompt" in value:
        return "prompts"
    if "messages" in value or "conversations" in value:
        return "messages"
    if "instruction" in value and "output" in value:
        return "alpaca"
    return None


def _field(value: dict, key: str, typ: type = str):
    if key not in value:
        raise Reject("missing_field")
    if not isinstance(value[key], typ):
        raise Reject("bad_type")
    return value[key]


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _turn(message: object, role_key: str, content_key: str) -> dict:
    if not isinstance(message, dict):
        raise Reject("bad_type")
    role, content = _field(message, role_key), _field(message, content_key)
    if role not in ROLES:
        raise Reject("bad_role")
    return _msg(ROLES[role], content)


def _hh_turns(transcript: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> turns; the last must be the assistant's."""
    parts = _HH_TURN.split("\n\n" + transcript.lstrip())
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "Assistant":
        raise Reject("bad_role")  # text outside any turn, no turns, or no final answer
    roles = ["user" if r == "Human" else "assistant" for r in parts[1::2]]
    return [_msg(role, text.strip()) for role, text in zip(roles, parts[2::2], strict=True)]


def _finish(record: dict, cfg: DatasetConfig, kind: str) -> dict:
    """Add the system prompt and check what every record needs, whatever its input format."""
    key = "messages" if kind == "sft" else "prompt"
    if not record[key]:
        raise Reject("empty")
    if cfg.system_prompt and record[key][0]["role"] != "system":  # a record's own system turn wins
        record = {**record, key: [_msg("system", cfg.system_prompt), *record[key]]}
    roles = [m["role"] for m in record[key]]
    if key == "messages":
        turns = record["messages"]
        if roles[-1] != "assistant" or "user" not in roles:
            raise Reject("bad_role")
    elif kind == "prompt":
        turns = record["prompt"]
        if roles[-1] != "user":
            raise Reject("bad_role")
    elif kind == "unpaired":
        turns = record["prompt"] + record["completion"]
        if roles[-1] != "user":
            raise Reject("bad_role")
    else:
        turns = record["prompt"] + record["chosen"] + record["rejected"]
        answers = {record["chosen"][0]["role"], record["rejected"][0]["role"]}
        if roles[-1] != "user" or answers != {"assistant"}:
            raise Reject("bad_role")
    if any(not m["content"].strip() for m in turns):
        raise Reject("empty")
    if not all(valid_unicode(m["content"]) for m in turns):  # lone surrogates ("\ud800" in JSON)
        raise Reject("invalid_unicode")
    if kind == "preference" and record["chosen"][0]["content"].strip() == record["rejected"][0]["content"].strip():
        raise Reject("same_answer")
    if sum(len(m["content"]) for m in turns) > cfg.max_chars:
        raise Reject("too_long")
    return record


def _functions(cfg: DatasetConfig, kind: str, seed: int) -> Iterator[tuple[str, str, object]]:
    """(location, raw, record) of each documented public function of the Python files (never imported).

    SFT: signature -> first docstring paragraph. Preference: the same, against the first paragraph of
    another function's docstring (equally fluent, so only matching the signature tells them apart).
    """
    found = []  # (location, signature, summary)
    for ref in dataset_files(cfg):
        path = ref.path
        if _TEST_DIRS & set(Path(ref.rel).parts[:-1]):
            continue
        raw = read_bytes(path)
        try:
            tree = ast.parse(raw, filename=path)
        except (SyntaxError, ValueError):
            yield path, raw[: RAW_PREFIX * 4].decode("utf-8", errors="replace"), Reject("invalid_python")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node, clean=True) or ""  # clean: inspect.cleandoc
                summary = doc.split("\n\n")[0].strip()
                if len(summary) >= MIN_DOCSTRING_CHARS:
                    found.append((f"{path}:{node.lineno}", _signature(node), summary))
    summaries = sorted({s for _, _, s in found})
    index = {s: i for i, s in enumerate(summaries)}
    rng = random.Random(seed)
    for location, signature, summary in found:
        prompt = [_msg("user", DOCSTRING_PROMPT + signature)]
        if kind == "sft":
            record = {"messages": [*prompt, _msg("assistant", summary)]}
        else:
            chosen = summary
            if cfg.negatives == "shuffled":
                # Word order only: the first and last words stay (the capital and the full stop tell nothing)
                # and both answers are on one line, so only fluency tells them apart, which a small model
                # learns. Fewer than 4 words, or a shuffle that changed nothing: a same_answer reject.
                words = chosen.split()
                chosen, middle = " ".join(words), words[1:-1]
                rng.shuffle(middle)
                rejected = " ".join(words[:1] + middle + words[-1:])
            else:  # any other distinct summary (with a single one this picks itself: a same_answer reject)
                rejected = summaries[(index[summary] + 1 + rng.randrange(max(len(summaries) - 1, 1))) % len(summaries)]
            record = {"prompt": prompt, "chosen": [_msg("assistant", chosen)],
                      "rejected": [_msg("assistant", rejected)]}
        yield location, json.dumps(record, ensure_ascii=False), record


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"
