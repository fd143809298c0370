"""The `tune:` block of a training stage (pretrain, sft): a Ray Tune search over that stage's own config.

    tune:
      metric: val_loss
      mode: min
      num_samples: 4
      space:
        optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
        lr_schedule.warmup_steps: {choice: [0, 10, 20]}
      scheduler: {kind: pbt, perturbation_interval: 20}

Each `space` key is a dotted path into the stage config; its value is one Ray Tune distribution.
Every bound and listed value is checked against the stage config at load time, so a search never
starts trials that would fail on their first line.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from lmfleet.config import StrictModel, set_path

# name -> (argument names, whether the bounds are (low, high) of a range)
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], bool]] = {
    "uniform": (("low", "high"), True),
    "quniform": (("low", "high", "q"), True),
    "loguniform": (("low", "high"), True),
    "qloguniform": (("low", "high", "q"), True),
    "randint": (("low", "high"), True),  # high exclusive, as in Ray Tune
    "qrandint": (("low", "high", "q"), True),  # high inclusive
    "lograndint": (("low", "high"), True),
    "randn": (("mean", "sd"), False),
    "choice": ((), False),  # a list of values
    "grid": ((), False),  # every value, for each of num_samples
}


class Distribution(BaseModel):
    """One space entry, e.g. {loguniform: [1e-4, 1e-2]} or {choice: [8, 16]}."""

    name: str
    args: list[Any]

    @classmethod
    def parse(cls, key: str, spec: Any) -> Distribution:
        where = f"tune.space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"{where}: expected one distribution like {{loguniform: [1e-4, 1e-2]}}, got {spec!r}")
        (name, args), = spec.items()
        if name not in DISTRIBUTIONS:
            raise ValueError(f"{where}: unknown distribution {name!r}; expected one of {', '.join(DISTRIBUTIONS)}")
        names, ranged = DISTRIBUTIONS[name]
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: {name} takes a list, got {args!r}")
        if names:
            if len(args) != len(names) or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
                raise ValueError(f"{where}: {name} takes [{', '.join(names)}] as numbers, got {args!r}")
            if ranged and not args[0] < args[1]:
                raise ValueError(f"{where}: {name} needs low < high, got {args!r}")
            if name.startswith(("log", "qlog")) and args[0] <= 0:
                raise ValueError(f"{where}: {name} needs low > 0, got {args!r}")
            if name.startswith("q") and args[2] <= 0:
                raise ValueError(f"{where}: {name} needs q > 0, got {args!r}")
            if name == "randn" and args[1] <= 0:
                raise ValueError(f"{where}: randn needs sd > 0, got {args!r}")
        return cls(name=name, args=args)

    @property
    def bounds(self) -> tuple[float, float] | None:
        if not DISTRIBUTIONS[self.name][1]:
            return None
        high = self.args[1] - 1 if self.name == "randint" else self.args[1]
        return self.args[0], high

    def values_to_check(self) -> list[Any]:
        """Values every trial's config must accept: the bounds, or each listed value."""
        if self.name in ("choice", "grid"):
            return self.args
        if self.name == "randn":
            return [self.args[0]]
        return list(self.bounds)

    def to_ray(self):
        from ray import tune

        if self.name == "grid":
            return tune.grid_search(self.args)
        if self.name == "choice":
            return tune.choice(self.args)
        return getattr(tune, self.name)(*self.args)

    def mutation(self):
        """What PBT's explore draws from: the domain (perturbed by factors or resampled), or the list."""
        return self.args if self.name in ("choice", "grid") else self.to_ray()

    def clamp(self, value):
        """PBT multiplies values by its factors: keep them inside the range the space allows."""
        if self.bounds is None or isinstance(value, bool):
            return value
        low, high = self.bounds
        clamped = min(max(value, low), high)
        return int(round(clamped)) if isinstance(value, int) else clamped


