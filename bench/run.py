"""Run the benchmark: ``python -m bench.run [--sizes 0.1,0.5] [--reps 3] [--quick]``.

For a tiny model (one node: what it costs is start-up, against ``python -c
"import numpy"`` as the floor), every model size (GB of inline weights) and every
graph-heavy node count it writes the model, then times each tool on it as a
separate process, repeating the set ``--reps`` times with the order reversed
on every other repetition (ABC CBA ABC), so that drift in the machine's speed hits every tool alike.
Runs are warm by default (the input read through just before each run); the
``cached`` column shows how much of it the page cache actually held.

Whole-model tools (onnx, onnx_ir) are recorded as n/a past protobuf's 2 GiB
limit, and skipped, with the reason, when the memory they would need is not
available.  Sizes whose input and two outputs do not fit on disk are skipped
too.  Models live in a temporary folder that is removed at the end; results
go to ``bench/results/`` (tiny.csv, bench.csv, nodes.csv, runs.csv, bench.png), each
result with the versions of python, onnx, numpy, ml_dtypes, protobuf and
onnxruntime it was measured with.  Then the throughput row (:mod:`bench.throughput`:
a batch of many small node models against a serial onnx loop, throughput.csv).
"""

from __future__ import annotations

import argparse
import compileall
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

from . import throughput as tp
from .measure import CACHE_MODES, MeasureError, available_memory, measure
from .models import (
    ModelFile,
    write_graph_heavy_model,
    write_tiny_model,
    write_weight_heavy_model,
)
from .report import (
    GB,
    MB,
    RESULTS,
    Run,
    Summary,
    check_goals,
    format_table,
    format_versions,
    summarize,
    write_csv,
)
from .tools import PROTOBUF_LIMIT, TOOLS, Tool
from .versions import versions

__all__ = ["main"]

log = logging.getLogger("bench")
N = TypeVar("N", int, float)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (0.1, 0.5, 1.5, 3.0, 8.0)
DEFAULT_NODES = (25_000, 50_000, 100_000)
QUICK_NODES = (5_000, 10_000)
DISK_MARGIN = 2 * GB
MEMORY_MARGIN = GB // 2
NODE_WEIGHT_MIB = 64
NODE_WEIGHTS = 2


