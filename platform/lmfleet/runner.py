"""The one runner every stage goes through: config -> run dir -> Ray -> stages in order -> report.

A run writes `runs/<name>/` (or `output_dir`, a path or an object store URI): `config.yaml` (resolved,
defaults filled in), `logs/lmfleet.log`, `metrics.jsonl`, one folder per stage with its outputs, and
`report.json`. With a URI the driver writes into its staging copy (lmfleet.outputs) and publishes: run
records (stage.json, report.json, config.yaml) at once, a stage's files, logs and metrics at the stage's
end and on failure.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmfleet import __version__, console, outputs, resources, storage, tracking
from lmfleet.config import RunConfig, apply_overrides, load_yaml, validate_model
from lmfleet.errors import InputError, UserError
from lmfleet.inputs import Input, check_overlap, digest, earlier_stage
from lmfleet.outputs import child
from lmfleet.runlog import MetricsLog, read_jsonl
from lmfleet.stages import StageSpec, resolve_stages
from lmfleet.uri import is_uri

log = logging.getLogger("lmfleet")
STAGE_STATE = "stage.json"  # in each stage dir: config, seed, status and (once it succeeded) its report


@dataclass
class LoadedRun:
    source: str
    config: RunConfig
    stages: list[StageSpec]

    def resolved(self) -> dict:
        data = self.config.model_dump(mode="json")
        data["stages"] = {
            s.name: {"kind": s.kind, **s.config.model_dump(mode="json")} for s in self.stages
        }
        return data


def load_run(path: str | Path, overrides: list[str] | None = None) -> LoadedRun:
    source = str(path)
    data = apply_overrides(load_yaml(path), overrides or [], source)
    config = validate_model(RunConfig, data, source)
    return LoadedRun(source, config, resolve_stages(config, source))


class RunFiles:
    """A run's output dir (`location`: an absolute path or a URI) and the driver's copy of it (`local`:
    the dir itself when local, else its staging dir)."""

    def __init__(self, location: Path | str):
        self.location = location
        self.local = outputs.staging(location)

    def write(self, rel: str, text: str) -> None:
        """Write a run record: into the local copy and through to the output dir."""
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.publish(rel)

    def publish(self, rel: str) -> None:
        outputs.publish(self.local / rel, child(self.location, rel))

    def fetch(self, rel: str) -> None:
        """Replace the local copy of `rel` with the output dir's (a run resumed on another machine)."""
        if is_uri(self.location) and outputs.exists(child(self.location, rel)):
            outputs.fetch(str(child(self.location, rel)), self.local / rel)


@dataclass
class StageContext:
    """What a stage function gets besides its config: where to write, the seed, logging and metrics.

    `out` is the stage's output dir (a path or URI: what reports name and workers write to, lmfleet.outputs);
    `out_dir` the local folder the driver writes its files into (`out` itself when local), published at the
    stage's end."""

    name: str
    out_dir: Path
    run_dir: Path | str
    seed: int
    metrics: MetricsLog
    storage: str  # where Ray Train / Tune keep this stage's checkpoints (lmfleet.storage)
    started: float  # when this run of the stage first started (a resumed run keeps its first start)
    out: Path | str
    seconds: dict[str, float] = field(default_factory=dict)

    def uri(self, *parts: str) -> str:
        """Where a file of the stage ends up, as reports name it."""
        return str(child(self.out, *parts))

    def publish(self, *parts: str) -> None:
        """Publish part of the driver's files now (workers read it before the stage ends)."""
        outputs.publish(self.out_dir.joinpath(*parts), child(self.out, *parts))

    def history(self, key: str | None = None) -> list[dict]:
        """This run's metrics records of the stage (with `key`): metrics.jsonl is the run's log across re-runs,
        and a resumed run's records count from its first start."""
        return [h for h in read_jsonl(self.metrics.path)
                if h.get("stage") == self.name and h["time"] >= self.started and (key is None or key in h)]

    def write_json(self, name: str, value) -> None:
        """A JSON file of the driver's stage files (eval.json, report.json)."""
        (self.out_dir / name).write_text(json.dumps(value, indent=2), encoding="utf-8")

    def write_report(self, report: dict) -> dict:
        """The stage's report.json (with the seconds of its steps); returns `report`."""
        self.write_json("report.json", {**report, "seconds": self.seconds})
        return report

    @contextmanager
    def step(self, step: str):
        """Times a named step, logs it, and records its seconds for the stage report. Yields a list: what
        the step appends to it (counts) ends its `done` line."""
        console.status(f"[{self.name}] {step} ...")
        start = time.perf_counter()
        said: list[str] = []
        yield said
        took = time.perf_counter() - start
        self.seconds[step] = round(took, 3)
        self.metrics.write(self.name, phase=step, seconds=round(took, 3))
        console.done(f"[{self.name}] {step} done in {took:.1f} s" + (f": {', '.join(said)}" if said else ""))


