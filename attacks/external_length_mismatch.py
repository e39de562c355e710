"""The declared length disagrees with dims x element size (16 bytes for 1024 floats)."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "need 4096 bytes"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights.bin").write_bytes(bytes(4096))
    return _files.external_model(folder, [("location", "weights.bin"), ("length", "16")])


if __name__ == "__main__":
    _files.main(build)
