"""An inline tensor whose raw_data is 4 bytes longer than dims x element size.

A reader that trusts dims reads past the payload; one that trusts the length
produces a tensor of the wrong shape."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "raw_data holds 4100 bytes"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    init = w.tensor("W", [1024], w.f32([0.5] * 1025))
    path.write_bytes(w.simple_model(init))
    return path


if __name__ == "__main__":
    _files.main(build)
