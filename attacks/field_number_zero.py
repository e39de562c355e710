"""A field with number 0, which protobuf forbids."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "invalid field number 0"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    init = w.tensor("W", [1024], w.f32([0.5] * 1024))
    path.write_bytes(w.tag(0, w.WT_VARINT) + b"\x01" + w.simple_model(init))
    return path


if __name__ == "__main__":
    _files.main(build)
