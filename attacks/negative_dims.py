"""A dimension of -1 (two's complement, ten bytes) over a 4 KiB payload."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "negative dimension"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    init = w.tensor("W", [-1, 1024], w.f32([0.5] * 1024))
    path.write_bytes(w.simple_model(init))
    return path


if __name__ == "__main__":
    _files.main(build)
