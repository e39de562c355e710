"""The command line: ``streamconv convert|batch|verify|inspect ...``.

One parser with subcommands sharing parent parsers, and the one place that
owns exit codes, error and warning lines, JSON output and the progress bar.
``streamconv IN OUT ...`` is ``streamconv convert IN OUT ...``; a file that
happens to be called like a subcommand is named ``./batch``.  The library
never imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .api import DEFAULT_ALIGN, DEFAULT_THRESHOLD, LAYOUTS
from .errors import Interrupted, StreamconvError, UsageError, one_line

__all__ = ["EXIT_CODES", "SUBCOMMANDS", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
#: Every exit code, as ``--help`` and the README list them.
EXIT_CODES: tuple[tuple[str, str], ...] = (
    ("0", "success (verify: every reference sound; batch: every model converted, "
          "copied or up to date)"),
    ("1", "a conversion failed: no equivalent at the target, onnx's converter failed, or the "
          "result failed the checker (batch: some model failed; verify: a problem was found)"),
    ("2", "bad input, options or output folder (a file that is not a model, a bad external-"
          "data reference, an unwritable destination)"),
    ("3", "internal error: a bug in streamconv (run with -v for details)"),
    ("128+N", "interrupted by signal N: 130 for Ctrl-C (SIGINT), 143 for SIGTERM; "
              "no partial output is left"),
)
SUBCOMMANDS = ("convert", "batch", "verify", "inspect")

#: Columns of ``--help``, whatever the terminal.
HELP_WIDTH = 92

MIB = 1 << 20
GIB = 1 << 30

log = logging.getLogger("streamconv")


class _UsageExit(Exception):
    """argparse found a usage error; its message becomes the one error line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        # "streamconv: error: batch: ..." names the subcommand once
        command = self.prog.partition(" ")[2]
        raise _UsageExit(f"{command}: {message}" if command else message)


# -- output conventions ----------------------------------------------------------------------


def size_text(n: int) -> str:
    """*n* bytes in binary units, the same everywhere (bar, summaries, inspect)."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def _emit(text: str) -> None:
    """Print a line on stdout; a reader that went away (``| head``) is fine."""
    try:
        print(text)
    except BrokenPipeError:
        # point stdout at /dev/null so that later prints and the final flush stay quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _emit_json(obj: Any) -> None:
    _emit(json.dumps(obj, indent=1, default=str))


def _error(text: str) -> None:
    print(one_line(f"streamconv: error: {text}"), file=sys.stderr)


def _warn(text: str) -> None:
    print(one_line(f"streamconv: warning: {text}"), file=sys.stderr)


def _note(text: str, args: argparse.Namespace) -> None:
    """Human-readable output: stdout, or stderr when stdout carries the JSON."""
    if args.quiet:
        return
    if getattr(args, "json", False):
        print(text, file=sys.stderr)
    else:
        _emit(text)


def _progress_bar(quiet: bool, desc: str, *, postfix: bool = False) -> Any:
    """A tqdm bar on stderr counting bytes in binary units, or None when hidden."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    # no monitor thread: payloads are copied by a forked process only while
    # the program is single-threaded
    tqdm.monitor_interval = 0
    return tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                leave=postfix, file=sys.stderr, dynamic_ncols=True)


def _bytes_updater(bar: Any) -> Callable[[int, int], None] | None:
    if bar is None:
        return None

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update


# -- the parser ------------------------------------------------------------------------------


