"""An offset written ``4_096``: Python's int() reads 4096, a stricter reader refuses or stops at 4.

Two readers disagreeing on where a tensor lies is how a model passes one check
and loads other bytes elsewhere; only plain ASCII decimal is accepted.
"""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "offset '4_096' is not a plain decimal number"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights.bin").write_bytes(bytes(8192))
    return _files.external_model(
        folder, [("location", "weights.bin"), ("offset", "4_096"), ("length", "4096")]
    )


if __name__ == "__main__":
    _files.main(build)
