"""If nodes nested 34 deep with tiny payloads: the inner branches are too small for
the walker to enter, so its own depth limit is never met; protobuf's parser
(limit 100 messages) is the first to see the depth and must not be the one to
word the error."""

from __future__ import annotations

from pathlib import Path

from attacks import _files
from attacks import _wire as w

EXPECT = "nested"
VERIFY = 2


def build(folder: Path) -> Path:
    """Write the attack into *folder*; return the model's path."""
    path = _files.model_folder(folder) / "model.onnx"
    path.write_bytes(w.nested_if_model(34, payload=16))
    return path


if __name__ == "__main__":
    _files.main(build)
