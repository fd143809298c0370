"""Config files: YAML -> validated pydantic models, with `--set key.path=value` overrides.

A config file describes a run: a name, an output dir, a seed and an ordered mapping of stages.
Each stage key is the stage kind (`data`, ...) or any name with an explicit `kind:` field.

    name: quickstart
    seed: 1
    stages:
      data:
        sources: [...]

Validation errors name the file, the dotted key path, the bad value and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmfleet.errors import ConfigError
from lmfleet.uri import SCHEMES, is_uri


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Ray address; None starts an embedded local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (default: all).")
    resource_wait_s: float = Field(600, ge=0, description="On an autoscaling cluster: how long a stage waits "
                                                          "for the nodes its workers need before it fails.")


class MLflowConfig(StrictModel):
    tracking_uri: str | None = Field(None, description="Default: MLFLOW_TRACKING_URI, else MLflow's default.")
    experiment: str | None = Field(None, description="Default: the run's name.")
    artifact_location: str | None = Field(None, description="Of an experiment lmfleet creates (default: the "
                                                            "tracking server's, or MLflow's ./mlartifacts)")


class WandbConfig(StrictModel):
    project: str
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"  # online needs WANDB_API_KEY in the driver's environment
    dir: str | None = Field(None, description="Where W&B keeps its run dirs (default: the run dir's wandb/).")


class TrackingConfig(StrictModel):
    tensorboard: bool = Field(False, description="Event files in the run dir's tensorboard/<stage>/.")
    mlflow: MLflowConfig | None = None
    wandb: WandbConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow is not None or self.wandb is not None


RUN_DIRS = {"logs", "tensorboard", "wandb"}  # the run's own folders beside its stages


class RunConfig(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str | None = Field(None, description="A path or an object store URI (s3://bucket/prefix, gs://, "
                                                     "abfs://...). Default: runs/<name>.")
    storage_path: str | None = Field(
        None, description="Ray Train / Tune checkpoints: s3://bucket/prefix, gs://, abfs:// or a path every node "
                          "shares; holds <name>/<stage>/. Default: inside each stage dir.")
    seed: int = 1
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    # Validated per stage kind by lmfleet.stages, which knows each kind's model.
    stages: dict[str, dict[str, Any]] = Field(..., min_length=1)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict) -> dict:
        # A stage name is a folder of the run dir: no paths, no clash with the run's own files.
        for name in stages:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name in RUN_DIRS:
                raise ValueError(f"stage name {name!r}: use letters, digits, '_' or '-' (and not "
                                 f"{', '.join(map(repr, sorted(RUN_DIRS)))})")
        return stages

    @field_validator("storage_path", "output_dir")
    @classmethod
    def _storage_uri(cls, value: str | None) -> str | None:
        if value is None or not is_uri(value):
            return value
        scheme = value.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise ValueError(f"{value!r}: unknown scheme {scheme!r}; expected a path or one of "
                             f"{', '.join(s + '://' for s in SCHEMES)}")
        if "?" in value:  # joined with stage names: a query string would end up in the middle
            raise ValueError(f"{value!r}: no query string; set endpoints and credentials in the "
                             "environment (e.g. AWS_ENDPOINT_URL)")
        return value

    @property
    def run_dir(self) -> Path | str:
        """The run's output dir: an absolute path, or a URI."""
        if self.output_dir is not None and is_uri(self.output_dir):
            return self.output_dir.rstrip("/")
        return (Path(self.output_dir) if self.output_dir is not None else Path("runs") / self.name).resolve()


def _path_str(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def format_validation_error(err: ValidationError, source: str, prefix: tuple = ()) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} error{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        key = _path_str(prefix + tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {e['input']!r})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif e["type"] == "value_error":  # our own cross-field checks: the message says it all
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: got {e['input']!r}; expected: {e['msg']}")
    return "\n".join(lines)


def validate_model(model: type[BaseModel], data: Any, source: str, prefix: tuple = ()) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, prefix)) from None


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `true`, `[1, 2]`, `null`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: --set {item!r}: expected KEY.PATH=VALUE")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"{source}: --set {item!r}: empty segment in key path {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{source}: --set {key}: {'.'.join(parts[: i + 1])} is not a list index")
                node = node[int(part)]
            else:
                nxt = node.setdefault(part, {})
                if not isinstance(nxt, dict | list):
                    raise ConfigError(
                        f"{source}: --set {key}: {'.'.join(parts[: i + 1])} is {nxt!r}, not a mapping"
                    )
                node = nxt
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{source}: --set {key}: {last!r} is not an index of a {len(node)}-item list")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def set_path(data: dict, key: str, value: Any) -> dict:
    """A copy of `data` with the existing dotted `key` set to `value`; KeyError if the key does not exist."""
    data = copy.deepcopy(data)
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node[part]
        if not isinstance(node, dict):
            raise KeyError(key)
    if last not in node:
        raise KeyError(key)
    node[last] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
