"""Throughput on many small models: ``python -m bench.throughput [--models 1000] [--quick]``.

Writes ``--models`` of onnx's backend node models (``collect_testcases()``, no
download) as files in a temporary tree, every one a model onnx's own converter
takes to ``--opset`` (default 17) from another opset: in name order, those
already at the target and those onnx refuses left out (1,083 of onnx 1.23.2's
1,884 cases qualify for 17); past that count the same models are written again
under ``copy-<k>/``.  Then, in one run, it times each tool as its own process,
``--reps`` times, the order reversed on every other repetition:

- ``serial``: one Python process looping ``onnx.load`` + ``convert_version`` +
  ``onnx.save`` over the files (``python -m bench.workers onnx_loop``);
- ``pool``: ``python -m streamconv batch SRC DST --opset N --jobs J`` (the
  defaults: checker on, atomic publish, outputs synced);
- ``dask``: the same with ``--scheduler local`` (a LocalCluster of J workers);
- with ``--pools``, the same jobs on library pools instead of streamconv's own
  (``python -m bench.pools``: concurrent.futures and, where installed, pebble).

Each run's wall time, its ratio to the serial loop of the same repetition
(median over the repetitions), what was converted and failed, and the peak
resident memory of each kind of process in its tree (the VmHWM of every
process, sampled from /proc every 50 ms: the batch's parent, the converting
workers, Dask's worker processes) go to ``bench/results/throughput.csv``, each
run to ``throughput-runs.csv``, with the versions they were measured with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .measure import _settle
from .report import RESULTS, write_csv
from .versions import versions

__all__ = ["TOOLS", "ThroughputRun", "ThroughputSummary", "main", "run_throughput",
           "write_node_models"]

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = 1000
QUICK_MODELS = 100
DEFAULT_OPSET = 17
DEFAULT_JOBS = 2
#: the goal: a batch takes at most this fraction of the serial loop's wall time
GOAL = 0.6
_SAMPLE_SECONDS = 0.05
_MB = 10**6


@dataclass(frozen=True)
class Tool:
    """One way of converting the tree, as a command line; ``{src}``, ``{dst}``,
    ``{opset}``, ``{jobs}`` and ``{report}`` are filled in."""

    name: str
    label: str
    argv: tuple[str, ...]
    #: needs a library that may not be installed (checked before the run)
    needs: str | None = None


_PY = sys.executable
_BATCH = (_PY, "-m", "streamconv", "batch", "{src}", "{dst}", "--opset", "{opset}",
          "--jobs", "{jobs}", "-q", "--report", "{report}")
TOOLS: tuple[Tool, ...] = (
    Tool("serial", "serial onnx loop",
         (_PY, "-m", "bench.workers", "onnx_loop", "{src}", "{dst}", "--opset", "{opset}")),
    Tool("pool", "streamconv batch --jobs {jobs}", _BATCH),
    Tool("dask", "streamconv batch --scheduler local --jobs {jobs}",
         (*_BATCH, "--scheduler", "local"), needs="distributed"),
)
POOL_TOOLS: tuple[Tool, ...] = (
    Tool("process_pool", "concurrent.futures.ProcessPoolExecutor (one task per model)",
         (_PY, "-m", "bench.pools", "process_pool", "{src}", "{dst}", "--opset", "{opset}",
          "--jobs", "{jobs}", "--report", "{report}")),
    Tool("pebble", "pebble.ProcessPool (one task per model, per-task timeout)",
         (_PY, "-m", "bench.pools", "pebble", "{src}", "{dst}", "--opset", "{opset}",
          "--jobs", "{jobs}", "--report", "{report}"), needs="pebble"),
)


@dataclass(frozen=True)
class ThroughputRun:
    """One timed run of one tool over the tree (a row of ``throughput-runs.csv``)."""

    models: int
    opset: int
    jobs: int
    tool: str
    rep: int
    wall_s: float
    converted: int
    failed: int
    #: peak RSS of the process started (the batch's parent, or the serial loop)
    peak_parent_mb: float
    #: largest peak RSS among the processes that convert (pool workers, a Dask task's child)
    peak_worker_mb: float | None
    #: largest peak RSS among Dask's worker processes
    peak_dask_worker_mb: float | None
    #: processes seen in the run's tree, the first one included
    processes: int
    load_1min: float
    commit: str
    versions: str


@dataclass(frozen=True)
class ThroughputSummary:
    """Every run of one tool, reduced to medians (a row of ``throughput.csv``).

    ``x_serial`` is the median of per-repetition ratios to the serial loop's
    wall time in the same repetition.
    """

    models: int
    opset: int
    jobs: int
    tool: str
    label: str
    runs: int
    wall_median_s: float | None
    wall_min_s: float | None
    wall_max_s: float | None
    x_serial: float | None
    ms_per_model: float | None
    converted: int | None
    failed: int | None
    peak_parent_mb: float | None
    peak_worker_mb: float | None
    peak_dask_worker_mb: float | None
    load_1min: float | None
    commit: str
    versions: str
    note: str = ""


# -- the models ------------------------------------------------------------------------------


def _node_cases() -> list[object]:
    from onnx.backend.test.case import node

    # the generators compute reference outputs with numpy, warn and print on purpose
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return sorted(node.collect_testcases(None), key=lambda c: c.name)


def write_node_models(folder: Path, count: int, opset: int) -> list[Path]:
    """Write *count* node models that onnx converts to *opset* below *folder*; their paths.

    Cases in name order, leaving out those already at *opset* and those onnx's
    converter refuses; when fewer qualify than *count*, they are written again
    under ``copy-<k>/`` until there are *count*.
    """
    import onnx
    from onnx import version_converter

    chosen: list[tuple[str, bytes]] = []
    for case in _node_cases():
        if len(chosen) >= count:
            break
        model = case.model  # type: ignore[attr-defined]
        own = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        if not own or max(own) == opset:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                version_converter.convert_version(model, opset)
        except Exception:
            continue
        chosen.append((case.name, model.SerializeToString()))  # type: ignore[attr-defined]
    if not chosen:
        raise RuntimeError(f"onnx {onnx.__version__} converts no node case to opset {opset}")
    paths = []
    for i in range(count):
        name, data = chosen[i % len(chosen)]
        copy = i // len(chosen)
        path = folder / (f"copy-{copy}" if copy else "") / "node" / name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


# -- measuring a process tree ----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return "other"
    if "streamconv.batch.executors" in cmdline or "bench.pools" in cmdline:
        return "worker"
    if "resource_tracker" in cmdline or "forkserver" in cmdline:
        return "other"
    if "multiprocessing" in cmdline or "distributed" in cmdline:
        return "dask_worker"
    return "other"


class TreeSampler:
    """Peak RSS (VmHWM) of every process below a root, sampled until stopped."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peaks: dict[int, int] = {}
        self.kinds: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(_SAMPLE_SECONDS):
                return

    def sample(self) -> None:
        todo = [self.root]
        while todo:
            pid = todo.pop()
            hwm = _hwm_kib(pid)
            if hwm is None:
                continue
            if pid not in self.kinds:
                self.kinds[pid] = "parent" if pid == self.root else _kind(pid)
            elif self.kinds[pid] == "other" and pid != self.root:
                self.kinds[pid] = _kind(pid)  # a fork that has exec'd since
            self.peaks[pid] = max(hwm, self.peaks.get(pid, 0))
            todo += _children(pid)

    def peak_mb(self, kind: str) -> float | None:
        values = [kib for pid, kib in self.peaks.items() if self.kinds.get(pid) == kind]
        return max(values) * 1024 / _MB if values else None


