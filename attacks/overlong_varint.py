"""A length prefix written as an 11-byte varint (protobuf allows at most 10).

A reader without the cap keeps shifting and builds an integer of any size."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "varint longer than 10 bytes"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    init = w.tensor("W", [1024], w.f32([0.5] * 1024))
    graph = w.field_bytes(5, init)
    overlong = w.tag(5, w.WT_LEN) + w.varint(len(init), min_bytes=11) + init
    body = w.simple_model(init)
    path.write_bytes(body.replace(graph, overlong))
    return path


if __name__ == "__main__":
    _files.main(build)
