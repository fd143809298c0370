"""Tokenize and pack documents into fixed-length samples, and read them back from any offset.

On disk (`packed/`):
  index.json                         format, sample_len, dtypes, special ids, shard list per split
  <split>/<source>-<part>.tokens.npy     (num_samples, sample_len) token ids
  <split>/<source>-<part>.positions.npy  (num_samples, sample_len) position of each token in its document

  <split>/<source>-<part>.<NAME>.npy     (num_samples,) float64: pack.columns' per-sample values (below)

Documents are concatenated with EOS after each and cut every `sample_len = seq_len + 1` tokens (a
sample gives seq_len input/target pairs). A position id of 0 starts a document segment: a new
document, or the part of a long document that continues in the next sample. Attention restricted to
a segment never crosses documents. Only the last sample of each shard is padded (pad id, position 0).

A column NAME of `pack.columns` (a numeric field of the records) becomes one value per sample: the mean of
its documents' values weighted by the tokens each has in the sample (EOS included), over the documents that
have a finite number there; NaN where none has. It is what `curriculum.score: column:NAME` orders by.
"""

from __future__ import annotations

import io
import json
import math
from bisect import bisect_right
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from lmfleet.data.mixing import unit_hash
from lmfleet.outputs import child, write_bytes
from lmfleet.uri import local_copy

INDEX_FORMAT = "lmfleet.packed/1"


@lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(local_copy(path, "tokenizer") / "tokenizer.json"))
    tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is text, not an EOS
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def pack_tokens(docs: list[list[int]], eos_id: int, pad_id: int, sample_len: int):
    """Concatenate docs (each followed by EOS) into (n, sample_len) tokens and segment positions."""
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    stream = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for d, s in zip(docs, starts, strict=True):
        stream[s : s + len(d)] = d
    stream[ends - 1] = eos_id
    n = -(-len(stream) // sample_len)
    real = len(stream)
    tokens = np.full(n * sample_len, pad_id, dtype=np.int64)
    tokens[:real] = stream
    idx = np.arange(n * sample_len)
    seg_start = np.zeros(n * sample_len, dtype=bool)
    seg_start[starts] = True
    seg_start[::sample_len] = True
    seg_start[real:] = True  # padding: every pad token is its own segment
    positions = idx - np.maximum.accumulate(np.where(seg_start, idx, 0))
    return tokens.reshape(n, sample_len), positions.reshape(n, sample_len), real


def sample_means(values: np.ndarray, lengths: np.ndarray, sample_len: int, n: int) -> np.ndarray:
    """Per sample of pack_tokens' (n, sample_len) cut of documents with these `lengths` (EOS included): the
    mean of the documents' `values` weighted by their tokens in the sample, over documents with a finite value;
    NaN where none. Summed over the pieces a document has in a sample (O(documents + samples)); prefix sums
    over the stream would cost ~1e-12 relative by cancellation and split ties of samples inside one document."""
    if n == 0:
        return np.empty(0)
    ends = np.cumsum(lengths)
    cuts = np.union1d(ends - lengths, np.arange(n) * sample_len)  # where a piece starts: a document or a sample
    size = np.diff(np.append(cuts, ends[-1]))
    doc = np.searchsorted(ends, cuts, side="right")
    ok = np.isfinite(values[doc])
    sample = cuts // sample_len
    weighted = np.bincount(sample, weights=np.where(ok, values[doc], 0.0) * size, minlength=n)
    counted = np.bincount(sample, weights=ok * size, minlength=n)
    out = np.full(n, np.nan)
    np.divide(weighted, counted, out=out, where=counted > 0)
    return out


def column_values(meta: list[str], name: str) -> np.ndarray:
    """The field `name` of each record's meta JSON as a float; NaN where it is missing, not a number or not
    finite (true / false count as 1 / 0)."""
    out = np.full(len(meta), np.nan)
    for i, m in enumerate(meta):
        x = json.loads(m).get(name) if m and m != "{}" else None
        if isinstance(x, int | float) and math.isfinite(x):
            out[i] = x
    return out


SHARD_SCHEMA = pa.schema([("split", pa.string()), ("source", pa.string()), ("part", pa.int64()), ("stem", pa.string()),
                          ("num_samples", pa.int64()), ("docs", pa.int64()), ("real_tokens", pa.int64()),
                          ("pad_tokens", pa.int64()),
                          ("column_gaps", pa.string())])  # JSON {column: [docs, samples] without a value}


def _save(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def pack_group(table: pa.Table, tokenizer_dir: str, out_dir: str, sample_len: int, eos_id: int, pad_id: int,
               vocab_size: int, seed: int, columns: tuple[str, ...] = ()) -> pa.Table:
    """Pack one (split, source, part) group into one shard in `out_dir` (a path or URI: the task writes it
    there itself), with a file per column of `columns`; returns its metadata row."""
    split, source, part = table["split"][0].as_py(), table["source"][0].as_py(), table["part"][0].as_py()
    # Seeded document order, independent of how Ray laid out blocks; each (document, epoch) copy gets
    # its own place, so repeats of an upsampled document are spread out, not packed side by side.
    uid = table["uid"].to_numpy() ^ (table["epoch"].to_numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    order = np.argsort(unit_hash(uid, seed, epoch=-2), kind="stable")
    texts = table["text"].take(pa.array(order)).to_pylist()
    encoded = _load_tokenizer(tokenizer_dir).encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encoded]
    tokens, positions, real = pack_tokens(ids, eos_id, pad_id, sample_len)
    stem = f"{source}-{part:05d}"
    _save(child(out_dir, split, f"{stem}.tokens.npy"), tokens.astype(token_dtype(vocab_size)))
    _save(child(out_dir, split, f"{stem}.positions.npy"), positions.astype(np.uint32 if sample_len > 2**16 else np.uint16))
    gaps = {}
    if columns:
        meta = table["meta"].take(pa.array(order)).to_pylist()
        lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        for name in columns:
            values = column_values(meta, name)
            means = sample_means(values, lengths, sample_len, len(tokens))
            _save(child(out_dir, split, f"{stem}.{name}.npy"), means)
            gaps[name] = [int(np.isnan(values).sum()), int(np.isnan(means).sum())]
    return pa.table({
        "split": [split], "source": [source], "part": [part], "stem": [f"{split}/{stem}"],
        "num_samples": [len(tokens)], "docs": [len(texts)], "real_tokens": [real],
        "pad_tokens": [tokens.size - real], "column_gaps": [json.dumps(gaps)],
    }, schema=SHARD_SCHEMA)


def write_index(out_dir: Path, shards: list[dict], meta: dict) -> dict:
    """index.json: shards in a fixed order (split, source, part) with their global sample offsets."""
    index = {"format": INDEX_FORMAT, **meta, "splits": {}}
    for split in sorted({s["split"] for s in shards}):
        offset, entries = 0, []
        for s in sorted((s for s in shards if s["split"] == split), key=lambda s: (s["source"], s["part"])):
            entries.append({"source": s["source"], "tokens": f"{s['stem']}.tokens.npy",
                            "positions": f"{s['stem']}.positions.npy", "num_samples": s["num_samples"],
                            "offset": offset, "real_tokens": s["real_tokens"], "pad_tokens": s["pad_tokens"],
                            **({"columns": {c: f"{s['stem']}.{c}.npy" for c in meta["columns"]}}
                               if meta.get("columns") else {})})
            offset += s["num_samples"]
        index["splits"][split] = {"num_samples": offset, "shards": entries}
    (out_dir / "index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return index


class PackedDataset:
    """Random access to packed samples of one split: `ds[i] -> (tokens, positions)` as int64 arrays.

    Shards are memory-mapped on first use, so a training worker can start at any sample offset
    (exact resume) and reads only what it touches. `source_ranges()` gives each source's global
    sample ranges, for per-source sampling (dynamic mixing).
    """

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.index = json.loads((self.root / "index.json").read_text(encoding="utf-8"))
        if self.index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.root}/index.json: not an lmfleet packed index ({self.index.get('format')})")
        if split not in self.index["splits"]:
            raise ValueError(f"{self.root}: no split {split!r}; has {sorted(self.index['splits'])}")
        self.shards = self.index["splits"][split]["shards"]
        self._offsets = [s["offset"] for s in self.shards]
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.sample_len = self.index["sample_len"]
        self._len = sum(s["num_samples"] for s in self.shards)

    def __len__(self) -> int:
        return self._len

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._arrays:
            s = self.shards[k]
            self._arrays[k] = (np.load(self.root / s["tokens"], mmap_mode="r"),
                               np.load(self.root / s["positions"], mmap_mode="r"))
        return self._arrays[k]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        k = bisect_right(self._offsets, i) - 1
        tokens, positions = self._shard(k)
        j = i - self.shards[k]["offset"]
        return tokens[j].astype(np.int64), positions[j].astype(np.int64)

    def source_ranges(self) -> dict[str, list[tuple[int, int]]]:
        ranges: dict[str, list[tuple[int, int]]] = {}
        for s in self.shards:
            ranges.setdefault(s["source"], []).append((s["offset"], s["offset"] + s["num_samples"]))
        return ranges
