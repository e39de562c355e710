"""The in-memory conversion paths streamconv is compared with, one per process.

``python -m bench.workers onnx SRC DST --opset N`` runs ``onnx.load`` +
``onnx.version_converter.convert_version`` + ``onnx.save``;
``python -m bench.workers onnx_ir SRC DST --opset N`` runs ``onnx_ir.load`` +
``onnxscript.version_converter.convert_version`` + ``onnx_ir.save``;
``python -m bench.workers onnx_loop SRC_DIR DST_DIR --opset N`` does what the
first does for every ``*.onnx`` below SRC_DIR, in one process, one model after
the other (the serial reference of the throughput benchmark).

onnxscript's own converter starts at opset 18; for older models it hands the
graph (without its large initializers) to onnx's C++ converter when
``fallback=True``, which is what converting an opset-11 model requires.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["PATHS", "convert_tree_with_onnx", "convert_with_onnx", "convert_with_onnx_ir",
           "main"]


def convert_with_onnx(src: str, dst: str, opset: int) -> None:
    """Load *src* whole with onnx, convert it to *opset*, save it inline to *dst*."""
    import onnx
    from onnx import version_converter

    model = onnx.load(src)
    converted = version_converter.convert_version(model, opset)
    onnx.save(converted, dst)


def convert_with_onnx_ir(src: str, dst: str, opset: int) -> None:
    """Load *src* with onnx_ir, convert it with onnxscript, save it inline to *dst*."""
    import onnx_ir as ir
    from onnxscript import version_converter

    model = ir.load(src)
    version_converter.convert_version(model, opset, fallback=True)
    ir.save(model, dst)


def convert_tree_with_onnx(src_dir: str, dst_dir: str, opset: int) -> None:
    """:func:`convert_with_onnx` on every ``*.onnx`` below *src_dir*, in name order, one
    process, each to the same relative path below *dst_dir*."""
    import onnx
    from onnx import version_converter

    for root, dirs, files in os.walk(src_dir):
        dirs.sort()
        out = os.path.join(dst_dir, os.path.relpath(root, src_dir))
        for name in sorted(f for f in files if f.endswith(".onnx")):
            os.makedirs(out, exist_ok=True)
            model = onnx.load(os.path.join(root, name))
            converted = version_converter.convert_version(model, opset)
            onnx.save(converted, os.path.join(out, name))


PATHS: dict[str, Callable[[str, str, int], None]] = {
    "onnx": convert_with_onnx,
    "onnx_ir": convert_with_onnx_ir,
    "onnx_loop": convert_tree_with_onnx,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``PATH SRC DST --opset N``; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.workers")
    parser.add_argument("path", choices=sorted(PATHS), help="which conversion path to run")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--opset", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        PATHS[args.path](args.src, args.dst, args.opset)
    except Exception as e:  # report onnx's reason in one line; the runner records it
        reason = str(e).strip().splitlines()
        print(f"{args.path}: {type(e).__name__}: {reason[0] if reason else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
