"""Readers: input files -> rows of `id, source, text, meta` or quarantined rejects with a reason.

A reader never raises on a bad record: it yields a reject row (reason, location, a prefix of the raw
input) so the job finishes and the report counts every record. Only a missing input path is an
error, raised by `expand_paths` before any work starts.

Row schema (ROW_SCHEMA): text is the normalized text for kept rows, None for rejects; meta is a JSON
object of the record's other fields, so heterogeneous sources share one Parquet schema losslessly.
"""

from __future__ import annotations

import ast
import errno
import fnmatch
import glob
import hashlib
import itertools
import json
import lzma
import math
import os
import re
import sysconfig
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from lmfleet import uri
from lmfleet.data import decontaminate, language, pii, quality
from lmfleet.data.config import FilterConfig, NormalizeConfig, SourceConfig
from lmfleet.errors import InputError

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("source_index", pa.int32()),
        ("text", pa.string()),
        ("meta", pa.string()),
        ("location", pa.string()),
        ("reject_reason", pa.string()),
        ("raw", pa.string()),
        ("content_hash", pa.string()),
        ("uid", pa.uint64()),
        ("pii", pa.string()),  # JSON {kind: matches} when filter.pii found any (masked or dropped), else null
        ("contaminated_by", pa.string()),  # JSON list of the evaluation files a `contaminated` reject matched
        ("lines_removed", pa.string()),  # JSON {rule: lines} when filter.c4 edited the document, else null
    ]
)
QUALITY_REASONS = (
    "gopher_few_words", "gopher_many_words", "gopher_short_words", "gopher_long_words", "gopher_symbols",
    "gopher_bullet_lines", "gopher_ellipsis_lines", "gopher_non_alpha", "gopher_stop_words",
    "repetition_lines", "repetition_line_chars", "repetition_paragraphs", "repetition_paragraph_chars",
    "repetition_top_{n}gram", "repetition_duplicate_{n}gram",
    "c4_lorem_ipsum", "c4_curly_bracket", "c4_few_sentences",
)
REJECT_REASONS = (
    "invalid_json",
    "invalid_utf8",
    "invalid_unicode",  # valid JSON whose strings hold lone surrogates ("\ud800"): not encodable as UTF-8
    "damaged_file",  # a truncated or corrupt file (gzip, Parquet, ...): records before the damage are kept
    "invalid_python",
    "not_an_object",
    "missing_text",
    "text_not_string",
    "empty_text",
    "too_short",
    "too_long",
    *QUALITY_REASONS,  # filter.gopher, filter.repetition, filter.c4 (lmfleet.data.quality)
    "language_{code}", "language_uncertain",  # filter.language (lmfleet.data.language)
    "pii",  # filter.pii: drop
    "contaminated",  # shares an n-gram with an evaluation document (decontaminate)
)
RAW_PREFIX = 2000  # chars of a rejected record kept in rejects/, enough to see what was wrong
ROWS_PER_BATCH = 5000

_FORMAT_SUFFIXES = {
    "jsonl": (".jsonl", ".ndjson"),
    "json": (".json",),
    "parquet": (".parquet",),
    "text": (".txt", ".md", ".rst"),
    "python_docstrings": (".py",),
}


def with_compressions(suffixes: tuple[str, ...]) -> tuple[str, ...]:
    """Each suffix as it is and with each compression suffix (.jsonl.gz, .jsonl.zst, ...)."""
    return tuple(s + c for s in suffixes for c in ("", *uri.COMPRESSIONS))


_SUFFIXES = {fmt: with_compressions(sfx) if fmt in ("jsonl", "json", "text") else sfx
             for fmt, sfx in _FORMAT_SUFFIXES.items()}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: ids are relative to it."""
    return Path(uri.glob_base(pattern))


def _patterns(src: SourceConfig) -> list[str]:
    return src.paths or ([str(stdlib_dir())] if src.format == "python_docstrings" else [])


def named_paths(src: SourceConfig) -> list[Path | str]:
    """What the source's paths name: files, folders, and the folder part of each glob (URIs as strings)."""
    return [(uri.glob_base(p) if glob.has_magic(p) else p) if uri.is_uri(p)
            else _glob_base(p) if glob.has_magic(p) else Path(p) for p in _patterns(src)]


