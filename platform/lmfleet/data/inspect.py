"""Reading a data stage's quarantine back: `lmfleet data inspect`."""

from __future__ import annotations

from collections import Counter

from lmfleet import uri
from lmfleet.errors import UserError

COLUMNS = ["id", "source", "location", "reject_reason", "raw", "pii", "contaminated_by"]


def _rejects_dir(path: str) -> str:
    """The rejects/ of `path` if it is a data stage's dir, else of the one data stage dir in `path` (a run
    dir); UserError if there is none, or several."""
    from pyarrow import fs

    filesys, inner = uri.filesystem(path, "path")
    inner = inner.rstrip("/")

    def is_dir(p: str) -> bool:
        return filesys.get_file_info(p).type == fs.FileType.Directory

    if is_dir(f"{inner}/rejects"):
        return f"{inner}/rejects"
    if not is_dir(inner):
        raise UserError(f"{path}: no such dir")
    found = sorted(f.path for f in filesys.get_file_info(fs.FileSelector(inner))
                   if f.type == fs.FileType.Directory and is_dir(f"{f.path}/rejects"))
    if len(found) == 1:
        return f"{found[0]}/rejects"
    if not found:
        raise UserError(f"{path}: no data stage output here (no rejects/ in it or in a stage dir under it)")
    names = ", ".join(p.rsplit("/", 1)[-1] for p in found)
    raise UserError(f"{path}: several data stages ({names}); name one of their dirs")


def rejected(path: str, reason: str | None, limit: int) -> tuple[dict[str, int], list[dict]]:
    """(rejected documents per reason, up to `limit` of those rejected for `reason`, in file order)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    filesys, _ = uri.filesystem(path, "path")
    table = ds.dataset(_rejects_dir(path), filesystem=filesys, format="parquet").to_table()
    names = [c for c in COLUMNS if c in table.column_names]  # (runs before pii / contaminated_by lack them)
    counts = dict(sorted(Counter(table["reject_reason"].to_pylist()).items()))
    if reason is None:
        return counts, []
    if reason not in counts:
        raise UserError(f"--reason {reason!r}: no document was rejected for it here; reasons: "
                        f"{', '.join(counts) or 'none'}")
    rows = table.select(names).filter(pc.equal(table["reject_reason"], reason)).slice(0, limit).to_pylist()
    return counts, rows
