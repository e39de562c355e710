"""The location names a folder, not a file."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "is not a regular file"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights").mkdir(exist_ok=True)
    return _files.external_model(folder, [("location", "weights"), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
