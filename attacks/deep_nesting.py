"""If nodes nested 300 deep, each then-branch holding the next If.

Recursive readers overflow the Python stack or hit protobuf's recursion limit
with an unhelpful message; the answer must be one clear line."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "nested more than"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    path.write_bytes(w.nested_if_model(300, payload=4096))
    return path


if __name__ == "__main__":
    _files.main(build)
