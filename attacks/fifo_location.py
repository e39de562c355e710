"""The data file is a named pipe: opening it for reading blocks forever.

It must be refused by its type, without being opened."""

from __future__ import annotations

import os
from pathlib import Path

from attacks import _files

EXPECT = "is not a regular file"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    os.mkfifo(_files.model_folder(folder) / "weights.bin")
    return _files.external_model(folder, [("location", "weights.bin"), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
