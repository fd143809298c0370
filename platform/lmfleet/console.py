"""What a run shows on the console: lmfleet's own lines. What Ray, its workers and the libraries they run
print (Ray Data's execution plans, Ray Train's reports, DeepSpeed's and HF's warnings) goes to the run's
`logs/<stage>.log`, which the stage's first line names; `verbose` (`lmfleet run -v`) shows it on the
console too, as Ray prints it.

Two streams carry it to the driver: Ray's loggers in this process (`ray`, `ray.data`, ...), whose console
handlers are swapped for the file, and the workers' stdout / stderr, which Ray forwards to the driver
(`log_to_driver`) and hands to the handlers of `ray._private.worker.global_worker_stdstream_dispatcher`;
Ray's own there prints them, lmfleet's writes them to the file (and, verbose, calls Ray's as well).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class _StageLog:
    """The file Ray's output goes to: the running stage's (or, between stages, the last one's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.verbose = False

    def open(self, path: Path | None) -> None:
        with self.lock:
            self.path = path
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> None:
        with self.lock:
            if self.path is not None:
                try:
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write(text)
                    return
                except OSError:  # the run dir went away: the console is the only place left
                    pass
            if not self.verbose:  # no run's stage (a notebook, the tests' own Ray); verbose: Ray printed it
                sys.stderr.write(text)


_LOG = _StageLog()


class _Live:
    """On a terminal: one status line under lmfleet's log lines (the running step, a training stage's
    progress bar), redrawn in place; a log line clears it, is printed, and it is drawn again below."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stream = None  # the terminal (stderr) once `console_handler` found one
        self.text = ""

    def _fit(self) -> str:
        import shutil

        width = shutil.get_terminal_size((100, 24)).columns - 1  # a wrapped line could not be redrawn
        return self.text if len(self.text) <= width else self.text[: max(width - 3, 0)] + "..."

    def show(self, text: str) -> None:
        with self.lock:
            self.text = text
            self.stream.write("\r\033[K" + self._fit())
            self.stream.flush()

    def clear(self) -> None:
        with self.lock:
            if self.stream is not None and self.text:
                self.text = ""
                self.stream.write("\r\033[K")
                self.stream.flush()


_LIVE = _Live()


class _TerminalHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        with _LIVE.lock:
            if _LIVE.text:
                self.stream.write("\r\033[K")
            super().emit(record)
            if _LIVE.text:
                self.stream.write(_LIVE._fit())
                self.flush()


def console_handler() -> logging.Handler:
    """lmfleet's console handler (stderr): with a live status line on a terminal (not with -v, whose Ray
    lines would break it), plain lines otherwise (CI, Ray job logs, a pipe)."""
    if sys.stderr.isatty() and not _LOG.verbose:
        _LIVE.stream = sys.stderr
        return _TerminalHandler(sys.stderr)
    _LIVE.stream = None
    return logging.StreamHandler(sys.stderr)


def live() -> bool:
    return _LIVE.stream is not None


def status(text: str) -> None:
    """A step that starts: the live line on a terminal (the log file gets it as a line), else a line."""
    if live():
        _to_file(text)
        _LIVE.show(text)
    else:
        logging.getLogger("lmfleet").info("%s", text)


def done(text: str) -> None:
    """A step's result: a line, after the live line is cleared."""
    _LIVE.clear()
    logging.getLogger("lmfleet").info("%s", text)


