"""Command line: ``python -m streamconv in.onnx out.onnx --opset N``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .api import DEFAULT_ALIGN, DEFAULT_THRESHOLD, LAYOUTS, convert
from .errors import StreamconvError

__all__ = ["main"]

EXIT_OK = 0
EXIT_CONVERSION = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class _Interrupted(BaseException):
    """Raised from a signal handler so cleanup code runs."""


def _on_signal(signum: int, frame: Any) -> None:
    # a second signal must not interrupt the clean-up this one starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Interrupted(signum)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every usage error
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _convert_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="streamconv",
        description="Convert an ONNX model to another opset version without loading its "
        "weights. Subcommands: 'streamconv batch SRC DST' converts a folder tree, "
        "'streamconv verify MODEL' checks a model's external-data references.",
    )
    p.add_argument("input", help="the model to convert (.onnx)")
    p.add_argument("output", help="where to write the converted model")
    p.add_argument(
        "--opset", type=int, default=None,
        help="target ai.onnx opset (default: the newest the installed onnx knows)",
    )
    p.add_argument(
        "--layout", choices=LAYOUTS, default="auto",
        help="inline: one file; external: model plus a data file; "
        "auto (default): inline when under 2 GiB, else external",
    )
    p.add_argument(
        "--size-threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BYTES",
        help=f"tensors larger than this are never loaded (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--data-name", default=None, metavar="NAME",
        help="external data file, relative to the output's folder (default: <output>.data)",
    )
    p.add_argument(
        "--align", type=int, default=DEFAULT_ALIGN, metavar="BYTES",
        help=f"alignment of tensors of 1 MiB or more in the data file (default {DEFAULT_ALIGN})",
    )
    p.add_argument("--check", dest="check", action="store_true", default=True,
                   help="validate the result with onnx.checker before writing it (default)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnx.checker validation")
    p.add_argument("--checksum", action="store_true",
                   help="record each external tensor's SHA-1 in its 'checksum' key")
    p.add_argument("--reuse-data", action="store_true",
                   help="reference the input's external-data files in place (when they lie in "
                   "the output's folder) instead of copying them into a new data file")
    p.add_argument("--inline-functions", action="store_true",
                   help="inline model-local functions into the graph before conversion")
    p.add_argument("--strict-onnx", action="store_true",
                   help="use onnx's version converter alone (its adapters only, as they are); "
                   "by default downgrades also use streamconv's own adapters")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", default=True,
                   help="do not sync the output to disk before and after moving it into place "
                   "(faster; a power loss may then leave an empty or truncated output)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    p.add_argument("--version", action="version", version=f"streamconv {__version__}")
    return p


def progress_bar(quiet: bool, desc: str) -> tuple[Any, Any]:
    """A tqdm bar on stderr and its ``update(done, total)``, or (None, None) when hidden."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    # no monitor thread: payloads are copied by a forked process only while
    # the program is single-threaded
    tqdm.monitor_interval = 0
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return bar, update


def _run_convert(argv: Sequence[str]) -> int:
    args = _convert_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="streamconv: %(message)s",
    )
    bar, update = progress_bar(args.quiet, "writing")
    try:
        report = convert(
            args.input, args.output, opset=args.opset, layout=args.layout,
            size_threshold=args.size_threshold, data_name=args.data_name, align=args.align,
            check=args.check, checksum=args.checksum, inline_functions=args.inline_functions,
            reuse_data=args.reuse_data, strict_onnx=args.strict_onnx, fsync=args.fsync,
            progress=update,
        )
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        where = report.destination + (f" + {report.data_file}" if report.data_file else "")
        print(
            f"converted {report.source} (opset {report.opset_from}) -> {where} "
            f"(opset {report.opset_to}, {report.layout}): {report.tensors_diverted} tensors, "
            f"{report.bytes_diverted / 1e6:.1f} MB streamed, {report.seconds:.2f} s, "
            f"check: {report.check}"
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 conversion failed, 2 bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # onnx imports numpy, whose OpenBLAS starts a thread per CPU that spins while
    # the import goes on; nothing here does linear algebra, and on 2 CPUs those
    # threads made `import numpy` take twice as long.  Only effective before numpy
    # is imported; a value the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            pass
    try:
        if args and args[0] == "batch":
            from .batch import run_batch

            return run_batch(args[1:])
        if args and args[0] == "verify":
            from .verify import run_verify

            return run_verify(args[1:])
        return _run_convert(args)
    except StreamconvError as e:
        print(f"streamconv: error: {e}", file=sys.stderr)
        return e.exit_code
    except _Interrupted as e:
        # a signal held during the publish arrives after it: the output is then complete
        print(f"streamconv: interrupted by signal {e.args[0]}; no partial output left",
              file=sys.stderr)
        return 128 + int(e.args[0])
    except KeyboardInterrupt:
        print("streamconv: interrupted; no partial output left", file=sys.stderr)
        return 130
    except MemoryError:
        print("streamconv: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug, not a user error: still one line, details with -v
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        print(f"streamconv: internal error: {type(e).__name__}: {e} "
              "(run with -v for details)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
