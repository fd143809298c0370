"""Where Ray Train and Tune keep a stage's checkpoints: a local (shared) path or an object store URI.

A run's `storage_path` (s3://bucket/prefix, gs://, abfs://container@account.dfs.core.windows.net/...,
or a path) holds `<run name>/<stage name>/` per stage; without one, checkpoints stay in the stage dir
(`<stage dir>/ray`). Paths here are plain strings joined with "/", as Ray's `storage_path` takes them,
and every file operation goes through pyarrow's filesystems (what Ray itself uses for storage), so the
same code handles a local dir and a bucket. Credentials and endpoints come from the environment
(instance roles, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...), never from a config.
"""

from __future__ import annotations

from pathlib import Path

# The URI schemes pyarrow (and so Ray) opens as filesystems.
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def stage_storage(storage_path: str | None, run_name: str, stage_dir: Path) -> str:
    """The storage root of one stage: `<storage_path>/<run>/<stage>`, or `<stage dir>/ray` without one."""
    if storage_path is None:
        return str(stage_dir / "ray")
    base = storage_path if is_uri(storage_path) else str(Path(storage_path).resolve())
    return join(base, run_name, stage_dir.name)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a storage path or URI."""
    from pyarrow import fs

    if is_uri(path):
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), str(Path(path).resolve())


def delete(path: str) -> None:
    """Remove the tree at `path` if there is one."""
    from pyarrow import fs

    filesys, inner = filesystem(path)
    if filesys.get_file_info(inner).type != fs.FileType.NotFound:
        filesys.delete_dir(inner)


def checkpoint_uri(checkpoint) -> str | None:
    """Where a Ray checkpoint lives, as a URI when it is not local (its .path drops the scheme)."""
    if checkpoint is None:
        return None
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
