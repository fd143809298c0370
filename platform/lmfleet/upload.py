"""What `lmfleet submit` uploads as a Ray job's working dir, and what it never uploads.

Ray zips the working dir into the cluster's GCS, where every job and node of the cluster can read it.
Left out: history, environments, run outputs, data and checkpoints (jobs read those from storage every
node shares), credential files and folders (SECRET_EXCLUDES: a job gets secrets through `--env` or the
cluster's own identity, never as files), what `.gitignore` / `.rayignore` files list (Ray honours
them), and `--exclude` patterns. Patterns use gitignore syntax, as Ray's runtime_env `excludes`.
The files are listed with Ray's own traversal, so the counts printed are what Ray uploads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

UPLOAD_EXCLUDES = [".git", ".venv", "runs/", "data/", "checkpoints/", "**/__pycache__", "*.safetensors", "*.pt",
                   "*.bin", "*.distcp", "*.parquet", "*.arrow"]
SECRET_EXCLUDES = [
    ".env", ".env.*", "*.env", ".envrc",  # dotenv files
    ".aws/", ".ssh/", ".gnupg/", ".kube/", ".docker/", ".azure/", ".config/gcloud/", ".config/gh/",
    ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc", ".vault-token", ".htpasswd",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",
    "secrets.*", "*secrets*.json", "*secrets*.yaml", "*secrets*.yml", "credentials", "*credentials*.json",
    "credentials.csv", "service-account*.json", "*.tfstate", "*.tfstate.*", "*.tfvars", "**/huggingface/token",
]


@dataclass
class Upload:
    files: int  # files Ray uploads
    bytes: int
    secrets: list[str]  # paths (relative) that look like credentials, left out


def _walk(root: Path, excludes: list[str], gitignore: bool) -> list[Path]:
    """The files under `root` that Ray's working_dir packaging takes with these excludes."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[Path] = []
    _dir_travel(root, [_get_excludes(root, excludes)], lambda p: p.is_file() and files.append(p),
                include_gitignore=gitignore, logger=_QUIET)  # Ray logs each ignore file it reads at INFO
    return files


_QUIET = logging.getLogger("lmfleet.upload.scan")
_QUIET.setLevel(logging.WARNING)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def scan(root: Path, extra: list[str]) -> Upload:
    """What uploading `root` with UPLOAD_EXCLUDES, SECRET_EXCLUDES and `extra` takes, and the credential-like
    paths it leaves out (also those .gitignore already leaves out: worth knowing either way)."""
    root = root.resolve()
    # Ray reads RAY_RUNTIME_ENV_IGNORE_GITIGNORE the same way when it packs the directory.
    gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    uploaded = _walk(root, [*UPLOAD_EXCLUDES, *SECRET_EXCLUDES, *extra], gitignore)
    not_secret = set(_walk(root, [*UPLOAD_EXCLUDES, *SECRET_EXCLUDES, *extra], gitignore=False))
    secrets = sorted(str(p.relative_to(root)) for p in _walk(root, [*UPLOAD_EXCLUDES, *extra], gitignore=False)
                     if p not in not_secret)
    return Upload(len(uploaded), sum(p.stat().st_size for p in uploaded), secrets)


def describe(upload: Upload, root: Path) -> list[str]:
    """Lines for the user before the upload goes: its size, and a warning naming what looked like secrets."""
    lines = [f"uploading {upload.files} files ({_size(upload.bytes)}) from {root} as the job's working dir"]
    if upload.secrets:
        shown = ", ".join(upload.secrets[:12]) + (f" and {len(upload.secrets) - 12} more" if len(upload.secrets) > 12
                                                   else "")
        lines.append(f"warning: not uploaded, as they look like credentials: {shown}. Jobs get secrets through "
                     "--env KEY=VALUE or the cluster's own identity (instance roles, workload identity)")
    return lines