def _default_jobs() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _output_parent(json_what: str) -> _Parser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help=f"print {json_what} as one JSON object on stdout "
                   "(the progress bar stays on stderr)")
    quiet = g.add_mutually_exclusive_group()
    quiet.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar, summary or warnings")
    quiet.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def _conversion_parent() -> _Parser:
    """The options of one conversion: ``convert`` and ``batch`` share every one."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("conversion")
    # no number in the help: onnx must not be imported before a conversion starts
    # (its payload copy overlaps that import)
    g.add_argument("--opset", type=int, default=None, metavar="N",
                   help="target ai.onnx opset (default: the newest the installed onnx knows)")
    g.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="inline: one file; external: model plus a data file; auto (default): "
                   "inline when under 2 GiB, else external (batch: a model with external data "
                   "stays external)")
    g.add_argument("--size-threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BYTES",
                   help=f"tensors larger than this are never loaded (default {DEFAULT_THRESHOLD})")
    g.add_argument("--data-name", default=None, metavar="NAME",
                   help="data file, relative to the output's folder (default <output>.data; "
                   "batch: a pattern with {name} or {stem}, the model's file name with or "
                   "without .onnx)")
    g.add_argument("--align", type=int, default=DEFAULT_ALIGN, metavar="BYTES",
                   help=f"alignment of tensors of 1 MiB or more in the data file "
                   f"(default {DEFAULT_ALIGN})")
    g.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="validate each result with onnx.checker before writing it "
                   "(default: --check)")
    g.add_argument("--checksum", action="store_true",
                   help="record each external tensor's SHA-1 in its 'checksum' key")
    g.add_argument("--reuse-data", action="store_true",
                   help="reference the input's data files in place when they lie in the "
                   "output's folder, instead of copying them")
    g.add_argument("--inline-functions", action="store_true",
                   help="inline model-local functions into the graph before conversion")
    g.add_argument("--strict-onnx", action="store_true",
                   help="use onnx's version converter alone, its adapters as they are")
    g.add_argument("--no-fsync", dest="fsync", action="store_false", default=True,
                   help="do not sync outputs to disk (faster; a power loss may then leave "
                   "empty or truncated outputs)")
    g.add_argument("--storage-options", default=None, metavar="JSON",
                   help="options of the file system for s3://, gs://, hf://, http(s):// "
                   "paths, passed to fsspec as they are, e.g. "
                   "'{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}'")
    return p


def _epilog() -> str:
    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES:
        lines += textwrap.wrap(meaning, HELP_WIDTH, initial_indent=f"  {code:<6} ",
                               subsequent_indent=" " * 9)
    return "\n".join(lines) + "\n"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Fixed width, so that ``--help`` reads the same everywhere (and the README can match)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=HELP_WIDTH, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit codes:"):  # the epilog is laid out already
            return text
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the top-level parser and its four subcommands."""
    conversion = _conversion_parent()
    top = _Parser(
        prog="streamconv",
        usage="streamconv [-h] [--version] {convert,batch,verify,inspect} ...\n"
        "       streamconv IN OUT [options]      (same as: streamconv convert IN OUT)",
        description="Convert ONNX models between opset versions without loading their "
        "weights: inline models past 2 GiB, external data, whole model zoos.",
        epilog=_epilog(), formatter_class=_Formatter,
    )
    top.add_argument("--version", action="version", version=f"streamconv {__version__}")
    sub = top.add_subparsers(dest="command", metavar="{convert,batch,verify,inspect}")

    p = sub.add_parser(
        "convert", prog="streamconv convert",
        parents=[conversion, _output_parent("the conversion's report")],
        help="convert one model", formatter_class=_Formatter, epilog=_epilog(),
        description="Convert one model to another opset; the output appears atomically.",
    )
    p.add_argument("input", metavar="IN", help="the model to convert (.onnx)")
    p.add_argument("output", metavar="OUT", help="where to write the converted model")

    p = sub.add_parser(
        "batch", prog="streamconv batch",
        parents=[conversion, _output_parent("the per-model report")],
        help="convert every *.onnx below a folder", formatter_class=_Formatter,
        epilog=_epilog(),
        description="Convert every *.onnx below SRC_DIR to the same place below DST_DIR. "
        "Models already at the target opset are copied through with their external data; "
        "outputs that are up to date (same source and data files, target and byte-changing "
        "options, recorded in DST_DIR/.streamconv.batch.json) are skipped, so an interrupted "
        "batch can be rerun.",
    )
    p.add_argument("src_dir", metavar="SRC_DIR",
                   help="folder to read models from, or a URL (s3://bucket/zoo/ ...)")
    p.add_argument("dst_dir", metavar="DST_DIR",
                   help="folder to write them to (created), or a URL")
    g = p.add_argument_group("batch")
    g.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="models converted at once, one worker process each "
                   "(default: the number of cores)")
    g.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="fail a model whose conversion takes longer (default: no limit)")
    g.add_argument("--report", default=None, metavar="FILE",
                   help="write the per-model report: JSON, or CSV if FILE ends in .csv")
    g.add_argument("--force", action="store_true", help="redo outputs that are up to date")
    g.add_argument("--force-convert", action="store_true",
                   help="convert models already at the target instead of copying them")
    g.add_argument("--verify", action="store_true",
                   help="run original and result in ONNX Runtime on the same inputs "
                   "(test_data_set_* or seeded random); a mismatch fails the model")
    g.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only paths matching GLOB (repeatable; a GLOB without '/' may match "
                   "any part of the path)")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out paths matching GLOB (repeatable)")
    g.add_argument("--copy-other", action="store_true",
                   help="also copy files that are neither models nor their external data")
    g.add_argument("--dry-run", action="store_true", help="list what would be done and stop")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS|local",
                   help="run one Dask task per model on the cluster at ADDRESS "
                   "(tcp://host:8786; default: $DASK_SCHEDULER_ADDRESS), or on a LocalCluster "
                   "of --jobs processes for 'local'; workers must share SRC_DIR and DST_DIR "
                   "(a shared folder, or a bucket) (needs streamconv[dask])")
    g.add_argument("--scheduler-file", default=None, metavar="FILE",
                   help="the Dask scheduler file to connect to, instead of --scheduler"),

    p = sub.add_parser(
        "verify", prog="streamconv verify", parents=[_output_parent("every model's checks")],
        help="check external-data references", formatter_class=_Formatter, epilog=_epilog(),
        description="Check every external-data reference of ONNX models without loading "
        "their weights: file present, inside the model's folder, offset + length within the "
        "file, length = dims x element size, and the SHA-1 checksum where one is recorded. "
        "Exit 0 when all are sound, 1 when a problem was found, 2 when a model is unreadable.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files (.onnx)")
    p.add_argument("--no-checksum", dest="checksums", action="store_false",
                   help="do not hash the data (no data byte is read)")

    p = sub.add_parser(
        "inspect", prog="streamconv inspect", parents=[_output_parent("every model's description")],
        help="describe a model without loading its weights", formatter_class=_Formatter,
        epilog=_epilog(),
        description="Describe ONNX models without loading their weights, at any size: IR "
        "version and opsets, nodes and ops, tensors and bytes by storage and place, the "
        "largest tensors, functions and training_info, what a conversion would do, and the "
        "reachable opset range.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files (.onnx)")
    p.add_argument("--size-threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BYTES",
                   help=f"the conversion's threshold to assume (default {DEFAULT_THRESHOLD})")
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help="options of the file system for URL models (see convert --help)")
    p.add_argument("--no-reach", dest="reach", action="store_false",
                   help="skip the reachable opset range (it converts the skeleton in memory)")
    return top


