"""Reward functions for the RL stages: Python callables named `module:function`, called as
`fn(prompt, completion, record, **args)` -> a float (prompt: the chat messages; completion: the
generated text; record: the dataset record it came from, so a function can read its `answer`, tests,
...). Several are summed with their weights. A function that raises, returns something that is not a
number, or returns NaN / inf stops the stage with an error naming the function and the record.

Verifiable rewards built in (`lmfleet.posttrain.rewards:<name>`): exact_match, contains, regex, length,
python_tests.
A user's own: `path/to/file.py:function` (the driver reads the file and sends its text to the workers,
so no node needs it) or `module:function` (importable on every node: an installed package).
"""

from __future__ import annotations

import importlib
import math
import re
import types
from collections.abc import Callable
from pathlib import Path

from lmfleet.errors import ConfigError, UserError
from lmfleet.posttrain.config import RewardFunctionConfig


class RewardFunctionError(UserError):
    """A reward function that raised or returned something that is not a finite number."""


def _parts(spec: str, key: str) -> tuple[str, str]:
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ConfigError(f"{key}: {spec!r} is not `module:function` or `file.py:function` "
                          "(e.g. lmfleet.posttrain.rewards:regex)")
    return where, attr


def source_files(cfgs: list[RewardFunctionConfig], key: str = "reward_functions") -> dict[str, str]:
    """{path: source text} of the `file.py:function` reward functions: read once by the driver, sent to
    workers on any node (which may not have the file). ConfigError for a file that cannot be read."""
    sources = {}
    for i, cfg in enumerate(cfgs):
        where, _ = _parts(cfg.function, f"{key}[{i}].function")
        if where.endswith(".py") and where not in sources:
            try:
                sources[where] = Path(where).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"{key}[{i}].function: cannot read {where!r}: {err}") from None
    return sources


def resolve(spec: str, key: str, sources: dict[str, str] | None = None) -> Callable:
    """The function `module:function` or `file.py:function` names (a file's text from `sources` when given);
    ConfigError naming `key` and the spec otherwise."""
    where, attr = _parts(spec, key)
    if where.endswith(".py"):
        text = (sources or {}).get(where)
        if text is None:
            text = source_files([RewardFunctionConfig(function=spec)], key)[where]
        module = types.ModuleType(Path(where).stem)
        module.__file__ = where
        try:
            exec(compile(text, where, "exec"), module.__dict__)  # noqa: S102 - the user's own reward code
        except Exception as err:
            raise ConfigError(f"{key}: {where} fails to load: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:  # ImportError, or the module's own code failing
            raise ConfigError(f"{key}: cannot import module {where!r} of {spec!r}: {type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{key}: {where} has no {attr!r} ({spec!r})")
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is a {type(fn).__name__}, not a function")
    return fn


class RewardFunctions:
    """The weighted sum of a stage's reward functions, resolved once."""

    def __init__(self, cfgs: list[RewardFunctionConfig], sources: dict[str, str] | None = None,
                 key: str = "reward_functions"):
        self.cfgs, self.sources = cfgs, sources or {}
        self.fns = [resolve(c.function, f"{key}[{i}].function", sources) for i, c in enumerate(cfgs)]
        self.names = [c.function.rpartition(":")[2] for c in cfgs]

    @classmethod
    def load(cls, cfgs: list[RewardFunctionConfig], key: str = "reward_functions") -> RewardFunctions:
        """On the driver: read the `file.py` functions' text (kept in `sources`, for the workers) and load all."""
        return cls(cfgs, source_files(cfgs, key), key)

    def score(self, prompt: list[dict], completion: str, record: dict, where: str) -> tuple[float, list[float]]:
        """(weighted sum, each function's value) for one completion; `where` names the record in errors."""
        values = []
        for cfg, fn in zip(self.cfgs, self.fns, strict=True):
            try:
                value = fn(prompt, completion, record, **cfg.args)
            except Exception as err:  # the user's code: any error is theirs to see, with the record
                raise RewardFunctionError(
                    f"reward function {cfg.function} raised {type(err).__name__}: {err} (record {where})") from err
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RewardFunctionError(f"reward function {cfg.function} returned {type(value).__name__} "
                                          f"{value!r}, not a number (record {where})")
            if not math.isfinite(value):
                raise RewardFunctionError(f"reward function {cfg.function} returned {value} (record {where})")
            values.append(float(value))
        return sum(c.weight * v for c, v in zip(self.cfgs, values, strict=True)), values


# -- built-in verifiable rewards --


def _target(record: dict, field: str) -> str:
    if field not in record:
        raise KeyError(f"the record has no {field!r} field")
    return str(record[field])


def exact_match(prompt, completion: str, record: dict, field: str = "answer") -> float:
    """1 when the completion, stripped, equals the record's `field` (stripped), else 0."""
    return float(completion.strip() == _target(record, field).strip())


def contains(prompt, completion: str, record: dict, text: str | None = None, field: str | None = None,
             ignore_case: bool = True) -> float:
    """1 when the completion holds `text` (or the record's `field`), else 0."""
    want = text if text is not None else _target(record, field or "answer")
    return float((want.lower() in completion.lower()) if ignore_case else (want in completion))


def regex(prompt, completion: str, record: dict, pattern: str, full: bool = False) -> float:
    """1 when `pattern` matches the completion (anywhere; the whole of it with full: true), else 0:
    a format reward such as `<answer>.*</answer>`."""
    return float(bool((re.fullmatch if full else re.search)(pattern, completion, re.DOTALL)))


def length(prompt, completion: str, record: dict, max_words: int) -> float:
    """0 up to `max_words` words, then -(extra words / max_words): a brevity penalty."""
    n = len(completion.split())
    return -max(0, n - max_words) / max_words


def python_tests(prompt, completion: str, record: dict, field: str = "tests", timeout_s: float = 5.0) -> float:
    """1 when the completion (Python code; a ```python fence is unwrapped) followed by the record's `field`
    (asserts) runs to completion in a fresh `python -I` subprocess within `timeout_s`, else 0: a unit-test
    reward. The code runs with the worker's rights: not a sandbox; run untrusted policies in containers."""
    import subprocess
    import sys

    fenced = re.search(r"```(?:python)?\n(.*?)```", completion, re.DOTALL)
    code = (fenced.group(1) if fenced else completion) + "\n\n" + _target(record, field) + "\n"
    try:
        done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return 0.0
    return float(done.returncode == 0)
