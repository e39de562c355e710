"""The core promise: an inline model past 2 GiB converts, runs, and keeps every byte.

protobuf (and so onnx.load and ONNX Runtime) cannot open the input at all.
The model is written by fixtures.bigmodel's own wire writer into a temporary
folder and deleted afterwards.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures.bigmodel import BigModelInfo, write_big_model
from streamconv import convert
from streamconv.skeleton import build_skeleton
from tests.conftest import ROOT, leftovers

pytestmark = pytest.mark.big

GIB = 1 << 30


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> object:
    folder = tmp_path_factory.mktemp("big")
    info = write_big_model(folder / "big.onnx", n_tensors=4, tensor_mib=560, opset=11)
    yield info
    for name in os.listdir(folder):
        path = folder / name
        if path.is_file():
            path.unlink()


def payload_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every diverted payload in *path*, as stored, found by re-scanning it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        sk = build_skeleton(buf, size, str(path), 1 << 20, for_conversion=False)
        buf.close()
        out = {}
        # read, not sliced from the mapping: the pages would stay in this process
        for p in sk.payloads.values():
            h = hashlib.sha256()
            for pos in range(p.offset, p.offset + p.length, 64 << 20):
                h.update(os.pread(f.fileno(), min(64 << 20, p.offset + p.length - pos), pos))
            out[p.name] = h.hexdigest()
    return out


def test_input_is_beyond_protobuf(big: BigModelInfo) -> None:
    """A valid model (streamconv's own reader walks all of it) that protobuf refuses.

    onnx.load runs in a child process: it reads the whole 2.2 GB file into memory.
    """
    assert big.file_size > 2 * GIB
    with open(big.path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            sk = build_skeleton(buf, big.file_size, str(big.path), 1 << 20,
                                for_conversion=False)
        finally:
            buf.close()
    assert sorted(p.name for p in sk.payloads.values()) == sorted(big.tensor_names)
    code = (
        "import sys, onnx\n"
        "from google.protobuf.message import DecodeError\n"
        "try:\n"
        "    onnx.load(sys.argv[1])\n"
        "except DecodeError as e:\n"
        "    print('DecodeError', str(e).splitlines()[0])\n"
        "else:\n"
        "    print('loaded')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(big.path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("DecodeError Error parsing message"), result.stdout


def test_external_layout_runs_in_onnxruntime(big: BigModelInfo, tmp_path: Path) -> None:
    dst = tmp_path / "big18.onnx"
    report = convert(big.path, dst, opset=18, layout="external")
    try:
        assert report.tensors_diverted == 4
        assert report.bytes_diverted == 4 * big.tensor_nbytes
        model = onnx.load(str(dst), load_external_data=False)
        assert {(o.domain, o.version) for o in model.opset_import} == {("", 18)}
        ops = [n.op_type for n in model.graph.node]
        for op in ("ReduceSum", "Squeeze", "Unsqueeze"):
            node = model.graph.node[ops.index(op)]
            assert len(node.input) == 2, op  # axes moved from attribute to input
        x = np.linspace(-1, 1, big.k, dtype=np.float32)
        session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(None, {"X": x}), strict=True))
        del session
        for name, expected in big.expected_outputs(x).items():
            np.testing.assert_allclose(results[name], expected, rtol=1e-3, err_msg=name)
    finally:
        for p in (dst, tmp_path / "big18.onnx.data"):
            if p.exists():
                p.unlink()
    assert leftovers(tmp_path) == []


def test_inline_layout_keeps_every_payload_byte(big: BigModelInfo, tmp_path: Path) -> None:
    dst = tmp_path / "big18-inline.onnx"
    report = convert(big.path, dst, opset=18, layout="inline")
    try:
        assert report.layout == "inline" and dst.stat().st_size > 2 * GIB
        # written weights first: the graph field, its length padded to 5 bytes
        with open(dst, "rb") as f:
            head = f.read(6)
        assert head[0] == 0x3A and all(b & 0x80 for b in head[1:5]) and head[5] < 0x80
        graph_length = sum((b & 0x7F) << (7 * i) for i, b in enumerate(head[1:6]))
        assert 2 * GIB < graph_length < dst.stat().st_size - 6
        hashes = payload_hashes(dst)
        assert hashes == dict(big.sha256)
    finally:
        dst.unlink()


@pytest.mark.parametrize("layout", ["external", "inline"])
def test_memory_stays_flat(big: BigModelInfo, tmp_path: Path, layout: str) -> None:
    """Peak RSS of a whole CLI conversion of the 2.2 GB model, in a child process,
    and of the copy process it forks."""
    dst = tmp_path / "mem.onnx"
    # VmHWM is this process's own peak; ru_maxrss would include the pre-exec
    # copy of the (large) test process.  The copy process is a child of it.
    code = (
        "import resource, sys; from streamconv.cli import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "print(hwm.split()[1], children); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(big.path), str(dst), "--opset", "18",
         "--layout", layout, "-q"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    own_kib, children_kib = map(int, result.stdout.strip().splitlines()[-1].split())
    for p in (dst, tmp_path / "mem.onnx.data"):
        p.unlink(missing_ok=True)
    # the weights are 2240 MiB; the processes (Python + onnx + numpy) stay far below
    peaks = {"own_mib": own_kib / 1024, "copy_process_mib": children_kib / 1024}
    assert children_kib > 0, peaks  # the copy did run in a process of its own
    assert max(peaks.values()) < 250, json.dumps(peaks)


def test_function_and_big_initializers(tmp_path: Path) -> None:
    """Past 2 GiB with a model-local function: kept, converted, and callable."""
    info = write_big_model(tmp_path / "fn.onnx", n_tensors=4, tensor_mib=560, opset=11,
                           function=True)
    dst = tmp_path / "fn18.onnx"
    try:
        assert info.file_size > 2 * GIB
        report = convert(info.path, dst, opset=18)
        assert report.layout == "external"  # auto: the result does not fit inline
        info.path.unlink()
        onnx.checker.check_model(str(dst), full_check=True)
        model = onnx.load(str(dst), load_external_data=False)
        (fn,) = model.functions
        assert {o.domain: o.version for o in fn.opset_import}[""] == 18
        assert [n.op_type for n in fn.node if n.op_type != "Constant"] == ["Unsqueeze", "Squeeze"]
        assert all(len(n.input) == 2 for n in fn.node if n.op_type != "Constant")
        x = np.full(info.k, 0.25, dtype=np.float32)
        session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        y = session.run(["Y"], {"X": x})[0]
        del session
        np.testing.assert_allclose(y, info.expected_output(x), rtol=1e-3)
    finally:
        for p in tmp_path.iterdir():
            if p.is_file():
                p.unlink()