class PBTConfig(StrictModel):
    kind: Literal["pbt"]
    perturbation_interval: int = Field(..., ge=1, description="Training steps between exploit/explore decisions.")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="Bottom fraction copies the top fraction.")
    resample_probability: float = Field(0.25, ge=0, le=1, description="Explore: resample instead of perturbing.")
    perturbation_factors: tuple[float, float] = Field((1.2, 0.8), description="Explore: multiply by one of these.")
    synch: bool = Field(False, description="Wait for every trial at each interval (pauses the fast ones).")


class ASHAConfig(StrictModel):
    kind: Literal["asha"]
    grace_period: int = Field(..., ge=1, description="Steps every trial trains before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep the top 1/reduction_factor at each rung.")
    brackets: int = Field(1, ge=1)


class FIFOConfig(StrictModel):
    kind: Literal["fifo"]


class PlateauConfig(StrictModel):
    """Stop a trial whose metric stopped moving (Ray's TrialPlateauStopper)."""

    std: float = Field(0.01, gt=0, description="Stop when the metric's std over `num_results` reports is below this.")
    num_results: int = Field(4, ge=2)
    grace_period: int = Field(4, ge=1, description="Reports before a trial can be stopped.")


Scheduler = Annotated[PBTConfig | ASHAConfig | FIFOConfig, Field(discriminator="kind")]


class TuneConfig(StrictModel):
    metric: str = Field("val_loss", description="A metric the stage reports at each checkpoint.")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, ge=1, description="Trials to sample (with grid entries: repeats of the grid).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster fits.")
    space: dict[str, dict[str, Any]] = Field(..., min_length=1)
    scheduler: Scheduler = FIFOConfig(kind="fifo")
    search: Literal["random", "optuna"] = Field("random", description="optuna: TPE (Bayesian) over the space.")
    plateau: PlateauConfig | None = None

    @model_validator(mode="after")
    def _consistent(self):
        dists = self.distributions()
        if self.search == "optuna":
            if isinstance(self.scheduler, PBTConfig):
                raise ValueError("tune.search optuna cannot drive PBT (PBT picks its own configs): use search random")
            grids = [k for k, d in dists.items() if d.name == "grid"]
            if grids:
                raise ValueError(f"tune.space.{grids[0]}: grid needs search random (optuna samples, it does not enumerate)")
        return self

    def distributions(self) -> dict[str, Distribution]:
        return {key: Distribution.parse(key, spec) for key, spec in self.space.items()}

    def check_pbt_keys(self, shape_keys: tuple[str, ...], allowed: tuple[str, ...] = ()) -> None:
        """PBT hands checkpoints between trials: keys that shape the weights cannot differ between them."""
        if not isinstance(self.scheduler, PBTConfig):
            return
        for key in self.space:
            if key.startswith(shape_keys) and key not in allowed:
                raise ValueError(f"tune.space.{key}: PBT copies checkpoints between trials, so it cannot tune what "
                                 f"shapes the weights ({', '.join(k + '*' for k in shape_keys)}); use asha or fifo")

    def check_against(self, stage: StrictModel) -> None:
        """Every value a trial can get must validate as the stage's own config (ValueError naming the key)."""
        base = stage.model_dump(mode="json", exclude={"tune"})
        for key, dist in self.distributions().items():
            if key.split(".")[0] == "tune":
                raise ValueError(f"tune.space.{key}: the search cannot tune its own tune block")
            for value in dist.values_to_check():
                try:
                    type(stage).model_validate(set_path(base, key, value))
                except (ValidationError, KeyError) as err:
                    raise ValueError(f"tune.space.{key}: value {value!r} ({dist.name} {dist.args}) is not a valid "
                                     f"{key}: {_reason(err, key)}") from None


def _reason(err: Exception, key: str) -> str:
    if isinstance(err, KeyError):
        return "no such key in the stage config"
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return first["msg"].removeprefix("Value error, ") + ("" if where in ("", key) else f" (at {where})")


def trial_config(base: dict, sampled: dict, distributions: dict[str, Distribution]) -> dict:
    """The stage config of one trial: the base config with each sampled value set (clamped to its range)."""
    out = base
    for key, value in sampled.items():
        out = set_path(out, key, distributions[key].clamp(value))
    return out
