import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found: tests on real text need ../shared/data beside the repo")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the session's in-process stage runs (what `lmfleet run` starts)."""
    import ray

    from lmfleet.runner import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def lmfleet_cmd() -> list[str]:
    """The installed console script of this interpreter's environment."""
    return [str(Path(sys.executable).parent / "lmfleet")]


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
