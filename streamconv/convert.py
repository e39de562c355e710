"""Convert the skeleton with onnx's version converter."""

from __future__ import annotations

import logging

import onnx
from onnx import defs, helper, version_converter

from .errors import ConversionError, UsageError

__all__ = [
    "DEFAULT_DOMAINS",
    "convert_model",
    "default_opset",
    "max_opset",
    "validate_target",
]

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 1


def max_opset() -> int:
    """Newest ai.onnx opset the installed onnx knows."""
    return int(defs.onnx_opset_version())


def validate_target(opset: int) -> int:
    """Return *opset* if onnx can convert to it, else raise UsageError."""
    newest = max_opset()
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise UsageError(f"--opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET or opset > newest:
        raise UsageError(
            f"--opset must be between {MIN_OPSET} and {newest} "
            f"(the newest opset onnx {onnx.__version__} knows), got {opset}"
        )
    return opset


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version; raises ConversionError if it has none."""
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        raise ConversionError("the model imports no ai.onnx opset, so there is nothing to convert")
    return int(max(versions))


def min_ir_version(opset: int) -> int:
    """Lowest IR version that can carry ai.onnx *opset*."""
    try:
        return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)], True))
    except Exception:  # an opset newer than onnx's table: leave the IR version alone
        return 0


def convert_model(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert *model* (a skeleton) to ai.onnx *target* with onnx's converter.

    Raises ConversionError carrying onnx's reason when the converter refuses.
    """
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as e:  # onnx raises ConvertError, RuntimeError, ValueError…
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"onnx's version converter failed: {reason}") from e
    needed = min_ir_version(target)
    if converted.ir_version < needed:
        converted.ir_version = needed
    return converted
