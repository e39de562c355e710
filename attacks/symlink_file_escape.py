"""The data file inside the model's folder is a symlink to a file outside it.

The location looks harmless; only its real path shows the escape."""

from __future__ import annotations

import os
from pathlib import Path

from attacks import _files

EXPECT = "resolves outside the model's folder"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    secret = _files.secret_file(folder)
    os.symlink(secret.resolve(), _files.model_folder(folder) / "weights.bin")
    return _files.external_model(folder, [("location", "weights.bin"), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
