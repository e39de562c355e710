"""Offset + length run past the end of the data file (a reader that trusts them
reads beyond the file, or maps memory it does not own)."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "runs past the end"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights.bin").write_bytes(bytes(4096))
    return _files.external_model(
        folder, [("location", "weights.bin"), ("offset", "2048"), ("length", "4096")]
    )


if __name__ == "__main__":
    _files.main(build)