def _outcome(tool: Tool, report: Path, dst: Path) -> tuple[int, int]:
    """(converted, failed) of a run: the batch's report, or the files the loop wrote."""
    if tool.name == "serial":
        return sum(1 for _ in dst.rglob("*.onnx")), 0
    counts = json.loads(report.read_text())["counts"]
    if counts.get("skipped", 0):
        raise RuntimeError(f"{tool.name}: {counts['skipped']} model(s) skipped as up to date "
                           "in a fresh output folder")
    return counts["converted"] + counts["at_target"], counts["failed"]


def _time_one(tool: Tool, src: Path, work: Path, models: int, opset: int, jobs: int,
              rep: int, commit: str, measured_with: str) -> ThroughputRun:
    dst, report = work / f"out-{tool.name}", work / f"report-{tool.name}.json"
    shutil.rmtree(dst, ignore_errors=True)
    report.unlink(missing_ok=True)
    values = {"{src}": str(src), "{dst}": str(dst), "{opset}": str(opset),
              "{jobs}": str(jobs), "{report}": str(report)}
    argv = [values.get(a, a) for a in tool.argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    os.sync()
    _settle()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with TreeSampler(proc.pid) as sampler:
        _, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 1):  # 1: some model failed, which the counts say
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"{tool.name} exited with {proc.returncode}: "
                           f"{lines[-1] if lines else 'no message'}")
    converted, failed = _outcome(tool, report, dst)
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    return ThroughputRun(
        models, opset, jobs, tool.name, rep, wall, converted, failed,
        sampler.peak_mb("parent") or 0.0, sampler.peak_mb("worker"),
        sampler.peak_mb("dask_worker"), len(sampler.peaks), load, commit, measured_with,
    )


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def summarize(runs: Sequence[ThroughputRun], tools: Sequence[Tool], models: int, opset: int,
              jobs: int, notes: dict[str, str]) -> list[ThroughputSummary]:
    """One summary per tool, in order, from the runs of one tree."""
    serial = {r.rep: r.wall_s for r in runs if r.tool == "serial"}
    out = []
    for tool in tools:
        label = tool.label.replace("{jobs}", str(jobs))
        mine = [r for r in runs if r.tool == tool.name]
        if not mine:
            out.append(ThroughputSummary(models, opset, jobs, tool.name, label, 0, None, None,
                                         None, None, None, None, None, None, None, None, None,
                                         "", "", notes.get(tool.name, "not run")))
            continue
        walls = [r.wall_s for r in mine]
        ratios = [r.wall_s / serial[r.rep] for r in mine if serial.get(r.rep)]
        workers = [r.peak_worker_mb for r in mine if r.peak_worker_mb is not None]
        dask = [r.peak_dask_worker_mb for r in mine if r.peak_dask_worker_mb is not None]
        median = statistics.median(walls)
        out.append(ThroughputSummary(
            models, opset, jobs, tool.name, label, len(mine), median, min(walls), max(walls),
            statistics.median(ratios) if ratios else None, median / models * 1000,
            min(r.converted for r in mine), max(r.failed for r in mine),
            max(r.peak_parent_mb for r in mine), max(workers) if workers else None,
            max(dask) if dask else None, statistics.median(r.load_1min for r in mine),
            ",".join(sorted({r.commit for r in mine})),
            " | ".join(sorted({r.versions for r in mine})), notes.get(tool.name, ""),
        ))
    return out


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} MB"


