"""What a stage reads: each stage's preflight returns its inputs, and the runner uses them twice.

- Safety: an input must not lie inside the run's output dir (except an earlier stage's outputs), nor
  contain it (a folder input would read the run's own files back), since a run rewrites its stage dirs.
- Up to date: a stage's fingerprint covers the digest of every input. A file's digest is its path as
  named, size and modification time (nanoseconds), not its content: cheap on corpora of any size, and a
  changed or regenerated file changes it. An input that is an earlier stage of the run is digested by
  that stage's own fingerprint and finish time instead (lmfleet.runner).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmfleet import uri
from lmfleet.errors import InputError
from lmfleet.uri import FileRef, is_uri


@dataclass(frozen=True)
class Input:
    """One input of a stage: `key` (the config key that names it, relative to the stage), `paths` (what
    the key names: files, folders, the folders of globs; URIs as strings) and `files` (the files it reads,
    each with the id, size and mtime the digest uses; None: every file under `paths`)."""

    key: str
    paths: tuple[Path | str, ...]
    files: tuple[FileRef, ...] | None = field(default=None, compare=False)

    def all_files(self) -> list[FileRef]:
        if self.files is not None:
            return list(self.files)
        return [f for path in self.paths for f in files_under(path, self.key)]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _inside(path: Path | str, folder: Path | str) -> bool:
    """`path` is `folder` or below it: both local (links resolved) or both URIs."""
    if is_uri(path) != is_uri(folder):
        return False
    if is_uri(path):
        p, f = str(path).rstrip("/"), str(folder).rstrip("/")
        return p == f or p.startswith(f + "/")
    return _within(_absolute(Path(path)), Path(folder))


def check_overlap(inp: Input, stage_key: str, run_dir: Path | str, earlier_dirs: list[Path | str]) -> None:
    """InputError if an input lies inside the run dir (outside the dirs of earlier stages, whose outputs
    later stages read) or is a folder that holds the run dir."""
    for named in inp.paths:
        if _inside(named, run_dir) and not any(_inside(named, d) for d in earlier_dirs):
            raise InputError(f"{stage_key}.{inp.key}: input {named} is inside the run's output_dir {run_dir}, "
                             "whose stage dirs lmfleet rewrites; set output_dir to a folder apart from the inputs")
        folder = is_uri(named) or _absolute(Path(named)).is_dir()
        if folder and _inside(run_dir, named if is_uri(named) else _absolute(Path(named))):
            raise InputError(f"{stage_key}.{inp.key}: the run's output_dir {run_dir} is inside the input folder "
                             f"{named}: the run would read its own outputs back; set output_dir elsewhere")


def earlier_stage(inp: Input, stage_dirs: dict[str, Path | str]) -> str | None:
    """The earlier stage of the run whose outputs are this input (its paths lie in that stage's dir)."""
    for name, folder in stage_dirs.items():
        if inp.paths and all(_inside(p, folder) for p in inp.paths):
            return name
    return None


def _absolute(path: Path) -> Path:
    # Links resolved, as the run dir is (an input reached through a link still overlaps); os.path.realpath
    # leaves a symlink loop as it is for the readers' clear error, where Path.resolve raises.
    return Path(os.path.realpath(path))


def files_under(path: Path | str, key: str = "path") -> list[FileRef]:
    """Every file under `path` (itself if a file; a path or URI), with its path relative to `path` as id."""
    if is_uri(path):
        return uri.refs_under(str(path), key)
    path = Path(path)
    found = [(path, path.name)] if path.is_file() else sorted(
        (p, str(p.relative_to(path))) for p in path.rglob("*") if p.is_file())
    refs = []
    for p, file_id in found:
        try:
            st = p.stat()
        except OSError as err:
            raise InputError(f"{key}: cannot read {p} ({err.strerror})") from None
        refs.append(FileRef(str(p), file_id, st.st_size, st.st_mtime_ns))
    return refs


def digest(inp: Input) -> str:
    """A digest of the input's files: id, size and mtime of each (see the module docstring)."""
    h = hashlib.blake2b(digest_size=16)
    for ref in inp.all_files():
        h.update(f"{ref.rel}\0{ref.size}\0{ref.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
