"""An inline tensor that also names streamconv's stub location, `__streamconv__/1`,
without `data_location = EXTERNAL`, beside a large tensor that becomes stub 1.

protobuf readers take it as an inline tensor (data_location says DEFAULT); a
splicer that found stubs by location alone would give it the large tensor's
bytes, or fail later with a confusing "came back twice".

``VERIFY = 0``: verify checks external-data references, and this tensor has none.
"""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "graph.initializer[1] 'V': location '__streamconv__/1' uses a reserved name"
VERIFY = 0


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    big = w.tensor("W", [1024], w.f32([0.5] * 1024))
    fake = w.tensor("V", [1024], w.f32([0.25] * 1024)) + w.field_bytes(
        13, w.field_str(1, "location") + w.field_str(2, "__streamconv__/1")
    )
    body = w.graph(
        "attack",
        [w.node("Add", ["X", "W"], ["A"]), w.node("Add", ["A", "V"], ["Y"])],
        inputs=[w.value_info("X")],
        outputs=[w.value_info("Y")],
        initializers=[big, fake],
    )
    path.write_bytes(w.model(body))
    return path


if __name__ == "__main__":
    _files.main(build)