def format_table(rows: Sequence[ThroughputSummary]) -> str:
    """The Markdown table of the README's throughput row."""
    lines = ["| tool | wall (median) | x serial loop | per model | converted / failed "
             "| peak RSS: parent | per worker | per Dask worker |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.runs or r.wall_median_s is None:
            lines.append(f"| {r.label} | {r.note} | | | | | | |")
            continue
        ratio = "" if r.x_serial is None else f"{r.x_serial:.2f}x"
        lines.append(
            f"| {r.label} | {r.wall_median_s:.2f} s ({r.wall_min_s:.2f}-{r.wall_max_s:.2f}) "
            f"| {ratio} | {r.ms_per_model:.1f} ms | {r.converted} / {r.failed} "
            f"| {_mb(r.peak_parent_mb)} | {_mb(r.peak_worker_mb)} "
            f"| {_mb(r.peak_dask_worker_mb)} |"
        )
    return "\n".join(lines)


def check_goals(rows: Sequence[ThroughputSummary]) -> list[str]:
    """PASS/MISS against the goal, for the batch's two executors."""
    lines = []
    for r in rows:
        if r.tool in ("pool", "dask") and r.x_serial is not None:
            verdict = "PASS" if r.x_serial <= GOAL else "MISS"
            lines.append(f"{verdict}  throughput  {r.label} on {r.models} node models: "
                         f"{r.x_serial:.2f}x the serial onnx loop (goal <= {GOAL}x)")
    return lines


def run_throughput(models: int, opset: int, jobs: int, reps: int, tools: Sequence[Tool],
                   results: Path, workdir: Path | None = None) -> list[ThroughputSummary]:
    """Write the tree, time every tool on it, write the CSV files; return the summaries."""
    from .run import source_version

    commit, measured_with = source_version(), versions()
    notes: dict[str, str] = {}
    runnable = []
    for tool in tools:
        if tool.needs is not None and not _have(tool.needs):
            notes[tool.name] = f"not run: {tool.needs} is not installed"
        else:
            runnable.append(tool)
    work = Path(tempfile.mkdtemp(prefix="streamconv-throughput-", dir=workdir))
    runs: list[ThroughputRun] = []
    try:
        src = work / "src"
        written = write_node_models(src, models, opset)
        log.info("throughput: %d node models (%.1f MB) to opset %d, --jobs %d", len(written),
                 sum(p.stat().st_size for p in written) / _MB, opset, jobs)
        for rep in range(reps):
            order = runnable if rep % 2 == 0 else runnable[::-1]
            for tool in order:
                if tool.name in notes:
                    continue
                try:
                    run = _time_one(tool, src, work, models, opset, jobs, rep, commit,
                                    measured_with)
                except (RuntimeError, OSError, ValueError, KeyError) as e:
                    notes[tool.name] = f"failed: {e}"
                    log.warning("  %-12s failed: %s", tool.name, e)
                    continue
                runs.append(run)
                log.info("  rep %d %-12s %7.2f s  %d converted, %d failed  worker %s  "
                         "load %.1f", rep, tool.name, run.wall_s, run.converted, run.failed,
                         _mb(run.peak_worker_mb) or "-", run.load_1min)
    except KeyboardInterrupt:
        log.warning("interrupted; writing what was measured")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs, tools, models, opset, jobs, notes)
    write_csv(results / "throughput.csv", rows)
    write_csv(results / "throughput-runs.csv", runs)
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput",
                                description="Time streamconv batch against a serial onnx "
                                "loop on many small models.")
    p.add_argument("--models", type=int, default=None,
                   help=f"node models in the batch (default {DEFAULT_MODELS}; "
                   f"--quick {QUICK_MODELS})")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"target opset (default {DEFAULT_OPSET})")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help=f"worker processes (default {DEFAULT_JOBS})")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions of every run (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer models, one rep")
    p.add_argument("--no-dask", action="store_true", help="leave out --scheduler local")
    p.add_argument("--pools", action="store_true",
                   help="also time the same jobs on library process pools (bench.pools)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="folder for the CSV files (default bench/results)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the temporary tree (default: the system's temp folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the throughput benchmark; print the table and the goal lines."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    reps = args.reps or (1 if args.quick else 3)
    if models < 1 or reps < 1 or args.jobs < 1:
        print("--models, --reps and --jobs must be >= 1", file=sys.stderr)
        return 2
    tools = [t for t in TOOLS if not (args.no_dask and t.name == "dask")]
    if args.pools:
        tools += POOL_TOOLS
    rows = run_throughput(models, args.opset, args.jobs, reps, tools, args.results,
                          args.workdir)
    print(format_table(rows))
    print()
    print("\n".join(sorted({r.versions for r in rows if r.versions})))
    print()
    print("\n".join(check_goals(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
