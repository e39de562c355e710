"""A length written in Arabic-Indic digits (``٤٠٩٦``), which Python's int() reads as 4096."""

from __future__ import annotations

from pathlib import Path

from attacks import _files

EXPECT = "length '٤٠٩٦' is not a plain decimal number"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    (_files.model_folder(folder) / "weights.bin").write_bytes(bytes(4096))
    return _files.external_model(
        folder, [("location", "weights.bin"), ("length", "\u0664\u0660\u0669\u0666")]
    )


if __name__ == "__main__":
    _files.main(build)
