"""The data file is a hard link to a file outside the model's folder.

No path shows the escape; a link count above one is the only sign."""

from __future__ import annotations

import os
from pathlib import Path

from attacks import _files

EXPECT = "hard links"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    secret = _files.secret_file(folder)
    os.link(secret, _files.model_folder(folder) / "weights.bin")
    return _files.external_model(folder, [("location", "weights.bin"), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