def _total_steps(config) -> int | None:
    """A training stage's steps or iterations, for its progress lines (None: not known ahead, as epochs)."""
    for path in (("steps",), ("iterations",), ("training", "max_steps")):
        value = config
        for key in path:
            value = getattr(value, key, None)
        if isinstance(value, int):
            return value
    return None


def _setup_logging(run_dir: Path) -> None:  # the driver's local copy of the run dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("lmfleet")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(run_dir / "logs" / "lmfleet.log"), console.console_handler()):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to `address` (or RAY_ADDRESS); without either, start an embedded local Ray on loopback."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    console.quiet_ray_startup()
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train's print patch logs prints even while a library captures stdout (dill does, to read
    # disassembly, when `datasets` fingerprints TRL's map functions): thousands of bytecode lines.
    if address:
        context = ray.init(address=address, log_to_driver=True,
                           runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    else:  # with the dashboard: Ray Train v2 needs its state API
        # An embedded Ray's workers inherit this process's environment. A job runtime_env instead would
        # keep tasks off the workers Ray starts with the node: 6.2 s -> 6.7-8.6 s for the data stage's
        # first read on the 2-core machine.
        os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
        # A local Ray takes the machine's IP as its node address and its servers (GCS, raylet, workers,
        # agents) listen on every interface; with ENABLE_RAY_CLUSTER off (Ray's own macOS / Windows
        # default) the node address is 127.0.0.1 and they listen on loopback only. Read by ray.init alone.
        cluster_default = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            context = ray.init(num_cpus=num_cpus, log_to_driver=True)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_default
    # On a terminal lmfleet's status line shows the running step; Ray Data's bars only with -v (without a
    # terminal they would print a line per update).
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty() and console.verbose()
    console.route_ray_output()
    url = context.dashboard_url
    dashboard = f"; dashboard {'' if '://' in url else 'http://'}{url}" if url else ""
    where = f"connected to {context.address_info.get('gcs_address') or address}" if address else "started locally"
    log.info("Ray %s: %s%s", ray.__version__, where, dashboard)


def _read_state(marker: Path | str) -> dict:
    return outputs.read_json(marker)


# -- ownership: lmfleet deletes and overwrites only what it wrote --

RUN_MARKER = ".lmfleet-run.json"  # in the run dir: {"name": run name}; the run's records below are lmfleet's
RUN_RECORDS = ("config.yaml", "report.json", "report.html", "metrics.jsonl", "logs", "tensorboard", "wandb")


def _run_owner(run_dir: Path | str) -> str | None:
    """The run that owns `run_dir` by its marker, or by the records of a run dir written before markers."""
    marker = _read_state(child(run_dir, RUN_MARKER))
    if marker:
        return marker.get("name")
    report = _read_state(child(run_dir, "report.json"))
    if report.get("run_dir") == str(run_dir) and outputs.is_file(child(run_dir, "config.yaml")):
        return report.get("name")
    return None


def _check_writable(run_dir: Path | str) -> None:
    if is_uri(run_dir):  # a bucket's permissions show only on a write: claim_run_dir's marker is the first
        outputs.check_bucket(run_dir)
        if outputs.is_file(run_dir):
            raise InputError(f"output_dir {run_dir}: is an object, not a prefix")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output_dir {run_dir}: exists and is not a folder")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output_dir {run_dir}: cannot create or write it ({existing} is not a writable folder)")