def _bad_link(src: SourceConfig, path: Path) -> InputError:
    """The error for a symbolic link that leads nowhere: a loop, or a missing target."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return InputError(f"source {src.name!r}: {path} is a symbolic link loop")
    return InputError(f"source {src.name!r}: {path} is a symbolic link to {os.readlink(path)!r}, which does not exist")


def _is_hf_dir(folder: str) -> bool:
    return any(uri.info(uri.join(folder, f)).is_file for f in ("dataset_info.json", "dataset_dict.json"))


def _expand_uri(src: SourceConfig, pattern: str, wanted: tuple[str, ...]) -> list[uri.FileRef]:
    """The files of one URI of a source: an object, a prefix (files with the wanted suffixes under it)
    or a glob; an hf_dataset URI names a save_to_disk dir (one entry, sized by its files)."""
    from pyarrow import fs

    key = f"sources.{src.name}.paths"
    if glob.has_magic(pattern):
        if src.format == "hf_dataset":  # the save_to_disk dirs among the matched prefixes
            return [_hf_ref(d.path, d.rel, key) for d in uri.glob_files(pattern, key, dirs=True) if _is_hf_dir(d.path)]
        refs = uri.glob_files(pattern, key)
        return [r for r in refs if src.format != "python_docstrings" or r.path.endswith(".py")]
    found = uri.info(pattern, key)
    if found.type == fs.FileType.NotFound:
        raise uri.not_found(key, pattern)
    if src.format == "hf_dataset":
        if found.type != fs.FileType.Directory or not _is_hf_dir(pattern):
            raise InputError(f"source {src.name!r}: {pattern} is not a dataset saved with datasets' save_to_disk")
        return [_hf_ref(pattern, pattern.rstrip("/").rsplit("/", 1)[-1], key)]
    refs = uri.refs_under(pattern, key)
    if found.type == fs.FileType.File:
        return refs
    refs = [r for r in refs if r.path.endswith(wanted) and fnmatch.fnmatchcase(r.path.rsplit("/", 1)[-1], src.glob)]
    if not refs:
        raise InputError(f"source {src.name!r}: no {'/'.join(wanted)} files under {pattern}")
    return refs


def _hf_ref(folder: str, rel: str, key: str) -> uri.FileRef:
    """A save_to_disk dir (path or URI) as one input: its files' total size and newest mtime."""
    files = uri.files_under(folder, key)
    return uri.FileRef(folder, rel, sum(f.size for f in files), max((f.mtime_ns or 0) for f in files))


def expand_paths(src: SourceConfig, suffixes: tuple[str, ...] | None = None) -> list[uri.FileRef]:
    """Each input file of a source (absolute path or URI, id path, size, mtime), in order, each once.

    The id path is relative to what the user named (a folder, the folder part of a glob, or the
    file's own folder), so ids stay the same when the data moves or other files are added.
    `suffixes` overrides the file endings looked for in folders (default: those of src.format).
    Raises InputError naming the path that matched nothing or cannot be read.
    """
    files: dict[str, uri.FileRef] = {}
    wanted = suffixes or _SUFFIXES.get(src.format, ())
    for pattern in _patterns(src):
        if uri.is_uri(pattern):
            for ref in _expand_uri(src, pattern, wanted):
                files.setdefault(ref.path, ref)
            continue
        if glob.has_magic(pattern):
            base = _glob_base(pattern)
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        else:
            base = Path(pattern) if Path(pattern).is_dir() else Path(pattern).parent
            matches = [Path(pattern)] if Path(pattern).exists() else []
        if not matches:
            if os.path.islink(pattern):
                raise _bad_link(src, Path(pattern))
            raise InputError(f"source {src.name!r}: input path {pattern!r} does not exist")
        for m in matches:
            if src.format == "hf_dataset":
                if not (m / "dataset_info.json").exists() and not (m / "dataset_dict.json").exists():
                    raise InputError(
                        f"source {src.name!r}: {m} is not a dataset saved with datasets' save_to_disk"
                    )
                found = [m]
            elif m.is_dir():
                found = sorted(
                    p for p in m.rglob(src.glob) if p.name.endswith(wanted) and "site-packages" not in p.parts
                    and (p.is_file() or p.is_symlink())
                )
                for p in found:
                    if not p.exists():  # a link to nothing: an input the user expects to be read
                        raise _bad_link(src, p)
                if not found and not glob.has_magic(pattern):
                    raise InputError(f"source {src.name!r}: no {'/'.join(wanted)} files under {m}")
            elif m.is_symlink() and not m.exists():  # a glob matched a link to nothing
                raise _bad_link(src, m)
            else:
                found = [m]
            for f in found:
                rel = str(f.relative_to(base)) if f != base else f.name
                path = f.resolve()
                if str(path) not in files:
                    files[str(path)] = _local_ref(src, path, rel)
    return list(files.values())