def _normalize(argv: list[str]) -> list[str]:
    """The bare form ``streamconv IN OUT ...`` is ``convert``; ``./batch`` is a file."""
    if not argv:
        return argv
    first = argv[0]
    if first in SUBCOMMANDS or first in ("-h", "--help", "--version"):
        return argv
    return ["convert", *argv]


# -- the commands ----------------------------------------------------------------------------


def _run_convert(args: argparse.Namespace) -> int:
    from .api import convert

    storage_options = _storage_options(args)
    bar = _progress_bar(args.quiet, "writing")
    try:
        report = convert(
            args.input, args.output, opset=args.opset, layout=args.layout,
            size_threshold=args.size_threshold, data_name=args.data_name, align=args.align,
            check=args.check, checksum=args.checksum, inline_functions=args.inline_functions,
            reuse_data=args.reuse_data, strict_onnx=args.strict_onnx, fsync=args.fsync,
            progress=_bytes_updater(bar), storage_options=storage_options,
        )
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        for warning in report.warnings:
            _warn(f"{report.source}: {warning}")
    if args.json:
        _emit_json(report.to_dict())
    where = report.destination + (f" + {report.data_file}" if report.data_file else "")
    _note(f"converted {report.source} (opset {report.opset_from}) -> {where} "
          f"(opset {report.opset_to}, {report.layout}): {report.tensors_diverted} tensors, "
          f"{size_text(report.bytes_diverted)} streamed, {report.seconds:.2f} s, "
          f"check: {report.check}", args)
    return EXIT_OK


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.storage_options is None:
        return None
    from .storage import parse_storage_options

    return parse_storage_options(args.storage_options)


def _batch_options(args: argparse.Namespace) -> Any:
    from .batch import BatchOptions
    from .converter import max_opset

    options = BatchOptions(
        opset=max_opset() if args.opset is None else args.opset,
        jobs=_default_jobs() if args.jobs is None else args.jobs,
        layout=args.layout, size_threshold=args.size_threshold, align=args.align,
        check=args.check, force=args.force, force_convert=args.force_convert,
        strict_onnx=args.strict_onnx, timeout=args.timeout, verify=args.verify,
        include=tuple(args.include), exclude=tuple(args.exclude), copy_other=args.copy_other,
        fsync=args.fsync, checksum=args.checksum, inline_functions=args.inline_functions,
        reuse_data=args.reuse_data, data_name=args.data_name,
        scheduler=args.scheduler if args.scheduler is not None or args.scheduler_file
        else os.environ.get("DASK_SCHEDULER_ADDRESS") or None,
        scheduler_file=args.scheduler_file, storage_options=_storage_options(args),
    )
    options.validate()
    return options