def _to_file(text: str, level: int = logging.INFO) -> None:
    """A line of the run's log file only (logs/lmfleet.log), not the console."""
    record = logging.LogRecord("lmfleet", level, __file__, 0, "%s", (text,), None)
    for handler in logging.getLogger("lmfleet").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _FileHandler(logging.Handler):
    """Ray's driver-side log records, to the stage's log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _LOG.write(_FORMAT.format(record) + "\n")
        except Exception:  # logging must never take the run down
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _route_loggers(verbose: bool) -> None:
    """Ray's loggers that print to the console write to the stage's log instead (verbose: as well)."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not (name == "ray" or name.startswith("ray.")) or not isinstance(logger, logging.Logger):
            continue
        consoles = [h for h in logger.handlers if _is_console(h)]
        if not consoles or any(isinstance(h, _FileHandler) for h in logger.handlers):
            continue
        if not verbose:
            for h in consoles:
                logger.removeHandler(h)
        handler = _FileHandler(level=min(h.level for h in consoles))
        logger.addHandler(handler)


def _worker_lines(data: dict) -> None:
    """One batch of a worker's output lines (Ray's dict: pid, ip, actor_name / task_name, is_err, lines)."""
    name = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({name + ' ' if name else ''}pid={data.get('pid')}, ip={data.get('ip')}) "
    lines = [line for line in data.get("lines", []) if line.strip()]
    if lines:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        _LOG.write("".join(f"{stamp} {prefix}{line}\n" for line in lines))


def set_verbose(verbose: bool) -> None:
    """`lmfleet run -v`: Ray's and its workers' output on the console too."""
    _LOG.verbose = verbose


def verbose() -> bool:
    return _LOG.verbose


def route_ray_output() -> None:
    """Once Ray is initialized (and ray.data imported): its output to the stage logs (`stage_log`)."""
    verbose = _LOG.verbose
    _route_loggers(verbose)
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without it: its workers' lines stay on the console
        return
    dispatcher.remove_handler("lmfleet_worker_lines")  # a list: added once per Ray session
    dispatcher.add_handler("lmfleet_worker_lines", _worker_lines)
    if not verbose:
        dispatcher.remove_handler("ray_print_logs")
        _route_raylet_warnings()


def _route_raylet_warnings() -> None:
    """The raylet's warnings to the driver ("(raylet) WARNING: 10 PYTHON worker processes have been
    started ...", seen at the end of a search) skip the dispatcher: Ray's listen_error_messages prints
    them with print_to_stdstream, which only that thread calls once `ray_print_logs` is gone."""
    import ray._private.worker as ray_worker

    def print_to_stdstream(data, ignore_prefix):
        _worker_lines(data)

    ray_worker.print_to_stdstream = print_to_stdstream


def quiet_ray_startup() -> None:
    """Before `ray.init`: Ray's `ray` logger (configured when Ray is imported) to the stage log, so that
    what ray.init logs (the local instance, token authentication) is not printed."""
    _route_loggers(_LOG.verbose)


def stage_log(path: Path | None) -> None:
    """From now on Ray's output goes to `path` (a stage's log, in the run's local logs dir; None: the
    console)."""
    _LOG.open(path)


@dataclass(frozen=True)
class Failure:
    """Where a crashed stage's story is: its Ray / worker output and the run's log with the traceback."""

    stage: str
    output: str | Path
    log: str | Path


def log_traceback(err: BaseException, stage: str, what: str = "stage %s failed") -> None:
    """The full traceback of a stage's crash (or of `what` went wrong) into the run's log file only (the
    console gets `failure_block`, or a line)."""
    _to_file(f"{what % stage}:\n" + "".join(traceback.format_exception(err)), logging.ERROR)


def _tail(text: str, lines: int) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