def _local_ref(src: SourceConfig, path: Path, rel: str) -> uri.FileRef:
    if path.is_dir():  # an hf_dataset dir
        return _hf_ref(str(path), rel, f"sources.{src.name}.paths")
    if not _readable(path):
        raise InputError(f"source {src.name!r}: cannot read {path}")
    st = path.stat()
    return uri.FileRef(str(path), rel, st.st_size, st.st_mtime_ns)


def check_hf_split(src: SourceConfig, path: str) -> None:
    """A saved DatasetDict must have the configured split."""
    dict_file = uri.join(path, "dataset_dict.json")
    if uri.info(dict_file).is_file:
        splits = json.loads(uri.read_bytes(dict_file).decode("utf-8")).get("splits", [])
        if src.split not in splits:
            raise InputError(f"source {src.name!r}: {path} has no split {src.split!r}; it has {splits}")


def _readable(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


_RUNS = re.compile(r"[^\S\n]{2,}|[^\S \n]")  # whitespace other than a lone space or a newline
_EDGES = re.compile(r" ?\n ?")
_BLANKS = re.compile(r"\n{3,}")
# What str.isspace (and re's \s) holds besides " " and "\n"; ASCII text can hold the first 8 (the 8th,
# "\r", is replaced before the test).
_ODD_SPACES = ("\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\r", "\x85", "\xa0", "\u1680",
               *map(chr, range(0x2000, 0x200B)), "\u2028", "\u2029", "\u202f", "\u205f", "\u3000")
_ODD_SET = frozenset(_ODD_SPACES)


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """NFKC; CRLF / CR -> LF, other whitespace runs within a line -> one space, lines trimmed, at most one
    blank line. Each regex runs only when a substring test finds work for it: Python's re scans at
    ~50 ns a character, and most documents need none (C4: 4.4 -> 1.3 s for 18,000 documents)."""
    if cfg.nfkc and not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    if cfg.whitespace:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "  " in text or (_ascii_odd_space(text) if text.isascii() else not _ODD_SET.isdisjoint(text)):
            text = _RUNS.sub(" ", text)
        if " \n" in text or "\n " in text:
            text = _EDGES.sub("\n", text)
        if "\n\n\n" in text:
            text = _BLANKS.sub("\n\n", text)
        text = text.strip()
    return text


def _ascii_odd_space(text: str) -> bool:
    # _ODD_SPACES[:7], the ones ASCII holds, tested one by one: any() over a generator cost 2 us a record.
    return ("\t" in text or "\x0b" in text or "\x0c" in text or "\x1c" in text or "\x1d" in text
            or "\x1e" in text or "\x1f" in text)


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def doc_uid(source: str, doc_id: str) -> int:
    """A 64-bit integer id of (source, id) for the array-based dedup steps."""
    return int.from_bytes(hashlib.blake2b(f"{source}\0{doc_id}".encode(), digest_size=8).digest(), "little")


_MISSING = object()


class RecordBuilder:
    """Turns raw records of one source into schema rows, classifying bad ones."""

    def __init__(self, src: SourceConfig, source_index: int, norm: NormalizeConfig, filt: FilterConfig,
                 evals: decontaminate.EvalNgrams | None = None):
        self.src, self.source_index, self.norm, self.filt, self.evals = src, source_index, norm, filt, evals
        self.fields = [src.text_field] if isinstance(src.text_field, str) else list(src.text_field)
        self.rows: list[dict] = []

    def reject(self, location: str, reason: str, raw: str | bytes, doc_id: str | None = None,
               pii_found: str | None = None) -> None:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        self.rows.append(
            {"id": printable(doc_id or location), "source": self.src.name, "source_index": self.source_index,
             "location": printable(location), "reject_reason": reason, "raw": printable(raw[:RAW_PREFIX]),
             "pii": pii_found}
        )

    def record(self, location: str, default_id: str, obj: dict) -> None:
        """A parsed record (dict): extract id and text, validate, normalize."""
        fields = self.fields
        doc_id = default_id
        if self.src.id_field and obj.get(self.src.id_field) not in (None, ""):
            doc_id = str(obj[self.src.id_field])
        if len(fields) == 1:  # the usual case, without the generators below (~2 us a record)
            text = obj.get(fields[0], _MISSING)
            if text is _MISSING:
                return self.reject(location, "missing_text", _dump(obj), doc_id)
            if text is not None and not isinstance(text, str):
                return self.reject(location, "text_not_string", _dump(obj), doc_id)
            text = "" if not text or text.isspace() else text
        else:
            if not any(f in obj for f in fields):
                return self.reject(location, "missing_text", _dump(obj), doc_id)
            values = [obj.get(f) for f in fields]
            if any(v is not None and not isinstance(v, str) for v in values):
                return self.reject(location, "text_not_string", _dump(obj), doc_id)
            text = "\n\n".join(v for v in values if v and v.strip())
        meta = {k: v for k, v in obj.items() if k not in fields and k != self.src.id_field}
        # The uid comes from the record's place, not the user's id, which may repeat across files.
        self.text(location, doc_id, text, meta, key=default_id)

    def text(self, location: str, doc_id: str, text: str, meta: dict | None = None, key: str | None = None) -> None:
        """A document; `key` (default: doc_id) is its unique, location-based identity for the uid."""
        norm = normalize_text(text, self.norm)
        reason = None
        if not norm or norm.isspace():
            reason = "empty_text"
        elif len(norm) < self.filt.min_chars:
            reason = "too_short"
        elif len(norm) > self.filt.max_chars:
            reason = "too_long"
        # Most records carry no metadata: "{}" without json.dumps (2.8 us of a short record's ~30 us read).
        meta_json = _dump(meta) if meta else "{}"
        if not reason and not (valid_unicode(norm) and valid_unicode(meta_json)):
            reason = "invalid_unicode"
        if not reason and self.filt.gopher is not None:
            reason = quality.gopher(norm, self.filt.gopher)
        if not reason and self.filt.repetition is not None:
            reason = quality.repetition(norm, self.filt.repetition)
        edits = None
        if not reason and self.filt.c4 is not None:  # after Gopher's, as FineWeb orders them
            norm, reason, removed = quality.c4(norm, self.filt.c4)
            edits = json.dumps(dict(sorted(removed.items()))) if removed and not reason else None
        if not reason and self.filt.language is not None:
            reason = language.check(norm, self.filt.language)
        found = None
        if not reason and self.filt.pii != "off":
            masked, counts = pii.scan(norm, mask=self.filt.pii == "mask")
            if counts:
                found = json.dumps(counts, sort_keys=True)
                reason, norm = ("pii", norm) if self.filt.pii == "drop" else (None, masked)
        if reason:
            return self.reject(location, reason, text, doc_id, found)
        self.rows.append(
            {"id": printable(doc_id), "source": self.src.name, "source_index": self.source_index, "text": norm,
             "meta": meta_json, "location": printable(location), "content_hash": content_hash(norm),
             "uid": doc_uid(self.src.name, printable(key or doc_id)), "pii": found, "lines_removed": edits}
        )

    def full(self) -> bool:
        """Whether a batch is ready for `flush` (tested per record: a generator per record cost ~4 us)."""
        return len(self.rows) >= ROWS_PER_BATCH

    def flush(self, force: bool = False) -> Iterator[pa.Table]:
        if self.rows and (force or len(self.rows) >= ROWS_PER_BATCH):
            if self.evals is not None:
                self._decontaminate()
            yield pa.Table.from_pylist(self.rows, schema=ROW_SCHEMA)
            self.rows = []

    def _decontaminate(self) -> None:
        """The documents of this batch that share an n-gram with an evaluation file, as rejects (all the
        batch's texts hashed at once)."""
        docs = [i for i, r in enumerate(self.rows) if r.get("text") is not None]
        found = decontaminate.contaminated([self.rows[i]["text"] for i in docs], self.evals)
        for i, files in zip(docs, found, strict=True):
            if files:
                r = self.rows[i]
                self.rows[i] = {"id": r["id"], "source": r["source"], "source_index": r["source_index"],
                                "location": r["location"], "reject_reason": "contaminated",
                                "raw": r["text"][:RAW_PREFIX], "contaminated_by": json.dumps(files)}


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def valid_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8: JSON's "\\ud800" escapes decode to lone surrogates, which do not."""
    if text.isascii():  # a flag CPython keeps: no pass over the text
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(text: str) -> str:
    """`text` with lone surrogates (from JSON escapes or undecodable file names) as backslash escapes."""
    return text if valid_unicode(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


# What reading a damaged file raises part-way: truncated or corrupt gzip (EOFError, BadGzipFile, zlib.error),
# a corrupt Parquet file (ArrowException), an I/O error. The records read before it are kept.
DAMAGED = (EOFError, OSError, zlib.error, lzma.LZMAError, pa.ArrowException)


def byte_ranges(size: int, split_bytes: int | None) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about split_bytes each covering a file of `size` bytes (one when small)."""
    n = 1 if not split_bytes or size <= split_bytes else math.ceil(size / split_bytes)
    bounds = [size * i // n for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def count_newlines(path: str, start: int, end: int) -> int:
    """Newline bytes in [start, end) of an uncompressed file: what a range's first line number needs."""
    n, left = 0, end - start
    with uri.open_raw(path, start) as f:
        while left > 0:
            chunk = f.read(min(left, uri.READ_BUFFER))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def first_lines(ranges: list[tuple[int, int]], newlines: list[int]) -> list[int]:
    """The number of the first line owned by each range (a line belongs to the range holding its first
    byte), from `newlines[k]` = newline bytes in [start_k - 1, start_{k+1} - 1) (k < last; [0, ..) for k = 0).
    The first line owned by range k > 0 begins after the first newline at or after start_k - 1."""
    out, before = [1], 0
    for k in range(1, len(ranges)):
        before += newlines[k - 1]
        out.append(before + 2)
    return out


def newline_spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans whose newline counts `first_lines` takes: the ranges shifted back by one byte."""
    starts = [0] + [s - 1 for s, _ in ranges[1:]]
    return list(itertools.pairwise(starts))


def _lines_from(f, start: int) -> Iterator[tuple[int, bytes]]:
    """(offset, raw line) of the lines of an open file from the first one starting at or after `start`
    (the line holding byte start - 1 belongs to whoever reads the range before)."""
    pos = 0
    if start > 0:
        f.seek(start - 1)
        pos = start - 1 + len(f.readline())
    for raw in f:
        yield pos, raw
        pos += len(raw)


def _range_lines(f, start: int, end: int | None, first_line: int) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the lines starting in [start, end) of an open file; end None: to EOF."""
    for lineno, (pos, raw) in enumerate(_lines_from(f, start), first_line):
        if end is not None and pos >= end:
            break
        yield lineno, raw


# Text read by blocks: a file's blocks are `re.split(r"\n\s*\n", text)`, numbered from 0 with the empty ones
# counted (the ids). In lines, a separator is a run of whitespace-only lines holding two newlines or more:
# it starts at the newline ending the line P before the run (P has text, or P is line 1 and whitespace
# itself) and ends at the run's last newline, so a block is whole lines less the last one's newline. A range
# of a split file reads the blocks starting in it; a first pass over every range (`scan_text_range`) counts
# the separators starting in it (what the next ranges' block numbers need) and says whether its last line
# was blank and line 1 (what the next range's first line needs to know whether a block starts there).
# `str.strip` and the regex's `\s` agree on every code point (checked: Python 3.12).


def _text_lines(f, start: int, end: int | None) -> Iterator[tuple[str, bool, bool]]:
    """(decoded line, owned: starts in [start, end), is line 1) from the first line starting at or
    after start to EOF; UnicodeDecodeError on bytes that are not UTF-8 (a BOM on line 1 is not content)."""
    for pos, raw in _lines_from(f, start):
        yield raw.decode("utf-8-sig" if pos == 0 else "utf-8"), end is None or pos < end, pos == 0


def _blocks(lines: Iterator[tuple[str, bool, bool]], prev: tuple[bool, bool] | None, base: int,
            keep: bool, tally: dict) -> Iterator[tuple[int, str]]:
    """(number, text) of the blocks starting in the owned lines (keep=False: none, scan only). `prev`:
    (blank, is line 1) of the line before the first one (None at the file's start); `base`: separators
    before it. `tally` gets `separators` (starting in owned lines) and `last` (blank, is line 1) of the
    last owned line."""
    seps, cur, cur_no = 0, None, 0
    p_blank, p_line1, p_owned = (prev[0], prev[1], False) if prev else (None, False, False)
    for text, owned, line1 in lines:
        blank = not text.strip()
        if p_blank is not None and blank and text.endswith("\n") and (not p_blank or p_line1):
            seps += p_owned  # a separator starts at the previous line's newline
            if cur is not None:
                yield cur_no, "".join(cur)[:-1]
                cur = None
        if not owned and cur is None:
            break
        if keep and (line1 or (p_blank and not blank and not p_line1)):
            cur, cur_no = [], base + seps
        if cur is not None:
            cur.append(text)
        p_blank, p_line1, p_owned = blank, line1, owned
        if owned:
            tally["last"] = (blank, line1)
    if cur is not None:
        yield cur_no, "".join(cur)
    tally["separators"] = seps


def scan_text_range(path: str, start: int, end: int) -> dict:
    """The first pass over one byte range of a text file read by blocks: {separators, last, valid}
    (valid: every line starting in it, and the next, decodes as UTF-8)."""
    tally: dict = {"last": None}
    try:
        with uri.open_raw(path, start) as f:
            for _ in _blocks(_text_lines(f, start, end), None, 0, False, tally):
                pass
    except UnicodeDecodeError:
        return {"separators": 0, "last": None, "valid": False}
    return {**tally, "valid": True}


def read_file(task: dict, norm: NormalizeConfig, filt: FilterConfig,
              evals: decontaminate.EvalNgrams | None = None) -> Iterator[pa.Table]:
    """Yield row tables for one input file, one byte range of it (task keys start, end, first_line) or
    one HF dataset dir. A file that turns out damaged part-way keeps the records read before the damage
    and adds one `damaged_file` reject naming the file and error. `evals`: quarantine the documents that
    share an n-gram with these (lmfleet.data.decontaminate)."""
    src = SourceConfig.model_validate_json(task["source"])
    rb = RecordBuilder(src, task["source_index"], norm, filt, evals)
    path = task["path"]
    try:
        if "first_block" in task:
            yield from _text_range(task, f"{src.name}/{task['relpath']}", rb)
        else:
            span = (task.get("start", 0), task.get("end"), task.get("first_line", 1))
            yield from _read_records(src, path, f"{src.name}/{task['relpath']}", rb, span)
    except DAMAGED as err:
        rb.reject(path, "damaged_file", f"{type(err).__name__}: {err} (records before this point were read)")
    yield from rb.flush(force=True)


def _text_range(task: dict, prefix: str, rb: RecordBuilder) -> Iterator[pa.Table]:
    """The blocks starting in one byte range of a text file (numbered as in a whole-file read)."""
    path, tally = task["path"], {}
    prev = tuple(task["prev_line"]) if task["prev_line"] is not None else None
    try:
        with uri.open_raw(path, task["start"]) as f:
            for i, block in _blocks(_text_lines(f, task["start"], task["end"]), prev, task["first_block"], True, tally):
                if block.strip():
                    rb.text(f"{path}#block{i}", f"{prefix}:{i}", block)
                    if rb.full():
                        yield from rb.flush()
    except UnicodeDecodeError as err:  # the first pass found none: the file changed since
        rb.reject(path, "invalid_utf8", f"{err} (at or after byte {task['start']}; the file changed while read)")


def _read_records(src: SourceConfig, path: str, prefix: str, rb: RecordBuilder,
                  span: tuple[int, int | None, int] = (0, None, 1)) -> Iterator[pa.Table]:
    if src.format == "jsonl":
        start, end, first_line = span
        with (uri.open_raw(path) if start or end is not None else uri.open_input(path)) as f:
            for lineno, raw in _range_lines(f, start, end, first_line):
                if not raw.strip():
                    continue  # blank lines separate nothing in JSONL; they are not records
                loc = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is not content
                except UnicodeDecodeError:
                    rb.reject(loc, "invalid_utf8", raw)
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    rb.reject(loc, "invalid_json", line)
                    continue
                if not isinstance(obj, dict):
                    rb.reject(loc, "not_an_object", line)
                    continue
                rb.record(loc, f"{prefix}:{lineno}", obj)
                if rb.full():
                    yield from rb.flush()
    elif src.format == "json":
        raw = uri.read_bytes(path)
        try:
            data = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError:
            rb.reject(str(path), "invalid_utf8", raw)
            data = None
        except json.JSONDecodeError:
            rb.reject(str(path), "invalid_json", raw)
            data = None
        if isinstance(data, dict):
            data = [data]
        elif data is not None and not isinstance(data, list):
            rb.reject(str(path), "not_an_object", _dump(data))
            data = None
        for i, obj in enumerate(data or []):
            loc = f"{path}[{i}]"
            if isinstance(obj, dict):
                rb.record(loc, f"{prefix}:{i}", obj)
            else:
                rb.reject(loc, "not_an_object", _dump(obj))
            if rb.full():
                yield from rb.flush()
    elif src.format == "parquet":
        import pyarrow.parquet as pq

        row = 0
        with uri.open_arrow(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH):
                for obj in batch.to_pylist():
                    rb.record(f"{path}#{row}", f"{prefix}:{row}", obj)
                    row += 1
                if rb.full():
                    yield from rb.flush()
    elif src.format == "hf_dataset":
        import datasets

        ds = datasets.load_from_disk(str(uri.local_copy(path, f"sources.{src.name}.paths")))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
        row = 0
        for batch in ds.data.table.to_batches(max_chunksize=ROWS_PER_BATCH):
            for obj in batch.to_pylist():
                rb.record(f"{path}#{row}", f"{prefix}:{row}", obj)
                row += 1
            if rb.full():
                yield from rb.flush()
    elif src.format == "text":
        raw = uri.read_bytes(path)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            rb.reject(str(path), "invalid_utf8", raw)
            text = None
        if text is not None and src.text_unit == "file":
            rb.text(str(path), prefix, text)
        elif text is not None:
            for i, block in enumerate(re.split(r"\n\s*\n", text)):
                if block.strip():
                    rb.text(f"{path}#block{i}", f"{prefix}:{i}", block)
                    if rb.full():
                        yield from rb.flush()
    elif src.format == "python_docstrings":
        yield from _docstrings(path, prefix, rb)


def _docstrings(path: str, prefix: str, rb: RecordBuilder) -> Iterator[pa.Table]:
    """Module, class and function docstrings of a Python file; functions carry their signature."""
    raw = uri.read_bytes(path)
    try:
        tree = ast.parse(raw, filename=path)
    except (SyntaxError, ValueError):
        rb.reject(str(path), "invalid_python", raw)
        return
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    seen: set[str] = set()
    while stack:
        node, qualname = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            doc_id = f"{prefix}:{qualname or '<module>'}"
            if doc_id in seen:  # redefinitions (property setters, overloads) share a name
                doc_id = f"{doc_id}@{node.lineno}"
            seen.add(doc_id)
            kind = type(node).__name__.removesuffix("Def").lower()
            meta = {"kind": kind, "qualname": qualname or "<module>", "file": str(path)}
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                meta["signature"] = f"{node.name}({ast.unparse(node.args)})"
            rb.text(f"{path}:{getattr(node, 'lineno', 1)}", doc_id, doc, meta)
        for child in reversed(getattr(node, "body", [])):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                stack.append((child, f"{qualname}.{child.name}" if qualname else child.name))
    if rb.full():
        yield from rb.flush()


def _one_task_why(src: SourceConfig, ref: uri.FileRef, split: int | None) -> str | None:
    """Why a file over read.split_bytes is read by one task; "" when it is split; None when under it."""
    if not split or ref.size <= split:
        return None
    if src.format == "jsonl" or (src.format == "text" and src.text_unit == "block"):
        codec = uri.compression(ref.path)
        return f"{codec} streams cannot be read from an offset" if codec else ""
    return {"text": "text_unit: file makes the whole file one document",
            "json": "a JSON file is parsed whole",
            "parquet": "Parquet files are read by one task (row groups are not split)",
            }.get(src.format, f"{src.format} inputs are read whole")


def plan_reads(sources: list[SourceConfig], files: dict[str, list[uri.FileRef]], split: int | None,
               run_all) -> tuple[list[dict], dict]:
    """Read tasks: one per file, or one per byte range of an uncompressed JSONL or block-text file over
    `split` bytes, each range's first line or block number from a first pass over every range
    (`run_all(fn, [args, ...])` -> results: Ray tasks in the stage). Also what the report says of it."""
    per_file, unsplit, jsonl, text = [], [], [], []
    for i, src in enumerate(sources):
        for ref in files[src.name]:
            if ref.size == 0:
                continue  # no record in it: counted by the stage, not read
            task = {"source": src.model_dump_json(), "source_index": i, "path": ref.path, "relpath": ref.rel}
            why = _one_task_why(src, ref, split)
            if why != "":
                per_file.append([task])
                if why:
                    unsplit.append({"file": ref.path, "bytes": ref.size, "why": why})
                continue
            group = [{**task, "start": a, "end": b} for a, b in byte_ranges(ref.size, split)]
            (jsonl if src.format == "jsonl" else text).append(len(per_file))
            per_file.append(group)
    spans = [(per_file[k], newline_spans([(t["start"], t["end"]) for t in per_file[k]])) for k in jsonl]
    counts = iter(run_all(count_newlines, [(g[0]["path"], a, b) for g, sp in spans for a, b in sp]))
    for group, sp in spans:
        ranges = [(t["start"], t["end"]) for t in group]
        for task, first in zip(group, first_lines(ranges, [next(counts) for _ in sp]), strict=True):
            task["first_line"] = first
    scans = iter(run_all(scan_text_range, [(t["path"], t["start"], t["end"]) for k in text for t in per_file[k]]))
    for k in text:
        group = per_file[k]
        found = [next(scans) for _ in group]
        if not all(s["valid"] for s in found):  # read whole, so that the file is rejected as one record
            per_file[k] = [{key: v for key, v in group[0].items() if key not in ("start", "end")}]
            unsplit.append({"file": group[0]["path"], "bytes": group[-1]["end"],
                            "why": "not UTF-8: rejected whole, as when read by one task"})
            continue
        blocks, prev = 0, None
        for task, scan in zip(group, found, strict=True):
            task["first_block"], task["prev_line"] = blocks, prev
            blocks += scan["separators"]
            prev = scan["last"] if scan["last"] is not None else prev
    tasks = [t for g in per_file for t in g]
    return tasks, {"tasks": len(tasks), "split_files": sum(len(g) > 1 for g in per_file), "split_bytes": split,
                   "unsplittable": unsplit}
