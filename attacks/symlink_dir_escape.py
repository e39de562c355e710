"""A folder inside the model's folder is a symlink to a folder outside it."""

from __future__ import annotations

import os
from pathlib import Path

from attacks import _files

EXPECT = "resolves outside the model's folder"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    outside = Path(folder) / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    _files.secret_file(outside)
    os.symlink(outside.resolve(), _files.model_folder(folder) / "sub")
    return _files.external_model(folder, [("location", "sub/secret.bin"), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
