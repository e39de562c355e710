"""An offset of 2**64 - 1: arithmetic that wraps would land inside the file."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "runs past the end"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights.bin").write_bytes(bytes(4096))
    return _files.external_model(
        folder,
        [("location", "weights.bin"), ("offset", str(2**64 - 1)), ("length", "4096")],
    )


if __name__ == "__main__":
    _files.main(build)
