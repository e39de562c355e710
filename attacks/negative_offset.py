"""A negative offset: Python slicing would silently read from the end of the file."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "negative offset"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights.bin").write_bytes(bytes(8192))
    return _files.external_model(
        folder, [("location", "weights.bin"), ("offset", "-4096"), ("length", "4096")]
    )


if __name__ == "__main__":
    _files.main(build)
