"""Where Ray Train and Tune keep a stage's checkpoints: a local (shared) path or an object store URI.

A run's `storage_path` (s3://bucket/prefix, gs://, abfs://container@account.dfs.core.windows.net/...,
or a path) holds `<run name>/<stage name>/` per stage; without one, checkpoints stay in the stage dir
(`<stage dir>/ray`). Paths here are plain strings joined with "/", as Ray's `storage_path` takes them,
and every file operation goes through pyarrow's filesystems (what Ray itself uses for storage), so the
same code handles a local dir and a bucket. Credentials and endpoints come from the environment
(instance roles, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...), never from a config.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmfleet.errors import InputError
from lmfleet.outputs import remove
from lmfleet.uri import filesystem, is_uri, join


def stage_storage(storage_path: str | None, run_name: str, stage_dir: Path | str) -> str:
    """The storage root of one stage: `<storage_path>/<run>/<stage>`, or `<stage dir>/ray` without one
    (stage_dir: a path or URI)."""
    if storage_path is None:
        return join(str(stage_dir), "ray")
    base = storage_path if is_uri(storage_path) else str(Path(storage_path).resolve())
    return join(base, run_name, str(stage_dir).rstrip("/").rsplit("/", 1)[-1])


MARKER = "lmfleet-stage.json"  # in a stage's storage root: lmfleet wrote this tree, for this run's stage


def _read_marker(filesys, inner: str) -> dict | None:
    from pyarrow import fs

    marker = f"{inner}/{MARKER}"
    if filesys.get_file_info(marker).type != fs.FileType.File:
        return None
    with filesys.open_input_stream(marker) as f:
        return json.loads(f.read())


def check_owned(path: str, owner: dict) -> None:
    """InputError unless the tree at `path` is absent, empty, or carries lmfleet's marker for `owner`
    ({run, stage}): a fresh run deletes it, and lmfleet never deletes what it did not write."""
    from pyarrow import fs

    filesys, inner = filesystem(path)
    if filesys.get_file_info(inner).type == fs.FileType.NotFound:
        return
    marker = _read_marker(filesys, inner)
    if marker == owner:
        return
    found = filesys.get_file_info(fs.FileSelector(inner, recursive=True))
    if not found:
        return
    whose = f"stage {marker.get('stage')!r} of run {marker.get('run')!r}" if marker else "files lmfleet did not write"
    raise InputError(f"storage {path}: holds {whose} ({len(found)} entries, e.g. {found[0].path}); lmfleet would "
                     "delete it for a fresh run: set storage_path to a prefix of its own")


def reset(path: str, owner: dict) -> None:
    """Start the stage's storage afresh: delete the tree at `path` (after `check_owned`) and mark it as `owner`'s."""
    check_owned(path, owner)
    remove(path)
    filesys, inner = filesystem(path)
    filesys.create_dir(inner)
    with filesys.open_output_stream(f"{inner}/{MARKER}") as f:
        f.write(json.dumps(owner).encode())


def checkpoint_uri(checkpoint) -> str | None:
    """Where a Ray checkpoint lives, as a URI when it is not local (its .path drops the scheme)."""
    if checkpoint is None:
        return None
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
