"""The versions of what a result depends on, recorded next to every result.

Start-up time hangs on them more than on streamconv itself: onnx imports numpy and
ml_dtypes on every call, and one ml_dtypes release took four times as long to
import as the one before it.  A figure without them cannot be reproduced.
"""

from __future__ import annotations

import importlib.metadata
import platform

__all__ = ["PACKAGES", "versions"]

#: the distributions whose versions go with every result, in this order
PACKAGES = ("onnx", "numpy", "ml_dtypes", "protobuf", "onnxruntime")


def versions() -> str:
    """``"python 3.11.7; onnx 1.23.2; numpy 2.4.6; ..."`` for this interpreter.

    A package that is not installed reads ``absent``.
    """
    parts = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} absent")
    return "; ".join(parts)
