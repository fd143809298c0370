"""Benchmark decontamination: training documents that share a word n-gram (13 tokens by default, as
GPT-3's) with any evaluation document are quarantined (reason `contaminated`) and counted per evaluation
file.

Evaluation files: JSONL / JSON records (every string value of a record, joined, is one evaluation
document) or any other text file (one document); compressed ones are read as the data stage reads its
inputs. N-grams are the near-dedup shingles (lmfleet.data.minhash: NFKC, lowercase, Unicode `\\w+` tokens)
as 64-bit hashes with a fixed seed; a document shorter than `ngram` tokens is one shingle of all its
tokens, so it matches only a document of exactly those tokens. The evaluation files are read once, on
the driver (they are small); each read task gets their hashes from Ray's object store and checks its
documents a batch at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from lmfleet import uri
from lmfleet.data import minhash
from lmfleet.data.config import DecontaminateConfig
from lmfleet.errors import InputError

SEED = 0  # fixed: what counts as contaminated does not depend on the run's seed
SUFFIXES = (".jsonl", ".ndjson", ".json", ".txt", ".md")  # what a folder in `paths` is searched for


@dataclass(frozen=True)
class EvalNgrams:
    ngram: int
    files: tuple[str, ...]  # as the report names them: the path relative to what `paths` named
    hashes: tuple[np.ndarray, ...]  # per file: its documents' n-gram hashes, sorted, distinct


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def eval_documents(path: str) -> list[str]:
    """The evaluation documents of one file (InputError naming the file and line of a broken record)."""
    with uri.open_input(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"decontaminate.paths: {path} is not UTF-8 text ({err})") from None
    suffixes = [s for s in PurePosixPath(path.lower()).suffixes if s not in (".gz", ".zst", ".bz2", ".xz")]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".ndjson", ".json"):
        records = []
        if kind == ".json":
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(f"decontaminate.paths: {path}: invalid JSON ({err})") from None
            records = loaded if isinstance(loaded, list) else [loaded]
        else:
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise InputError(f"decontaminate.paths: {path}:{line_no}: invalid JSON ({err})") from None
        docs = ["\n".join(_strings(r)) for r in records]
    else:
        docs = [text]
    return [d for d in docs if d.strip()]


def load(cfg: DecontaminateConfig, refs: list) -> EvalNgrams:
    """Every evaluation file's n-gram hashes; `refs`: the files `cfg.paths` names (read.expand_paths with
    SUFFIXES). InputError for a file without text."""
    files, hashes = [], []
    for ref in refs:
        docs = eval_documents(ref.path)
        if not docs:
            raise InputError(f"decontaminate.paths: {ref.path} holds no text")
        files.append(ref.rel)
        hashes.append(np.unique(minhash.shingle_set_arrays(docs, ngram=cfg.ngram, seed=SEED)[0]))
    return EvalNgrams(cfg.ngram, tuple(files), tuple(hashes))


def contaminated(texts: list[str], ev: EvalNgrams) -> list[list[str]]:
    """For each text, the evaluation files it shares an n-gram with (empty: clean)."""
    values, offsets = minhash.shingle_set_arrays(texts, ngram=ev.ngram, seed=SEED)
    doc = np.repeat(np.arange(len(texts)), np.diff(offsets))
    found: list[list[str]] = [[] for _ in texts]
    for name, hashes in zip(ev.files, ev.hashes, strict=True):
        for i in np.unique(doc[np.isin(values, hashes)]).tolist():
            found[i].append(name)
    return found
