"""Writing a run's outputs to a local dir or an object store (the write side of lmfleet.uri).

A run's output dir is a local path or a URI (s3://, gs://, abfs://, ...). Code that writes through
libraries that only write local files (HF save_pretrained, safetensors, numpy, matplotlib) writes into a
local folder and publishes it:

- the driver writes a stage's files into its staging dir (`staging(out)`), which the runner publishes at
  the stage's end (and on failure), and writes run records (stage.json, report.json) through at once;
- a Ray task or Train worker writes its own outputs (a model export, packed shards) into `workdir(out)`
  on its node and publishes them itself (`publish(..., move=True)`), so nothing depends on which node ran it.

For a local output dir both are the dir itself and publishing does nothing: every node sees one disk.
The staging dir and the work dirs are different folders, so the driver publishes only what it wrote,
even when a worker shares its node. Both live in the node's cache (lmfleet.uri.cache_root), mirroring
the URI's path; a work dir is removed once published.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmfleet.errors import InputError
from lmfleet.uri import READ_BUFFER, cache_root, files_under, filesystem, info, is_uri, join, not_found

UPLOAD_THREADS = 8  # objects uploaded at once (one request stream each; a big object is a multipart upload)


def child(base: Path | str, *parts: str) -> Path | str:
    """`base`/parts: a Path for a local base, a URI string for a URI."""
    return join(str(base), *parts) if is_uri(base) else Path(base).joinpath(*parts)


def _mirror(kind: str, out: str) -> Path:
    scheme, rest = out.split("://", 1)
    return cache_root() / kind / scheme.lower() / rest.strip("/")


def staging(out: Path | str) -> Path:
    """Where the driver writes the files of `out` before the runner publishes them."""
    return _mirror("staging", str(out)) if is_uri(out) else Path(out)


def workdir(out: Path | str, fresh: bool = False) -> Path:
    """Where a task or worker on this node writes the files of `out` before it publishes them.
    `fresh`: empty it first (a URI's work dir may hold an earlier attempt's files)."""
    if not is_uri(out):
        local = Path(out)
    else:
        local = _mirror("work", str(out))
        if fresh:
            shutil.rmtree(local, ignore_errors=True)  # lmfleet's own cache
    local.mkdir(parents=True, exist_ok=True)
    return local


def publish(local: Path, out: Path | str, move: bool = False) -> None:
    """Upload every file under `local` (a folder or one file) to `out` (nothing to do for a local `out`:
    `local` is it). `move`: then remove `local`."""
    if not is_uri(out) or not local.exists():
        return
    filesys, inner = filesystem(str(out), "output_dir")
    files = [(local, inner)] if local.is_file() else [
        (p, f"{inner.rstrip('/')}/{p.relative_to(local).as_posix()}") for p in sorted(local.rglob("*")) if p.is_file()]

    def upload(item):
        path, key = item
        with open(path, "rb") as src, filesys.open_output_stream(key, compression=None) as dst:
            shutil.copyfileobj(src, dst, READ_BUFFER)

    try:
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(upload, files))
    except OSError as err:
        raise InputError(f"output_dir: cannot write {out}: {err}") from None
    if move:
        shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink()


def fetch(out: str, local: Path) -> None:
    """Download the tree (or object) at `out` into `local`. For append-only logs: a local file at least as
    long as its object is kept (a driver that died before publishing wrote more than the object holds)."""
    from pyarrow import fs

    filesys, inner = filesystem(out, "output_dir")
    found = info(out, "output_dir")
    if found.type == fs.FileType.File:
        listing = [(found, local)]
    else:
        base = inner.rstrip("/") + "/"
        listing = [(f, local / f.path[len(base):]) for f in files_under(out, "output_dir")]
    for obj, target in listing:
        if target.is_file() and target.stat().st_size >= (obj.size or 0):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesys.open_input_stream(obj.path, compression=None) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, READ_BUFFER)


def exists(path: Path | str) -> bool:
    from pyarrow import fs

    return Path(path).exists() if not is_uri(path) else info(str(path), "output_dir").type != fs.FileType.NotFound


def is_file(path: Path | str) -> bool:
    from pyarrow import fs

    return Path(path).is_file() if not is_uri(path) else info(str(path), "output_dir").type == fs.FileType.File


def listdir(path: Path | str) -> list[str]:
    """Names of the entries in a folder (or under a prefix); [] if none."""
    from pyarrow import fs

    if not is_uri(path):
        return sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
    filesys, inner = filesystem(str(path), "output_dir")
    found = filesys.get_file_info(fs.FileSelector(inner.rstrip("/"), allow_not_found=True))
    return sorted(f.base_name for f in found)


def read_text(path: Path | str) -> str:
    if not is_uri(path):
        return Path(path).read_text(encoding="utf-8")
    filesys, inner = filesystem(str(path), "output_dir")
    with filesys.open_input_stream(inner, compression=None) as f:
        return f.read().decode("utf-8")


def read_json(path: Path | str) -> dict:
    """The JSON object in a file or object; {} if there is none."""
    return json.loads(read_text(path)) if is_file(path) else {}


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write one file or object (its folder created when local)."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return
    filesys, inner = filesystem(str(path), "output_dir")
    with filesys.open_output_stream(inner, compression=None) as f:
        f.write(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: Path | str) -> None:
    """Delete the tree (or file) at `path` if there is one: only ever lmfleet's own outputs (callers check)."""
    from pyarrow import fs

    if not is_uri(path):
        p = Path(path)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return
    filesys, inner = filesystem(str(path), "output_dir")
    kind = filesys.get_file_info(inner).type
    if kind == fs.FileType.Directory:
        filesys.delete_dir(inner)
    elif kind == fs.FileType.File:
        filesys.delete_file(inner)


def check_bucket(out: str, key: str = "output_dir") -> None:
    """InputError unless the bucket (container) of `out` exists and these credentials see it."""
    from pyarrow import fs

    filesys, inner = filesystem(out, key)
    bucket = inner.split("/", 1)[0]
    try:
        missing = filesys.get_file_info(bucket).type == fs.FileType.NotFound
    except OSError as err:
        raise InputError(f"{key}: cannot read {out}: {err}") from None
    if missing:
        raise not_found(key, out)