def check_run_dir(loaded: LoadedRun, stages: list[StageSpec], run_dir: Path | str) -> None:
    """InputError unless the run may write `run_dir`: new, without lmfleet's record names, or this run's;
    every stage dir to (re)write absent, empty or this run's own."""
    name = loaded.config.name
    entries = outputs.listdir(run_dir)
    if not entries:
        return
    owner = _run_owner(run_dir)
    if owner is not None and owner != name:
        raise InputError(f"output_dir {run_dir}: holds run {owner!r}, not {name!r}; set output_dir to a folder of "
                         "this run")
    if owner is None:
        clashes = [r for r in RUN_RECORDS if r in entries]
        if clashes:
            raise InputError(f"output_dir {run_dir}: holds {', '.join(clashes)}, which lmfleet did not write and "
                             "would overwrite; set output_dir to a new or empty folder")
    for spec in stages:
        if spec.name not in entries:
            continue
        stage_dir = child(run_dir, spec.name)
        state = _read_state(child(stage_dir, STAGE_STATE)) if not outputs.is_file(stage_dir) else {}
        ours = owner == name and state.get("run", name) == name and "kind" in state
        if not ours and (outputs.is_file(stage_dir) or outputs.listdir(stage_dir)):
            raise InputError(f"stages.{spec.name}: {stage_dir} holds files lmfleet did not write (no {STAGE_STATE} "
                             f"of run {name!r}); a run rewrites its stage dirs: rename the stage or set output_dir")


def preflight(loaded: LoadedRun, stages: list[StageSpec], run_dir: Path | str) -> dict[str, list[Input]]:
    """Before any work (run, validate, a job chain): the run dir may be written, and each stage's inputs
    exist and lie apart from it. Returns each stage's inputs."""
    _check_writable(run_dir)
    tracking.check(loaded.config.tracking)
    names = [s.name for s in loaded.stages]
    inputs = {}
    for i, spec in enumerate(stages):
        found = spec.preflight({s.name for s in stages[:i]}, run_dir)
        earlier = [child(run_dir, n) for n in names[: names.index(spec.name)]]
        for inp in found:
            check_overlap(inp, f"stages.{spec.name}", run_dir, earlier)
        inputs[spec.name] = found
    check_run_dir(loaded, stages, run_dir)
    return inputs


