"""A Constant whose ``value`` tensor is written twice, each copy consistent on its own.

Protobuf merges two copies of a single message field: the dims of both add
up to [1024, 1024] while raw_data keeps only the last 4 KiB.  A reader that
checks each copy alone, as it walks them, then writes a tensor whose data
disagrees with its dims; the file must be refused instead.
"""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "appears 2 times"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    copy = w.field_bytes(5, w.tensor("W", [1024], w.f32([0.5] * 1024)))
    value = w.field_str(1, "value") + copy + copy + w.field_varint(20, 4)
    body = w.graph(
        "attack",
        [w.node("Constant", [], ["W"], [value]), w.node("Add", ["X", "W"], ["Y"])],
        inputs=[w.value_info("X")],
        outputs=[w.value_info("Y")],
    )
    path.write_bytes(w.model(body))
    return path


if __name__ == "__main__":
    _files.main(build)
