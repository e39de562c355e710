"""The data file does not exist."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "cannot be opened"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    return _files.external_model(folder, [("location", "weights.bin"), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
