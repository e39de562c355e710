"""A model cut in the middle of an initializer's payload (an interrupted download)."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "exceeds the"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    init = w.tensor("W", [1024], w.f32([0.5] * 1024))
    body = w.simple_model(init)
    path.write_bytes(body[: len(body) // 2])
    return path


if __name__ == "__main__":
    _files.main(build)
