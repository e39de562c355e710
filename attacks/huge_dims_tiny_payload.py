"""Dims of 2**40 x 2**40 floats over 4 KiB of raw_data: sizes computed in 64 bits
overflow, and a reader that allocates by dims asks for 4 ZiB."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "need"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    init = w.tensor("W", [2**40, 2**40], w.f32([0.5] * 1024))
    path.write_bytes(w.simple_model(init))
    return path


if __name__ == "__main__":
    _files.main(build)