def _numbers(text: str, kind: Callable[[str], N]) -> list[N]:
    """Parse ``"0.1,0.5"`` into positive numbers; raise ArgumentTypeError otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Time streamconv against cp, a bare copy_file_range copy, and onnx's "
        "own conversion paths on inline models of several sizes.",
    )
    p.add_argument("--sizes", type=lambda t: _numbers(t, float), default=list(DEFAULT_SIZES),
                   help="weight-heavy model sizes in GB, comma-separated "
                   f"(default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--nodes", type=lambda t: _numbers(t, int), default=None,
                   help="graph-heavy node counts, comma-separated "
                   f"(default {','.join(map(str, DEFAULT_NODES))}; with --quick "
                   f"{','.join(map(str, QUICK_NODES))})")
    p.add_argument("--no-nodes", action="store_true", help="skip the graph-heavy models")
    p.add_argument("--no-tiny", action="store_true",
                   help="skip the tiny model (start-up against python -c 'import numpy')")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every run (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small graph-heavy models, one run of onnx and onnx_ir")
    p.add_argument("--tools", default=",".join(t.name for t in TOOLS),
                   help="tools to run, comma-separated (default: all)")
    p.add_argument("--cache", choices=CACHE_MODES, default="warm",
                   help="warm: input read through before each run (default); "
                   "cold: input evicted from the page cache before each run")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the temporary models (default: the system's temp folder)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="folder for the CSV files and the figure (default bench/results)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    p.add_argument("--no-throughput", action="store_true",
                   help="skip the throughput row (bench.throughput: many small models, "
                   "the batch against a serial onnx loop)")
    p.add_argument("--throughput-models", type=int, default=None,
                   help=f"node models in the throughput row (default {tp.DEFAULT_MODELS}; "
                   f"--quick {tp.QUICK_MODELS})")
    return p


def source_version() -> str:
    """The last commit that changed streamconv/, ``+edits`` if the tree differs from it.

    ``unknown`` outside a git checkout.
    """
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "streamconv"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
        edits = subprocess.run(["git", "status", "--porcelain", "--", "streamconv"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+edits" if edits else "")


def _whole_model_skip(tool: Tool, model: ModelFile) -> str | None:
    """Why *tool* cannot run on *model* now, or None."""
    if not tool.whole_model:
        return None
    if model.file_size > PROTOBUF_LIMIT:
        return "n/a (cannot parse > 2 GiB)"
    need = tool.memory_factor * model.file_size + MEMORY_MARGIN
    have = available_memory()
    if need > have:
        return f"skipped: needs ~{need / GB:.1f} GB of memory, {have / GB:.1f} GB available"
    return None


def _measure_model(
    case: str, size_gb: float, model: ModelFile, tools: Sequence[Tool], args: argparse.Namespace,
    runs_out: list[Run],
) -> list[Summary]:
    """Time every tool on *model*, interleaved; return one summary per tool."""
    dst = model.path.with_name("out.onnx")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    notes: dict[str, str] = {}
    runs: list[Run] = []
    measured_with = versions()
    for rep in range(args.reps):
        order = tools if rep % 2 == 0 else tools[::-1]
        for tool in order:
            if tool.name in notes or (tool.floor and case != "tiny"):
                continue
            if tool.whole_model and args.quick and rep > 0:
                continue
            skip = _whole_model_skip(tool, model)
            if skip is not None:
                notes[tool.name] = skip
                log.info("  %-20s %s", tool.name, skip)
                continue
            load = os.getloadavg()[0]
            commit = source_version()
            try:
                sample = measure(
                    tool.command(model.path, dst), input_path=model.path,
                    outputs=tool.outputs(dst), cache=args.cache, cwd=REPO, env=env,
                )
            except MeasureError as e:
                notes[tool.name] = f"failed: {e}"
                log.warning("  %-20s failed: %s", tool.name, e)
                continue
            run = Run(case, size_gb, model.nodes, model.file_size, tool.name, rep,
                      sample.wall_s, sample.peak_rss_kib * 1024 / MB, sample.user_s,
                      sample.sys_s, sample.cached, load, commit, measured_with)
            runs.append(run)
            log.info("  rep %d %-20s %8.2f s %8.0f MB  cached %s  load %.1f", rep, tool.name,
                     run.wall_s, run.peak_rss_mb,
                     "?" if sample.cached is None else f"{sample.cached:.0%}", load)
    runs_out.extend(runs)
    if case != "tiny":
        tools = [t for t in tools if not t.floor]
    return summarize(case, size_gb, model.nodes, model.file_size, runs, notes, tools)


def _fits_on_disk(folder: Path, nbytes: float) -> tuple[bool, str]:
    free = shutil.disk_usage(folder).free
    need = 3 * nbytes + DISK_MARGIN  # input, two outputs, margin
    return free >= need, f"needs {need / GB:.1f} GB of disk, {free / GB:.1f} GB free"


def _bench_case(
    case: str, size_gb: float, nodes: int, write: Callable[[Path], ModelFile], estimate: float,
    tools: Sequence[Tool], args: argparse.Namespace, workdir: Path, runs: list[Run],
) -> list[Summary]:
    title = {"size": f"{size_gb:g} GB", "tiny": "tiny model"}.get(case, f"{nodes} nodes")
    fits, why = _fits_on_disk(workdir, estimate)
    if not fits:
        log.warning("%s: skipped, %s", title, why)
        return [Summary.empty(case, size_gb, nodes, int(estimate), t.name, f"skipped: {why}")
                for t in tools]
    path = workdir / "model.onnx"
    try:
        model = write(path)
        os.sync()
        log.info("%s: %s, %.3f GB, %d nodes", title, path.name, model.file_size / GB, model.nodes)
        return _measure_model(case, size_gb, model, tools, args, runs)
    finally:
        path.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.reps < 1:
        print(f"--reps must be >= 1, got {args.reps}", file=sys.stderr)
        return 2
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(wanted) - {t.name for t in TOOLS})
    if unknown:
        print(f"--tools: unknown {', '.join(unknown)}; known: "
              f"{', '.join(t.name for t in TOOLS)}", file=sys.stderr)
        return 2
    tools = [t for t in TOOLS if t.name in wanted]
    node_counts = [] if args.no_nodes else (
        args.nodes or list(QUICK_NODES if args.quick else DEFAULT_NODES))
    log.info("streamconv source %s; %s", source_version(), versions())
    # A regular installation byte-compiles the package; an editable one where
    # PYTHONDONTWRITEBYTECODE is set would compile it again in every run.
    compileall.compile_dir(str(REPO / "streamconv"), quiet=1)
    workdir = Path(tempfile.mkdtemp(prefix="streamconv-bench-", dir=args.workdir))
    runs: list[Run] = []
    tiny: list[Summary] = []
    sizes: list[Summary] = []
    nodes: list[Summary] = []
    try:
        if not args.no_tiny:
            tiny += _bench_case("tiny", 0.0, 1, write_tiny_model, 1e3, tools, args, workdir, runs)
        for size_gb in args.sizes:
            sizes += _bench_case(
                "size", size_gb, 0, partial(write_weight_heavy_model, size_gb=size_gb),
                size_gb * GB, tools, args, workdir, runs,
            )
        for n in node_counts:
            nodes += _bench_case(
                "nodes", 0.0, n,
                partial(write_graph_heavy_model, n_nodes=n, n_weights=NODE_WEIGHTS,
                        weight_mib=NODE_WEIGHT_MIB),
                NODE_WEIGHTS * NODE_WEIGHT_MIB * 2**20 + n * 100, tools, args, workdir, runs,
            )
    except KeyboardInterrupt:
        log.warning("interrupted; writing what was measured")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    throughput = [] if args.no_throughput else tp.run_throughput(
        args.throughput_models or (tp.QUICK_MODELS if args.quick else tp.DEFAULT_MODELS),
        tp.DEFAULT_OPSET, tp.DEFAULT_JOBS, 1 if args.quick else args.reps, tp.TOOLS,
        args.results, args.workdir)
    write_csv(args.results / "tiny.csv", tiny)
    write_csv(args.results / "bench.csv", sizes)
    write_csv(args.results / "nodes.csv", nodes)
    write_csv(args.results / "runs.csv", runs)
    print(format_table([*tiny, *sizes, *nodes]))
    print()
    print(format_versions([*tiny, *sizes, *nodes]))
    print()
    print("\n".join(check_goals(sizes, nodes, tiny)))
    if throughput:
        print()
        print(tp.format_table(throughput))
        print("\n".join(tp.check_goals(throughput)))
    if not args.no_plot and (sizes or nodes):
        from .plot import plot

        plot(sizes, nodes, args.results / "bench.png", format_versions([*tiny, *sizes, *nodes]))
        print(f"\nwrote {args.results / 'bench.png'} and the CSV files beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