def claim_run_dir(run_dir: Path | str, name: str) -> None:
    """Create the run dir (after `check_run_dir`) and mark it as this run's."""
    try:
        if not is_uri(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        if not outputs.exists(child(run_dir, RUN_MARKER)):
            outputs.write_text(child(run_dir, RUN_MARKER), json.dumps({"name": name}))
    except OSError as err:
        raise InputError(f"output_dir {run_dir}: cannot write it ({err.strerror or err})") from None


# -- fingerprints: when a stage is up to date --

@functools.cache
def code_version() -> str:
    """lmfleet's version and a digest of its source: a changed lmfleet re-runs stages."""
    h = hashlib.blake2b(digest_size=8)
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{h.hexdigest()}"


def _stage_output(run_dir: Path | str, name: str) -> str | None:
    """What downstream stages know an earlier stage's outputs by: its fingerprint and finish time."""
    state = _read_state(child(run_dir, name, STAGE_STATE))
    return f"{state.get('fingerprint')}@{state.get('finished')}" if state.get("status") == "succeeded" else None


def stage_state(loaded: LoadedRun, spec: StageSpec, run_dir: Path | str, inputs: list[Input] | None = None) -> dict:
    """What identifies a stage's run: its kind, config, the run's seed, lmfleet's code, its input files
    (lmfleet.inputs) and every earlier stage's outputs; `fingerprint` is their digest."""
    names = [s.name for s in loaded.stages]
    earlier = names[: names.index(spec.name)]
    if inputs is None:  # after the earlier stages ran: their outputs exist, so check everything but theirs
        inputs = spec.preflight(set(earlier), run_dir)
    stage_dirs = {n: child(run_dir, n) for n in earlier}
    digests = {}
    for inp in inputs:
        upstream = earlier_stage(inp, stage_dirs)
        digests[inp.key] = f"stage {upstream}: {_stage_output(run_dir, upstream)}" if upstream else digest(inp)
    state = {"run": loaded.config.name, "kind": spec.kind, "config": spec.config.model_dump(mode="json"),
             "seed": loaded.config.seed, "code": code_version(), "inputs": digests,
             "upstream": {n: _stage_output(run_dir, n) for n in earlier}}
    text = json.dumps(state, sort_keys=True, default=str)
    return {**state, "fingerprint": hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}


def changes(previous: dict, state: dict) -> list[str]:
    """Why a stage is not up to date: what differs from its last run."""
    if previous.get("status") != "succeeded":
        return [f"its last run {previous.get('status', 'did not finish')}"]
    names = {"kind": "its kind", "config": "its config", "seed": "the seed", "code": "lmfleet's code"}
    out = [f"{names[k]} changed" for k in names if previous.get(k) != state[k]]
    out += [f"input {k} changed" for k, v in state["inputs"].items() if (previous.get("inputs") or {}).get(k) != v]
    out += [f"stage {k} ran again" for k, v in state["upstream"].items()
            if (previous.get("upstream") or {}).get(k) != v]
    return out or ["its fingerprint changed"]


def up_to_date(loaded: LoadedRun, spec: StageSpec, run_dir: Path | str, state: dict | None = None) -> dict | None:
    """The stage's last state if that run succeeded with the same fingerprint; else None."""
    previous = _read_state(child(run_dir, spec.name, STAGE_STATE))
    state = state or stage_state(loaded, spec, run_dir)
    if previous.get("status") == "succeeded" and previous.get("fingerprint") == state["fingerprint"]:
        return previous
    return None


# -- interrupts --

class Interrupts:
    """Whether SIGINT or SIGTERM arrived while a stage ran. Ray Train installs its own SIGINT handler
    during fit (it aborts the run and leaves by SystemExit), so the exception cannot tell: Python writes
    each signal's number to the wakeup fd whichever handler runs. SIGTERM (`ray job stop`, `kill`)
    becomes a KeyboardInterrupt, like Ctrl-C. Main thread only (signals are delivered there)."""

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.read, self.write = socket.socketpair()
            for sock in (self.read, self.write):
                sock.setblocking(False)
            self.wakeup = signal.set_wakeup_fd(self.write.fileno(), warn_on_full_buffer=False)
            self.sigint = signal.getsignal(signal.SIGINT)
            self.sigterm = signal.signal(signal.SIGTERM, _keyboard_interrupt)
        return self

    def seen(self) -> bool:
        if not self.active:
            return False
        try:
            received = self.read.recv(4096)
        except BlockingIOError:
            received = b""
        return bool({signal.SIGINT, signal.SIGTERM} & set(received))

    def __exit__(self, *exc):
        if self.active:
            signal.set_wakeup_fd(self.wakeup)
            signal.signal(signal.SIGINT, self.sigint)  # Ray Train leaves its handler, bound to a finished run
            signal.signal(signal.SIGTERM, self.sigterm)
            self.read.close()
            self.write.close()


def _keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


# -- running --

# Files of a stage that its resumed run appends to (written through the appender, lmfleet.runlog): a run
# resumed by a driver on another machine continues the output dir's copies.
APPENDED = ("samples.jsonl", "trials")
PUBLISH_EVERY_S = 60  # with a URI output dir: how often the growing logs are published while a stage runs


class _Publisher:
    """With a URI output dir, publishes the run's growing logs (metrics.jsonl, logs/, the running stage's
    appended files) every PUBLISH_EVERY_S while stages run: a driver that dies leaves them in the bucket."""

    def __init__(self, files: RunFiles):
        self.files, self.stage = files, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="lmfleet-publish")
        if is_uri(files.location):
            self.thread.start()

    def publish(self) -> None:
        for handler in logging.getLogger("lmfleet").handlers:
            handler.flush()
        stage = self.stage
        for rel in ("metrics.jsonl", "logs", *(f"{stage}/{r}" for r in APPENDED if stage)):
            self.files.publish(rel)

    def _loop(self) -> None:
        while not self.stop.wait(PUBLISH_EVERY_S):
            try:
                self.publish()
            except Exception as err:  # the bucket briefly unreachable: the next round or the stage's end retries
                log.warning("publishing the run's logs to %s failed: %s", self.files.location, err)

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def run(loaded: LoadedRun, address: str | None = None, only: list[str] | None = None, force: bool = False) -> dict:
    """Run the stages of a loaded config in order; returns the run report (also written to report.json).
    Stages that are `up_to_date` are skipped unless `force`; Ray starts only when a stage runs."""
    cfg = loaded.config
    run_dir = cfg.run_dir
    stages = [s for s in loaded.stages if not only or s.name in only]
    # Every stage checks its inputs before any stage does work, so a typo fails in seconds.
    inputs = preflight(loaded, stages, run_dir)
    claim_run_dir(run_dir, cfg.name)
    files = RunFiles(run_dir)
    for rel in ("metrics.jsonl", "logs"):  # the output dir's copies are the run's (another machine may have run it)
        files.fetch(rel)
    _setup_logging(files.local)
    files.write("config.yaml", yaml.safe_dump(loaded.resolved(), sort_keys=False))
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    metrics = MetricsLog(files.local / "metrics.jsonl")
    report: dict = {"name": cfg.name, "run_dir": str(run_dir), "status": "running", "stages": {},
                    "environment": environment()}

    publisher = _Publisher(files)

    def save_report() -> None:  # with the logs and metrics: at each stage's end and on failure
        files.write("report.json", json.dumps(report, indent=2))
        publisher.publish()

    if only:  # a stage re-run (or one job of a chain): keep the other stages' reports
        previous = _read_state(child(run_dir, "report.json")).get("stages", {})
        report["stages"] = {k: v for k, v in previous.items() if k not in only}
    started = time.perf_counter()
    try:
        for i, spec in enumerate(stages):
            # The first stage's inputs were checked above; later ones only now exist to digest.
            state = stage_state(loaded, spec, run_dir, inputs[spec.name] if i == 0 else None)
            stage_out = child(run_dir, spec.name)
            marker = f"{spec.name}/{STAGE_STATE}"
            previous = _read_state(child(run_dir, marker))
            if not force and (done := up_to_date(loaded, spec, run_dir, state)):
                log.info("stage %s: up to date (same config, seed, code and inputs): skipped; --force re-runs it",
                         spec.name)
                summary = ["up to date: not re-run (--force re-runs it)", *done["report"].get("summary", [])]
                report["stages"][spec.name] = {**done["report"], "skipped": True, "summary": summary}
                continue
            if previous and not force:
                log.info("stage %s: runs again: %s", spec.name, "; ".join(changes(previous, state)))
            console.stage_log(files.local / "logs" / f"{spec.name}.log")
            init_ray(address, cfg.ray.num_cpus)
            scaling = getattr(spec.config, "scaling", None)
            if scaling is not None:
                extra = spec.config.extra_bundles() if hasattr(spec.config, "extra_bundles") else []
                resources.ensure(f"stages.{spec.name}", scaling, cfg.ray.resource_wait_s, embedded=not address,
                                 extra=extra)
            ctx = StageContext(spec.name, files.local / spec.name, run_dir, cfg.seed, metrics,
                               storage.stage_storage(cfg.storage_path, cfg.name, stage_out), time.time(), stage_out)
            owner = {"run": cfg.name, "stage": spec.name}
            resume = (spec.resumes and previous.get("status") in ("running", "interrupted")
                      and previous.get("fingerprint") == state["fingerprint"])
            if resume:  # an interrupted run of the same stage (Ctrl-C, or a driver that died: still "running")
                log.info("stage %s: resuming its interrupted run in %s", spec.name, ctx.out)
                ctx.started = previous.get("started", ctx.started)
                for rel in APPENDED:
                    files.fetch(f"{spec.name}/{rel}")
            else:  # a stage rewrites its whole output dir (lmfleet's own, checked): stale files must not mix in
                if cfg.storage_path is not None:  # outside the stage dir: lmfleet's only if it carries the marker
                    storage.check_owned(ctx.storage, owner)
                outputs.remove(stage_out)
                shutil.rmtree(ctx.out_dir, ignore_errors=True)  # the staging copy (the same dir when local)
                storage.reset(ctx.storage, owner)  # nor old checkpoints, which Ray Train would resume from
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            publisher.stage = spec.name
            record = {**state, "started": ctx.started}
            files.write(marker, json.dumps({**record, "status": "running"}))
            log.info("stage %s (%s) -> %s (Ray's and its workers' output: %s)", spec.name, spec.kind, ctx.out,
                     child(run_dir, f"logs/{spec.name}.log"))
            with Interrupts() as signals:
                try:
                    with console.Progress(spec.name, metrics.path, _total_steps(spec.config)), \
                            _tracked(cfg, spec, files, ctx) as tracked:
                        stage_report = spec.run(ctx)
                        tracked.succeeded({"kind": spec.kind, **stage_report, "seconds": ctx.seconds})
                except BaseException as err:
                    interrupted = isinstance(err, KeyboardInterrupt) or signals.seen()
                    status = "interrupted" if interrupted else "failed"
                    files.publish(spec.name)  # what the stage wrote so far, for a look at what went wrong
                    files.write(marker, json.dumps({**record, "status": status}))
                    report.update(status=status, failed_stage=spec.name, error=f"{type(err).__name__}: {err}")
                    save_report()
                    if not interrupted:
                        write_report_html(run_dir)  # what it did until then, plots included (Ctrl-C exits at once)
                        if not isinstance(err, UserError):  # a crash: its traceback to the log file, not the console
                            console.log_traceback(err, spec.name)
                            err.lmfleet_failure = console.Failure(spec.name, child(run_dir, f"logs/{spec.name}.log"),
                                                                  child(run_dir, "logs/lmfleet.log"))
                        raise
                    again = "resumes it from its last checkpoint" if spec.resumes else "runs it again"
                    log.info("stage %s interrupted: the same command %s", spec.name, again)
                    if isinstance(err, KeyboardInterrupt) and str(err):
                        raise  # the stage's own words (a search says where it resumes)
                    raise KeyboardInterrupt(f"stage {spec.name!r} interrupted; the same command {again}") from None
            report["stages"][spec.name] = {"kind": spec.kind, **stage_report, "seconds": ctx.seconds,
                                           "cluster": cluster_resources()}
            files.publish(spec.name)  # the stage's files before its marker: a succeeded stage's outputs are all there
            for rel in ("tensorboard", "wandb"):  # the trackers' local files (lmfleet.tracking)
                if (files.local / rel).exists() and is_uri(run_dir):
                    files.publish(rel)
            files.write(marker, json.dumps({**record, "status": "succeeded", "finished": time.time(),
                                            "report": report["stages"][spec.name]}, default=str))
            save_report()
    finally:
        publisher.close()  # (Ray's output keeps going to the last stage's log: a crash's late lines too)
    report["status"] = "succeeded"
    report["seconds"] = round(time.perf_counter() - started, 3)
    save_report()
    write_report_html(run_dir)
    return report


