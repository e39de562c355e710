"""External data at an absolute path: a model that reads any file on the machine.

The reference names the absolute path of a file beside the model's folder.
It must be refused before the file is opened."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "is an absolute path"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    secret = _files.secret_file(folder)
    return _files.external_model(folder, [("location", str(secret.resolve())), ("length", "4096")])


if __name__ == "__main__":
    _files.main(build)