def failure_block(err: BaseException, failure: Failure, lines: int = 6) -> str:
    """What the console says of a crashed stage: the stage, the failing worker's rank, its exception and
    last lines, and where the rest is (a Ray Train worker group's error carries each rank's traceback)."""
    ranks = getattr(err, "worker_failures", None) or {}
    if ranks:
        rank = min(ranks)
        cause = ranks[rank]
        more = f" (and {len(ranks) - 1} more)" if len(ranks) > 1 else ""
        where = f" on worker rank {rank}{more}"
    else:
        cause, where = getattr(err, "cause", None) or err, ""
    # A worker's exception comes back without its traceback; the group error's text holds each rank's.
    text = "".join(traceback.format_exception(cause)) if cause.__traceback__ else str(err if ranks else cause)
    last = _tail(str(cause), 1) if ranks else _tail(text, 1)
    head = f"{type(cause).__name__}: {last[0] if last else ''}"
    if last and re.match(r"^\w+(\.\w+)*(Error|Exception|Interrupt|Exit)\b", last[0]):
        head = last[0]  # a worker's traceback text ends with its exception's own line
    out = [f"stage {failure.stage} failed{where}: {head}"]
    tail = _tail(text, lines)
    if len(tail) > 1:
        out += ["  its last lines:", *(f"    {line}" for line in tail)]
    out += [f"  Ray's and its workers' output: {failure.output}", f"  the full traceback: {failure.log}"]
    return "\n".join(out)


# What a progress line shows of a metrics row, in this order (the first few a row has).
_SHOWN = ("loss", "val_loss", "eval_loss", "train_loss", "score", "reward", "kl", "tokens_per_s", "epoch")


def progress_line(row: dict, total: int | None, eta_s: float | None) -> str | None:
    """`step 40/120 loss 3.412 tokens_per_s 5,210 eta 1m05s` of a metrics row (step or iteration); None for
    a row with none of the values a line shows."""
    unit = "step" if "step" in row else "iteration"
    parts = [f"{unit} {row[unit]}" + (f"/{total}" if total else "")]
    for key in _SHOWN:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{key} {value:,.0f}" if abs(value) >= 1000 else f"{key} {value:.4g}")
        if len(parts) == 4:
            break
    if len(parts) == 1:
        return None
    if eta_s is not None:
        parts.append(f"eta {int(eta_s // 60)}m{int(eta_s % 60):02d}s")
    return " ".join(parts)


def bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return ""
    filled = min(width, width * done // total)
    return "[" + "#" * filled + "-" * (width - filled) + "] "


class Progress:
    """While a stage runs: a line per metrics row it logs with a step or iteration (its trainers write one
    every `log_every` steps, from any worker, into the driver's metrics.jsonl), read by a thread here; at
    most one each `min_gap_s` (RL stages log every iteration, ~1.4 s apart in the demo), except the first, the
    last and those with a validation value."""

    def __init__(self, stage: str, metrics: Path, total: int | None, every_s: float = 1.0, min_gap_s: float = 10.0):
        from lmfleet.runlog import JsonlTail

        self.stage, self.total, self.every_s, self.min_gap_s = stage, total, every_s, min_gap_s
        self.metrics = JsonlTail(metrics)
        self.first: tuple[float, int] | None = None
        self.shown = float("-inf")  # the time (of its row) of the last line shown
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="lmfleet-progress")

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        _LIVE.clear()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self._read()
        self._read()

    def _read(self) -> None:
        log = logging.getLogger("lmfleet")
        for row in self.metrics.read():
            unit = "step" if "step" in row else "iteration" if "iteration" in row else None
            if row.get("stage") != self.stage or unit is None or not isinstance(row[unit], int):
                continue
            now, done = row.get("time", time.time()), row[unit]
            eta = None
            if self.first is None:
                self.first = (now, done)
            elif self.total and done > self.first[1]:
                eta = (now - self.first[0]) / (done - self.first[1]) * max(self.total - done, 0)
            line = progress_line(row, self.total, eta)
            keep = done == self.total or any(k in row for k in ("val_loss", "eval_loss"))
            if line and live():  # every row to the bar; the file gets the lines a log would show
                _LIVE.show(f"[{self.stage}] {bar(done, self.total)}{line}")
            if line and (keep or now - self.shown >= self.min_gap_s):
                self.shown = now
                if live() and not keep:
                    _to_file(f"[{self.stage}] {line}")
                else:
                    log.info("[%s] %s", self.stage, line)
