"""A location with a NUL byte: C code would read a different path than Python checks."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "NUL byte"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights.bin").write_bytes(bytes(4096))
    return _files.external_model(
        folder, [("location", "weights.bin\0../../secret.bin"), ("length", "4096")]
    )


if __name__ == "__main__":
    _files.main(build)
