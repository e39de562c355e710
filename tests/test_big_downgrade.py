"""Past 2 GiB, downgraded: an opset-18 inline model with Pad's axes input and
LayerNormalization converts down to 13, inline and external, and runs.

The inline result is itself past 2 GiB, which ONNX Runtime cannot open; it is
checked by converting it once more (to external data, no opset change) and
running that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures.bigmodel import NORM_OUTPUT, BigModelInfo, write_big_model
from streamconv import convert
from tests.conftest import ROOT, leftovers

pytestmark = pytest.mark.big

GIB = 1 << 30


@pytest.fixture(scope="module")
def big18(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigModelInfo]:
    folder = tmp_path_factory.mktemp("big18")
    info = write_big_model(folder / "big18.onnx", n_tensors=4, tensor_mib=560, opset=18,
                           norm_branch=True)
    yield info
    for path in folder.iterdir():
        if path.is_file():
            path.unlink()


def _outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"X": x}), strict=True))


def _check(path: Path, info: BigModelInfo) -> None:
    model = onnx.load(str(path), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 13)}
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" not in ops and "Pad" in ops
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    assert len(pad.input) <= 3  # no axes input at 13
    onnx.checker.check_model(str(path), full_check=True)
    x = np.linspace(-1, 1, info.k, dtype=np.float32)
    results = _outputs(path, x)
    for name, expected in info.expected_outputs(x).items():
        rtol = 1e-3 if name != NORM_OUTPUT else 1e-4
        np.testing.assert_allclose(results[name], expected, rtol=rtol, atol=1e-5, err_msg=name)


def test_external_down_to_13(big18: BigModelInfo, tmp_path: Path) -> None:
    """In a child process, whose own peak memory (VmHWM) must stay flat: the
    downgrade's shape inference and rewrites see the skeleton only."""
    assert big18.file_size > 2 * GIB
    dst = tmp_path / "big13.onnx"
    code = (
        "import sys; from streamconv.cli import main; rc = main(sys.argv[1:]); "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]);"
        " sys.exit(rc)"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, str(big18.path), str(dst), "--opset", "13",
             "--layout", "external", "-q"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
        peak_mib = int(result.stdout.strip().splitlines()[-1]) / 1024
        assert peak_mib < 250, peak_mib  # the weights are 2240 MiB
        _check(dst, big18)
    finally:
        for p in tmp_path.iterdir():
            p.unlink()


def test_inline_down_to_13(big18: BigModelInfo, tmp_path: Path) -> None:
    inline = tmp_path / "big13-inline.onnx"
    external = tmp_path / "big13-again.onnx"
    try:
        report = convert(big18.path, inline, opset=13, layout="inline")
        assert report.layout == "inline" and inline.stat().st_size > 2 * GIB
        again = convert(inline, external, opset=13, layout="external")
        assert again.opset_from == 13
        os.unlink(inline)
        _check(external, big18)
    finally:
        for p in tmp_path.iterdir():
            p.unlink()
    assert leftovers(tmp_path) == []
