"""Payloads written while onnx converts: the background writer and weights-first inline output.

The inline output normally starts with the graph's initializers (their bytes
are known after the scan), so their payloads are copied while the skeleton
converts; these tests hold that output to the one-pass layout: same model
when loaded, same outputs in ONNX Runtime, and the one-pass layout whenever
conversion touches what was written first.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import streamconv.api as api
import streamconv.splice as splice
import streamconv.writer as writer
from streamconv import convert
from streamconv.errors import ExternalDataError, OutputError
from streamconv.skeleton import Payload
from streamconv.splice import encode_padded_varint
from streamconv.wire import read_varint
from tests.conftest import leftovers, run, same_outputs
from tests.models import if_loop_model, rand, reduce_chain, save, typed_model

MODES = ["process", "thread"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the background writer in a forked process, or in a thread."""
    monkeypatch.setattr(writer, "FORK", request.param == "process")
    if request.param == "process":  # the fork needs a single-threaded caller
        monkeypatch.setattr(writer.threading, "active_count", lambda: 1)
        monkeypatch.setattr(writer, "FORK_MIN", 0)
    return str(request.param)


@pytest.fixture
def early_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Move every payload early, however small (the default waits for 64 KiB)."""
    monkeypatch.setattr(api, "EARLY_MIN", 0)


def one_pass(src: str, dst: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Path:
    """The output written the usual way, after conversion."""
    with monkeypatch.context() as m:
        m.setattr(api, "plan_prefix", lambda data, payloads: None)
        convert(src, dst, **kwargs)
    return dst


def converts_weights_first(src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           **kwargs: Any) -> Path:
    """Convert *src* weights first; check it loads as the one-pass output does."""
    dst = tmp_path / "out.onnx"
    convert(src, dst, **kwargs)
    assert starts_weights_first(dst)
    reference = one_pass(src, tmp_path / "ref.onnx", monkeypatch, **kwargs)
    assert not starts_weights_first(reference)
    assert onnx.load(str(dst)) == onnx.load(str(reference))
    return dst


def starts_weights_first(path: Path) -> bool:
    """Whether the file starts with the graph field and a padded length."""
    head = path.read_bytes()[:6]
    return head[0] == 0x3A and all(b & 0x80 for b in head[1:5]) and head[5] < 0x80


# ------------------------------------------------------------------ padded varints


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**28 - 1, 2**31 - 1, 2**35 - 1])
def test_padded_varint_reads_back(value: int) -> None:
    encoded = encode_padded_varint(value, 5)
    assert len(encoded) == 5
    assert read_varint(encoded, 0, 5) == (value, 5)


def test_padded_varint_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        encode_padded_varint(2**35, 5)
    assert read_varint(encode_padded_varint(2**63, 10), 0, 10) == (2**63, 10)


# ------------------------------------------------------------------ background writer


def _payload(path: Path, ident: int, offset: int, length: int) -> Payload:
    return Payload(id=ident, path=f"graph.initializer[{ident}]", name=f"t{ident}",
                   source=str(path), offset=offset, length=length, encoding="raw",
                   number=9, data_type=1, count=length // 4, nbytes=length)


def test_background_writes_pieces_in_order(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src.bin"
    data = np.random.default_rng(0).bytes(3 << 20)
    src.write_bytes(data)
    a = _payload(src, 1, 5, 1 << 20)
    b = _payload(src, 2, (1 << 20) + 4099, (2 << 20) - 5000)
    pieces = [b"head", writer.PayloadRef(a, "raw"), writer.Gap(77), writer.PayloadRef(b, "raw")]
    dst = tmp_path / "dst.bin"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT)
    seen: list[int] = []
    try:
        job = writer.Background(fd, pieces, digest_ids=frozenset({2}), progress=seen.append)
        job.start()
        assert job.mode == mode
        digests = job.finish()
    finally:
        os.close(fd)
    expected = b"head" + data[5:5 + a.length] + bytes(77) + data[b.offset:b.offset + b.length]
    assert dst.read_bytes() == expected
    assert digests == {2: hashlib.sha1(data[b.offset:b.offset + b.length]).hexdigest()}
    assert sum(seen) == len(expected)


def test_background_reports_a_short_source(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(1000))
    pieces = [writer.PayloadRef(_payload(src, 1, 0, 5000), "raw")]
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
    try:
        job = writer.Background(fd, pieces)
        job.start()
        with pytest.raises(ExternalDataError) as caught:
            job.finish()
    finally:
        os.close(fd)
    assert caught.value.file == str(src)
    assert "short" in str(caught.value)


def test_background_reports_a_failed_write(tmp_path: Path, mode: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(1 << 20))

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "copy_file_range", full)
    pieces = [b"x", writer.PayloadRef(_payload(src, 1, 0, 1 << 20), "raw")]
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
    try:
        job = writer.Background(fd, pieces)
        job.start()
        with pytest.raises(OutputError, match="No space left on device"):
            job.finish()
    finally:
        os.close(fd)


def test_kernel_copy_refused_falls_back_to_the_loop(tmp_path: Path, mode: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_range across file systems (EXDEV) or unsupported: the buffer loop copies."""
    calls = []

    def refuse(*args: Any) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src = tmp_path / "src.bin"
    data = np.random.default_rng(1).bytes(3 << 20)
    src.write_bytes(data)
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
    try:  # same offsets modulo the page size: copy_file_range is tried first
        job = writer.Background(fd, [writer.PayloadRef(_payload(src, 1, 4096, 2 << 20), "raw")])
        job.start()
        job.finish()
        written = writer.write_pieces(fd, [writer.PayloadRef(_payload(src, 2, 0, 4096), "raw")],
                                      lambda n: None)
    finally:
        os.close(fd)
    assert written == {}
    assert (tmp_path / "dst.bin").read_bytes() == data[4096:4096 + (2 << 20)] + data[:4096]
    if mode == "thread":  # a forked process tries in its own copy of the module
        assert calls