def _run_batch(args: argparse.Namespace) -> int:
    from .batch import check_folders, convert_tree, dry_run, summary_lines, write_report

    options = _batch_options(args)
    if "://" not in args.src_dir + args.dst_dir:
        check_folders(args.src_dir, args.dst_dir)  # a remote batch checks its own
    if options.scheduler is not None or options.scheduler_file is not None:
        # Dask logs every worker's start and stop at INFO; -v shows them
        logging.getLogger("distributed").setLevel(
            logging.DEBUG if args.verbose else logging.WARNING)
    if args.report is not None and not os.path.isdir(
            os.path.dirname(os.path.abspath(args.report))):
        raise UsageError(f"--report: folder of {args.report} does not exist")
    if args.dry_run:
        rows = dry_run(args.src_dir, args.dst_dir, options)
        if args.json:
            _emit_json({"dry_run": [{"action": a, "path": p, "detail": d} for a, p, d in rows]})
        else:
            for action, rel, detail in rows:
                _emit(one_line(f"{action:<10} {rel}" + (f"  ({detail})" if detail else "")))
        counts: dict[str, int] = {}
        for action, _, _ in rows:
            counts[action] = counts.get(action, 0) + 1
        _note("dry run: " + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
              if counts else "dry run: nothing to do", args)
        return EXIT_OK
    bar = _progress_bar(args.quiet, "converting", postfix=True)

    def update(event: Any) -> None:
        if bar.total != event.bytes_total:
            bar.total = event.bytes_total
        bar.set_postfix_str(f"{event.models_done}/{event.models_total} models", refresh=False)
        bar.update(event.bytes_done - bar.n)

    try:
        result = convert_tree(args.src_dir, args.dst_dir, options,
                              progress=update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if args.report is not None:
        try:
            write_report(args.report, result)
        except OSError as e:
            raise UsageError(f"cannot write the report {args.report}: {e.strerror}") from e
    if not args.quiet:
        for model in result.models:
            for warning in model.warnings:
                _warn(f"{model.source}: {warning}")
    if args.json:
        _emit_json(result.to_dict())
    _note("\n".join(summary_lines(result)), args)
    if result.interrupted is not None:
        _error(f"interrupted by signal {result.interrupted}; finished outputs are kept, none "
               "is half-written; rerun to continue")
        return 128 + result.interrupted
    return EXIT_FAILED if result.failed else EXIT_OK


def _run_verify(args: argparse.Namespace) -> int:
    from .verify import verify_model

    status = EXIT_OK
    found: list[dict[str, Any]] = []
    for model in args.models:
        bar = _progress_bar(args.quiet, "hashing")
        try:
            report = verify_model(model, checksums=args.checksums, progress=_bytes_updater(bar))
        except StreamconvError as e:
            _error(str(e))
            found.append({"model": model, "error": str(e)})
            status = EXIT_USAGE
            continue
        finally:
            if bar is not None:
                bar.close()
        found.append({"model": report.model, "ok": report.ok, "inline": report.inline,
                      "bytes_hashed": report.bytes_hashed,
                      "tensors": [dataclasses.asdict(t) for t in report.tensors]})
        if not args.json:
            for check in report.tensors:
                if not (args.quiet and check.ok):
                    _emit(check.describe())
            _emit(one_line(report.summary()))
        if not report.ok and status == EXIT_OK:
            status = EXIT_FAILED
    if args.json:
        _emit_json({"ok": status == EXIT_OK, "models": found})
    return status


def _table(rows: Sequence[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def _describe(ins: Any) -> list[str]:
    """The human-readable form of an Inspection."""
    lines = [f"{ins.source}: {size_text(ins.file_size)} ({ins.file_size} bytes), "
             f"IR version {ins.ir_version}" + (f", produced by {ins.producer}" if ins.producer
                                               else "")]
    lines.append("opsets: " + ", ".join(f"{d} {v}" for d, v in ins.opsets.items()))
    places = ", ".join(f"{n} in {k}" for k, n in ins.nodes_by_place.items() if n)
    lines.append(f"nodes: {ins.nodes}" + (f" ({places})" if places else ""))
    ops = list(ins.ops.items())
    shown = ", ".join(f"{op} {n}" for op, n in ops[:12])
    lines.append(f"ops: {len(ops)} kinds: {shown}" + (", ..." if len(ops) > 12 else ""))
    lines.append("tensors and bytes by storage:")
    b, t = ins.bytes, ins.tensors
    lines += _table([
        ("raw_data", f"{t['raw_data']:>6} tensors  {size_text(b['raw_data'])}"),
        ("typed fields", f"{t['typed_fields']:>6} tensors  {size_text(b['typed_fields'])}"),
        ("structure", f"{'':>6}          {size_text(b['structure'])} (nodes, names, shapes)"),
        ("external", f"{t['external']:>6} tensors  {size_text(b['external'])}"
                     + (f" in {len(ins.external_files)} file(s)" if ins.external_files else "")),
    ])
    lines += _table([(f"  {name}", size_text(n)) for name, n in ins.external_files.items()])
    lines.append("tensors by place:")
    lines += _table([(place, f"{n:>6} tensors  {size_text(ins.bytes_by_place[place])}")
                     for place, n in ins.tensors_by_place.items() if n])
    if ins.largest:
        lines.append("largest tensors:")
        lines += _table([
            (f"{i.path} '{i.name}'",
             f"{i.data_type}{i.dims}  {size_text(i.nbytes)}  {i.storage}"
             + (f" ({i.location})" if i.location else ""))
            for i in ins.largest
        ])
    if ins.functions:
        lines.append(f"functions: {len(ins.functions)}")
        lines += _table([(f"{f['domain']}.{f['name']}", f"{f['nodes']} nodes")
                         for f in ins.functions])
    else:
        lines.append("functions: none")
    lines.append(f"training_info: {ins.training_info or 'none'}")
    c = ins.conversion
    lines.append(f"conversion at --size-threshold {c['size_threshold']}: "
                 f"{c['tensors_diverted']} tensors ({size_text(c['bytes_diverted'])}) streamed; "
                 f"layout auto would write {c['layout_auto']} "
                 f"(about {size_text(c['estimated_inline_size'])} inline)")
    r = ins.reachable
    if r is not None:
        lines.append(f"reachable opsets: {r['lowest']} to {r['highest']} (now {r['opset']})")
        if r["below"]:
            lines.append(f"  below {r['lowest']}: {r['below']}")
        if r["above"]:
            lines.append(f"  above {r['highest']}: {r['above']}")
    return [one_line(line) for line in lines]


def _run_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_model

    if args.size_threshold < 0:
        raise UsageError(f"--size-threshold must be >= 0, got {args.size_threshold}")
    storage_options = _storage_options(args)
    status = EXIT_OK
    found: list[dict[str, Any]] = []
    for n, model in enumerate(args.models):
        try:
            ins = inspect_model(model, size_threshold=args.size_threshold, reach=args.reach,
                                storage_options=storage_options)
        except StreamconvError as e:
            _error(str(e))
            found.append({"source": model, "error": str(e)})
            status = max(status, e.exit_code)
            continue
        if not args.quiet:
            for warning in ins.warnings:
                _warn(f"{model}: {warning}")
        found.append(ins.to_dict())
        if not args.json:
            if n:
                _emit("")
            for line in _describe(ins):
                _emit(line)
    if args.json:
        _emit_json({"models": found})
    return status


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert": _run_convert, "batch": _run_batch, "verify": _run_verify, "inspect": _run_inspect,
}


# -- entry point -----------------------------------------------------------------------------


def _on_signal(signum: int, frame: Any) -> None:
    # a second signal must not interrupt the clean-up this one starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on *argv*; return the exit code (see ``EXIT_CODES``)."""
    # onnx imports numpy, whose OpenBLAS starts a thread per CPU that spins while
    # the import goes on; nothing here does linear algebra, and on 2 CPUs those
    # threads made `import numpy` take twice as long.  Only effective before numpy
    # is imported; a value the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = _normalize(list(sys.argv[1:] if argv is None else argv))
    # handlers first: a signal at any moment from here on ends in the one clean exit
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            pass
    try:
        return _dispatch(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageExit as e:
        _error(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    except Interrupted as e:
        return 128 + e.signum
    if args.command is None:
        _error("a subcommand or IN OUT is needed (see streamconv --help)")
        return EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="streamconv: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except StreamconvError as e:
        _error(str(e))
        return e.exit_code
    except Interrupted as e:
        # a signal held during the publish arrives after it: the output is then complete
        _error(f"interrupted by signal {e.signum}; no partial output left")
        return 128 + e.signum
    except KeyboardInterrupt:
        _error("interrupted; no partial output left")
        return 128 + int(signal.SIGINT)
    except MemoryError:
        _error("out of memory")
        return EXIT_USAGE
    except Exception as e:  # a bug, not a user error: still one line, details with -v
        log.debug("internal error", exc_info=True)
        print(one_line(f"streamconv: internal error: {type(e).__name__}: {e} "
                       "(run with -v for details)"), file=sys.stderr)
        return EXIT_INTERNAL
