"""External data that climbs out of the model's folder with `..`.

Must be refused before anything is read."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "escapes the model's folder"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    _files.secret_file(folder)
    return _files.external_model(folder, [("location", "../secret.bin"), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
