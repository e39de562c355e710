"""A tensor whose external-data location is streamconv's own stub marker,
`__streamconv__/1`, beside a large inline tensor that becomes stub 1.

If the splicer trusted it, the large tensor's bytes would be written twice,
or into the wrong tensor."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "reserved"
VERIFY = 1


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    big = w.tensor("W", [1024], w.f32([0.5] * 1024))
    fake = w.external_tensor("V", [1024], [("location", "__streamconv__/1"), ("length", "4096")])
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
