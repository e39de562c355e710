"""Ifs nested 24 deep: well within every nesting limit, and only a few kilobytes.

A walk that enters every subgraph of a node once per graph attribute does
2**24 visits here.
``EXPECT = None``: the file is valid and must convert, in seconds, not minutes.
"""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = None
VERIFY = 0


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    path.write_bytes(w.nested_if_model(24, payload=16))
    return path


if __name__ == "__main__":
    _files.main(build)
