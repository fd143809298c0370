"""Local paths and object-store URIs behind one interface: list, glob, stat, open (decompressing by suffix).

Every read by URI goes through pyarrow's filesystems (what Ray Data and Ray Train use themselves), so a
local path, s3://, gs:// and abfs:// take the same code. Credentials and endpoints come only from the
environment (instance roles, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY,
...), never from a config. Local paths stay plain Python files: the fastest way to read them.

A whole tree that a library can only load from a local dir (packed data, a HF model dir, a `save_to_disk`
dataset) is copied into a node-local cache (`local_copy`), shared by the processes of one node and reused
while the objects' sizes and modification times match.

pyarrow's open_input_stream / open_output_stream (de)compress by file suffix unless told not to: lmfleet
passes compression=None and decodes itself, so the bytes of an object are the ones a user uploaded.
"""

from __future__ import annotations

import fcntl
import functools
import glob as _glob
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmfleet.errors import InputError

# The URI schemes pyarrow (and so Ray) opens as filesystems.
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")
# Compressions by file suffix. gzip, bz2 and xz use Python's own decoders, which hand over every record
# before a damaged point; zstd uses pyarrow's (Python 3.11 has none).
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
# Bytes per read from an object store: one ranged GET each, so a line-by-line reader makes few requests.
READ_BUFFER = 8 << 20


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def relative(base: str, rel: str) -> str:
    """`rel` (which may hold "..") taken from the folder `base`, a path or URI."""
    if not is_uri(base):
        return str((Path(base) / rel).resolve())
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"


def filesystem(path: str, key: str = "path"):
    """(pyarrow filesystem, path inside it) of a local path or URI; InputError naming `key` for a URI
    with an unknown scheme or one pyarrow cannot open (bad account name, no credentials file, ...)."""
    from pyarrow import fs

    if not is_uri(path):
        return fs.LocalFileSystem(), str(Path(path).resolve())
    scheme, rest = path.split("://", 1)
    if scheme.lower() not in SCHEMES:
        raise InputError(f"{key}: {path}: unknown URI scheme {scheme.lower()!r}; lmfleet reads local paths and "
                         f"{', '.join(s + '://' for s in SCHEMES)}")
    if scheme.lower() == "file":
        return fs.LocalFileSystem(), rest
    # The filesystem of the bucket (container, host), then the key as it is: a key may hold characters
    # a URI parser refuses (spaces, brackets of a glob), and one filesystem serves every key of a bucket.
    authority, _, inner = rest.partition("/")
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CLOUD_ENV)))
    try:
        filesys, root = _bucket_filesystem(f"{scheme}://{authority}", env)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError with the cloud SDK's message
        raise InputError(f"{key}: cannot open {path}: {err}") from None
    return filesys, f"{root.rstrip('/')}/{inner}" if inner else root


_CLOUD_ENV = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HADOOP_", "ARROW_")


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(root: str, env: tuple):
    """One filesystem per bucket and cloud environment (`env`: it holds endpoints and credentials)."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(root)


def to_uri(filesys, inner: str) -> str:
    """The URI (or local path) of `inner` in `filesys`, as a user would write it."""
    kind = filesys.type_name
    return inner if kind == "local" else f"{kind}://{inner}"


def not_found(key: str, path: str) -> InputError:
    """The error for a URI that names nothing: says whether the bucket itself is missing (or hidden from
    these credentials), which a typo in the bucket name or a missing role gives."""
    from pyarrow import fs

    if is_uri(path):
        filesys, inner = filesystem(path, key)
        bucket = inner.split("/", 1)[0]
        try:
            missing = filesys.get_file_info(bucket).type == fs.FileType.NotFound
        except OSError:
            missing = True
        if missing:
            return InputError(f"{key}: {path}: bucket {bucket!r} does not exist, or the credentials in this "
                              "environment cannot see it")
        return InputError(f"{key}: {path}: no such object or prefix")
    return InputError(f"{key}: input path {path!r} does not exist")


@dataclass(frozen=True)
class FileRef:
    """One input file: `path` (absolute local path or URI), `rel` (its id path: relative to what the user
    named), size and modification time (ns; what the up-to-date digest uses)."""

    path: str
    rel: str
    size: int
    mtime_ns: int


def info(path: str, key: str = "path"):
    """pyarrow FileInfo of a path or URI; InputError for an object store that refuses the request."""
    filesys, inner = filesystem(path, key)
    try:
        return filesys.get_file_info(inner)
    except OSError as err:
        raise InputError(f"{key}: cannot read {path}: {err}") from None


def _ref(filesys, file_info, rel: str) -> FileRef:
    mtime = file_info.mtime_ns if file_info.mtime_ns is not None else 0
    return FileRef(to_uri(filesys, file_info.path), rel, file_info.size or 0, mtime)


def files_under(path: str, key: str = "path") -> list:
    """FileInfos of every file under a URI prefix, sorted by path."""
    from pyarrow import fs

    filesys, inner = filesystem(path, key)
    try:
        found = filesys.get_file_info(fs.FileSelector(inner.rstrip("/"), recursive=True, allow_not_found=True))
    except OSError as err:
        raise InputError(f"{key}: cannot list {path}: {err}") from None
    return sorted((f for f in found if f.type == fs.FileType.File), key=lambda f: f.path)


def refs_under(path: str, key: str = "path") -> list[FileRef]:
    """The object at a URI, or every object under the prefix it names (ids relative to it); [] if none."""
    from pyarrow import fs

    found = info(path, key)
    filesys, inner = filesystem(path, key)
    if found.type == fs.FileType.File:
        return [_ref(filesys, found, inner.rsplit("/", 1)[-1])]
    base = inner.rstrip("/")
    return [_ref(filesys, f, f.path[len(base) + 1:]) for f in files_under(path, key)]


def glob_base(pattern: str) -> str:
    """The part of a glob (path or URI) before the path component holding its first wildcard."""
    head, sep, rest = pattern.partition("://") if is_uri(pattern) else ("", "", pattern)
    parts = rest.split("/")
    fixed = next(i for i, part in enumerate(parts) if _glob.has_magic(part))
    if not fixed:
        return head + sep if sep else "."
    return head + sep + ("/".join(parts[:fixed]) or "/")


def _glob_regex(pattern: str) -> re.Pattern:
    """Python's glob rules for '/'-separated keys: `*`, `?`, `[..]` within one component, `**` any depth."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def glob_files(pattern: str, key: str = "path", dirs: bool = False) -> list[FileRef]:
    """Files (or with `dirs`, folders: the prefixes above files) of an object store matching a glob URI,
    with ids relative to the glob's fixed part."""
    base = glob_base(pattern)
    filesys, inner_base = filesystem(base, key)
    inner_base = inner_base.rstrip("/")
    regex = _glob_regex(inner_base + "/" + pattern[len(base):].lstrip("/"))
    files = files_under(base, key)
    if dirs:
        prefixes = sorted({f.path[:i] for f in files for i in range(len(inner_base) + 1, len(f.path))
                           if f.path[i] == "/"})
        return [FileRef(to_uri(filesys, d), d[len(inner_base) + 1:], 0, 0) for d in prefixes if regex.fullmatch(d)]
    return [_ref(filesys, f, f.path[len(inner_base) + 1:]) for f in files if regex.fullmatch(f.path)]


