"""A file that is not ONNX at all (a zip archive's first bytes)."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "byte 2, model: invalid field number 0"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    path.write_bytes(b"PK\x03\x04" + bytes(60))
    return path


if __name__ == "__main__":
    _files.main(build)
