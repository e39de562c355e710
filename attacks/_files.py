"""File helpers shared by the attack scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from attacks import _wire as w

__all__ = ["SECRET", "external_model", "main", "model_folder", "secret_file"]

#: What the files outside the model's folder hold; it must never reach an output.
SECRET = b"TOP-SECRET-BYTES" * 256


def model_folder(folder: Path) -> Path:
    """``folder/model``, created."""
    path = Path(folder) / "model"
    path.mkdir(parents=True, exist_ok=True)
    return path


def secret_file(folder: Path, name: str = "secret.bin") -> Path:
    """A 4 KiB file beside the model's folder that no reference may reach."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / name
    path.write_bytes(SECRET)
    return path


def external_model(
    folder: Path, entries: Sequence[tuple[str, str]], dims: Sequence[int] = (1024,)
) -> Path:
    """``folder/model/model.onnx``: ``Y = X + W`` with W (float32) stored as external data."""
    path = model_folder(folder) / "model.onnx"
    path.write_bytes(w.simple_model(w.external_tensor("W", dims, entries)))
    return path


def main(build: Callable[[Path], Path]) -> None:
    """Command line of every attack: ``python -m attacks.<name> FOLDER``."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {build.__module__} FOLDER")
    print(build(Path(sys.argv[1])))
