"""A raw_data length of 2**62 in a file of a few kilobytes."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "exceeds the"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    init = (
        w.field_varint(1, 1024) + w.field_varint(2, 1) + w.field_str(8, "W")
        + w.tag(9, w.WT_LEN) + w.varint(2**62) + w.f32([0.5] * 1024)
    )
    path.write_bytes(w.simple_model(init))
    return path


if __name__ == "__main__":
    _files.main(build)