class _Untracked:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def succeeded(self, report: dict) -> None:
        pass


def _tracked(cfg: RunConfig, spec: StageSpec, files: RunFiles, ctx: StageContext):
    """The stage's tracker runs (the run's `tracking:` block), or nothing to do."""
    if not cfg.tracking.enabled:
        return _Untracked()
    return tracking.StageTracking(cfg.tracking, cfg.name, spec.name, spec.kind, spec.config.model_dump(mode="json"),
                                  files.local / "metrics.jsonl", files.local, ctx.out_dir)


def write_report_html(run_dir: Path | str) -> None:
    """report.html of the run (lmfleet.report). A report that cannot be drawn costs the run nothing: the
    run's results stand, the reason goes to the log and `lmfleet report` tries again."""
    from lmfleet.report.page import write_html

    try:
        write_html(run_dir)
    except Exception as err:
        log.warning("report.html not written: %s: %s (`lmfleet report %s` tries again; the traceback is in "
                    "logs/lmfleet.log)", type(err).__name__, err, run_dir)
        console.log_traceback(err, str(run_dir), "report.html of %s not written")


def environment() -> dict:
    """What the run ran with: package versions and the driver's machine (the report's header)."""
    import platform as host  # the standard library's (lmfleet never puts platform/ on sys.path)
    from importlib import metadata

    versions = {"lmfleet": code_version(), "python": host.python_version()}
    for package in ("ray", "torch", "transformers", "trl", "peft", "deepspeed", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"versions": versions, "host": f"{host.system()} {host.machine()}, {os.cpu_count()} CPUs"}


def cluster_resources() -> dict:
    """The Ray cluster as a stage ended (an autoscaler may have added nodes for it)."""
    import ray

    total = ray.cluster_resources()
    return {"nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "cpus": total.get("CPU", 0),
            "gpus": total.get("GPU", 0),
            "accelerators": sorted(k.split(":", 1)[1] for k in total if k.startswith("accelerator_type:"))}
