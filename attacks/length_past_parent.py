"""An initializer whose length runs past the end of its graph (but not of the file).

Readers that check lengths only against the file read the next message as payload."""

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
    good = w.field_bytes(5, init)
    body = w.simple_model(init)
    liar = w.field_bytes(5, init, length=len(init) + 40)
    # Padding after the graph keeps the lie inside the file: only the parent is overrun.
    path.write_bytes(body.replace(good, liar) + bytes(64))
    return path


if __name__ == "__main__":
    _files.main(build)
