"""A `..` hidden in the middle of the location: `sub/../../secret.bin`.

A check of the first component alone misses it; the normalized path escapes."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "escapes the model's folder"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    _files.secret_file(folder)
    (_files.model_folder(folder) / "sub").mkdir(exist_ok=True)
    return _files.external_model(
        folder, [("location", "sub/../../secret.bin"), ("length", "4096")]
    )


if __name__ == "__main__":
    _files.main(build)