def compression(path: str) -> str | None:
    return next((c for suffix, c in COMPRESSIONS.items() if path.endswith(suffix)), None)


def open_raw(path: str, offset: int = 0) -> BinaryIO:
    """A buffered binary reader of a local file or object, positioned at `offset`."""
    if not is_uri(path):
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    else:
        filesys, inner = filesystem(path)
        f = io.BufferedReader(filesys.open_input_file(inner), buffer_size=READ_BUFFER)
    if offset:
        f.seek(offset)
    return f


def open_arrow(path: str):
    """A pyarrow random-access file of a local file or object (what pyarrow's readers take natively)."""
    import pyarrow as pa

    if not is_uri(path):
        return pa.OSFile(path, "rb")
    filesys, inner = filesystem(path)
    return filesys.open_input_file(inner)


def open_input(path: str) -> BinaryIO:
    """A binary reader of the decompressed content of a file or object (compression by suffix)."""
    import bz2
    import gzip
    import lzma

    import pyarrow as pa

    codec = compression(path)
    if codec is None:
        return open_raw(path)
    if codec == "zstd":
        if is_uri(path):
            filesys, inner = filesystem(path)
            stream = filesys.open_input_stream(inner, compression=None)
        else:
            stream = pa.OSFile(path, "rb")
        # A small buffer: a damaged frame costs only the records decoded in the same read.
        return io.BufferedReader(pa.CompressedInputStream(stream, "zstd"), buffer_size=1 << 14)
    module = {"gzip": gzip, "bz2": bz2, "xz": lzma}[codec]
    if not is_uri(path):
        return module.open(path, "rb")
    raw = open_raw(path)
    decoder = module.open(raw, "rb")
    close = decoder.close

    def close_both():  # the decoder leaves a file object it was given open
        try:
            close()
        finally:
            raw.close()

    decoder.close = close_both
    return decoder


def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def cache_root() -> Path:
    """Where `local_copy` keeps trees: $LMFLEET_CACHE, else lmfleet-cache in the system temp dir (node-local).
    It holds one copy of each tree read by URI; nothing evicts it (delete the folder to reclaim space)."""
    import tempfile

    return Path(os.environ.get("LMFLEET_CACHE") or Path(tempfile.gettempdir()) / "lmfleet-cache")


def local_copy(path: str, key: str = "path") -> Path:
    """A local dir holding the tree at `path`: the path itself when local, else a node-local cached copy.

    One copy per node: processes of a node take a file lock, the first downloads, the others reuse it. A
    copy is reused only while every object's size and mtime match the listing it was made from."""
    if not is_uri(path):
        return Path(path)
    listing = files_under(path, key)
    if not listing:
        raise not_found(key, path)
    filesys, inner = filesystem(path, key)
    base = inner.rstrip("/") + "/"
    manifest = {f.path[len(base):]: [f.size, f.mtime_ns] for f in listing}
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / hashlib.blake2b(path.rstrip("/").encode(), digest_size=12).hexdigest()
    with open(f"{dest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = Path(f"{dest}.manifest.json")  # beside the copy: a copy holds the tree's files only
        if stamp.exists() and json.loads(stamp.read_text()) == manifest and all(
                (dest / rel).is_file() and (dest / rel).stat().st_size == size for rel, (size, _) in manifest.items()):
            return dest
        shutil.rmtree(dest, ignore_errors=True)  # lmfleet's own cache entry, stale
        tmp = Path(f"{dest}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for f in listing:
            target = tmp / f.path[len(base):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with filesys.open_input_stream(f.path, compression=None) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, READ_BUFFER)
        stamp.unlink(missing_ok=True)
        tmp.rename(dest)
        stamp.write_text(json.dumps(manifest))
    return dest