def test_background_falls_back_to_a_thread_when_fork_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "FORK", True)
    monkeypatch.setattr(writer, "FORK_MIN", 0)
    monkeypatch.setattr(writer.threading, "active_count", lambda: 1)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, "fork", no_fork)
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
    try:
        job = writer.Background(fd, [writer.PayloadRef(_payload(src, 1, 0, 1 << 20), "raw")])
        job.start()
        job.finish()
    finally:
        os.close(fd)
    assert job.mode == "thread"
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()


def test_background_stop_leaves_no_worker(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(8 << 20))
    pieces = [writer.PayloadRef(_payload(src, i, 0, 8 << 20), "raw") for i in range(40)]
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
    try:
        job = writer.Background(fd, pieces)
        job.start()
        job.stop()
    finally:
        os.close(fd)
    assert job._pid == 0 and job._thread is None
    if mode == "process":
        with pytest.raises(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)


# ------------------------------------------------------------------ weights-first output


@pytest.mark.parametrize("target", [13, 18])
def test_weights_first_equals_one_pass(tmp_path: Path, target: int, mode: str,
                                       early_always: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src = save(reduce_chain(opset=11, n=32), tmp_path / "in.onnx")
    dst = converts_weights_first(src, tmp_path, monkeypatch, opset=target, layout="inline",
                                 size_threshold=64)
    report = convert(src, tmp_path / "again.onnx", opset=target, layout="inline",
                     size_threshold=64)
    assert report.layout == "inline" and report.data_file is None
    assert report.bytes_out == (tmp_path / "again.onnx").stat().st_size == dst.stat().st_size
    onnx.checker.check_model(str(dst), full_check=True)
    same_outputs(src, dst, {"X": rand((32, 32), 5)})
    assert leftovers(tmp_path) == []


def test_weights_first_keeps_value_read_tensors(tmp_path: Path, early_always: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Axes tensors set aside by the scan and put back for the converter still go first."""
    src = save(reduce_chain(opset=13, n=32), tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    convert(src, dst, opset=18, size_threshold=0)
    assert starts_weights_first(dst)
    reference = one_pass(src, tmp_path / "ref.onnx", monkeypatch, opset=18, size_threshold=0)
    got, want = onnx.load(str(dst)), onnx.load(str(reference))
    assert [t.name for t in got.graph.initializer] == [t.name for t in want.graph.initializer]
    for a, b in zip(got.graph.initializer, want.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert got.graph.node == want.graph.node
    same_outputs(src, dst, {"X": rand((32, 32), 5)})


def test_weights_first_typed_fields(tmp_path: Path, early_always: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, arrays = typed_model()
    src = save(model, tmp_path / "in.onnx")
    dst = converts_weights_first(src, tmp_path, monkeypatch, opset=18, size_threshold=0)
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_weights_first_with_nested_payloads(tmp_path: Path, early_always: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Payloads outside the graph's initializers (If/Loop bodies, Constants) follow later."""
    model = if_loop_model(n=32)
    model.graph.initializer.append(numpy_helper.from_array(rand((32, 32), 7), "unused_w"))
    src = save(model, tmp_path / "in.onnx")
    dst = converts_weights_first(src, tmp_path, monkeypatch, opset=18, size_threshold=64)
    same_outputs(src, dst, {"X": rand((32, 32), 1), "flag": np.array(True),
                         "trips": np.array(3, np.int64)})


def test_weights_first_output_scans_back(tmp_path: Path, early_always: None) -> None:
    """streamconv reads its own weights-first output (padded length and all)."""
    src = save(reduce_chain(opset=11, n=32), tmp_path / "in.onnx")
    first = tmp_path / "first.onnx"
    convert(src, first, opset=13, size_threshold=64)
    again = tmp_path / "again.onnx"
    convert(first, again, opset=18, size_threshold=64, layout="external")
    model = onnx.load(str(again))
    assert model.opset_import[0].version == 18
    onnx.checker.check_model(str(again), full_check=True)


def test_changed_initializer_falls_back_to_one_pass(
    tmp_path: Path, mode: str, early_always: None, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If conversion changes an initializer written first, the output is written in one pass."""
    src = save(reduce_chain(opset=11, n=32), tmp_path / "in.onnx")
    real = api._load_onnx

    def load() -> Any:
        converter = real()
        convert_model = converter.convert_model

        def changing(model: onnx.ModelProto, target: int, **kwargs: Any) -> Any:
            result = convert_model(model, target, **kwargs)
            result.model.graph.initializer[0].doc_string = "changed by conversion"
            return result

        monkeypatch.setattr(converter, "convert_model", changing)
        return converter

    monkeypatch.setattr(api, "_load_onnx", load)
    dst = tmp_path / "out.onnx"
    with caplog.at_level(logging.INFO, logger="streamconv.api"):
        convert(src, dst, opset=13, size_threshold=64)
    assert "initializer 0 changed in conversion" in caplog.text
    assert not starts_weights_first(dst)
    model = onnx.load(str(dst))
    assert model.graph.initializer[0].doc_string == "changed by conversion"
    same_outputs(src, dst, {"X": rand((32, 32), 5)})
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


def test_auto_past_the_limit_after_conversion_goes_external(
    tmp_path: Path, early_always: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """auto started weights-first (predicted inline) but the result is too big: external."""
    src = save(reduce_chain(opset=11, n=32), tmp_path / "in.onnx")
    size = os.path.getsize(src)
    monkeypatch.setattr(api, "INLINE_LIMIT", size - 100 - (1 << 20))
    monkeypatch.setattr(splice, "INLINE_LIMIT", size - 100)
    dst = tmp_path / "out.onnx"
    report = convert(src, dst, opset=13, size_threshold=64)
    assert report.layout == "external" and report.data_file is not None
    assert not starts_weights_first(dst)
    same_outputs(src, dst, {"X": rand((32, 32), 5)})


def test_input_with_external_data_is_written_in_one_pass(tmp_path: Path,
                                                         early_always: None) -> None:
    """Initializers in the input's own data files resolve only after onnx loads."""
    w = numpy_helper.from_array(rand((64, 64)), "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [64, 64])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    dst = tmp_path / "out.onnx"
    report = convert(src, dst, opset=13, layout="inline")
    assert report.layout == "inline" and not starts_weights_first(dst)
    x = rand((64, 64), 3)
    np.testing.assert_allclose(run(dst, {"X": x})[0], x + numpy_helper.to_array(w), rtol=1e-6)


def test_small_copies_stay_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "FORK", True)
    monkeypatch.setattr(writer.threading, "active_count", lambda: 1)
    src = tmp_path / "src.bin"
    with open(src, "wb") as f:
        f.truncate(writer.FORK_MIN)
    modes = []
    for size in (1 << 20, writer.FORK_MIN):
        fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
        try:
            job = writer.Background(fd, [writer.PayloadRef(_payload(src, 1, 0, size), "raw")])
            job.start()
            job.finish()
            modes.append(job.mode)
        finally:
            os.close(fd)
    assert modes == ["thread", "process"]


def test_default_waits_for_payloads_worth_moving(tmp_path: Path) -> None:
    """Tiny models are written in one pass: nothing to gain from a background copy."""
    src = save(reduce_chain(opset=11, n=16), tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    convert(src, dst, opset=13, size_threshold=64)
    assert not starts_weights_first(dst)
    big = save(reduce_chain(opset=11, n=160), tmp_path / "big.onnx")  # a 100 KiB weight
    convert(big, tmp_path / "big_out.onnx", opset=13)
    assert starts_weights_first(tmp_path / "big_out.onnx")
