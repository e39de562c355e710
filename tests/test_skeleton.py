"""Skeleton building: which payloads are diverted, which stay inline, and why."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, version_converter

from attacks import _wire as w_
from streamconv.errors import ConversionError, WireFormatError
from streamconv.skeleton import build_skeleton, stub_bytes
from streamconv.splice import plan_output
from streamconv.wire import encode_len_header
from tests.models import if_loop_model, reduce_chain, typed_model


def skeleton_of(model_bytes: bytes, tmp_path: Path, threshold: int):  # type: ignore[no-untyped-def]
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return build_skeleton(buf, len(model_bytes), str(path), threshold)


def test_finds_payloads_in_subgraphs_and_constants(tmp_path: Path) -> None:
    sk = skeleton_of(if_loop_model().SerializeToString(), tmp_path, 64)
    names = sorted(p.name for p in sk.payloads.values())
    assert names == ["else_cv", "else_w", "loop_w", "then_cv", "then_w"]
    paths = {p.name: p.path for p in sk.payloads.values()}
    assert paths["then_cv"] == "graph.node[0].attribute[1].g.node[0].attribute[0].t"
    assert paths["loop_w"] == "graph.node[1].attribute[0].g.initializer[0]"
    # the skeleton is small: every payload left the bytes
    assert len(sk.data) < 2000


def test_float_data_payload_is_diverted(tmp_path: Path) -> None:
    sk = skeleton_of(reduce_chain(as_float_data=True).SerializeToString(), tmp_path, 64)
    by_name = {p.name: p for p in sk.payloads.values()}
    assert by_name["W"].encoding == "fixed32"
    assert by_name["W"].nbytes == 16 * 16 * 4
    assert by_name["c_value"].encoding == "raw"


def test_typed_fields_diverted_with_sizes(tmp_path: Path) -> None:
    model, arrays = typed_model()
    sk = skeleton_of(model.SerializeToString(), tmp_path, 64)
    by_name = {p.name: p for p in sk.payloads.values()}
    for name, array in arrays.items():
        assert by_name[name].nbytes == array.nbytes, name


def test_threshold_above_everything_diverts_nothing(tmp_path: Path) -> None:
    data = if_loop_model().SerializeToString()
    sk = skeleton_of(data, tmp_path, 1 << 20)
    assert sk.payloads == {}
    assert sk.data == data


def axes_model() -> onnx.ModelProto:
    """Opset 13: ReduceSum/Squeeze/Unsqueeze axes are initializers; W is unused weight."""
    axes = [numpy_helper.from_array(np.array([0], np.int64), f"axes{i}") for i in range(3)]
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["X", "axes0"], ["R"], keepdims=1),
            helper.make_node("Squeeze", ["R", "axes1"], ["S"]),
            helper.make_node("Unsqueeze", ["S", "axes2"], ["U"]),
        ],
        "axes", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("U", onnx.TensorProto.FLOAT, [1, 16])],
        initializer=[*axes, w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("threshold", [0, 4])
def test_value_read_tensors_stay_inline(tmp_path: Path, threshold: int) -> None:
    model = axes_model()
    sk = skeleton_of(model.SerializeToString(), tmp_path, threshold)
    diverted = {p.name for p in sk.payloads.values()}
    assert diverted == {"W"}
    # the converter therefore sees the axes: same result as on the full model
    oracle = version_converter.convert_version(model, 11)
    ours = version_converter.convert_version(sk.model, 11)
    assert [n.SerializeToString() for n in oracle.graph.node] == [
        n.SerializeToString() for n in ours.graph.node
    ]
    squeeze = next(n for n in ours.graph.node if n.op_type == "Squeeze")
    assert helper.get_attribute_value(squeeze.attribute[0]) == [0]


def test_stubbed_axes_would_be_silently_wrong() -> None:
    """Why value-read tensors must stay inline: onnx reads a stub as empty."""
    model = axes_model()
    for t in model.graph.initializer[:3]:
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value="nowhere")
    converted = version_converter.convert_version(model, 11)
    squeeze = next(n for n in converted.graph.node if n.op_type == "Squeeze")
    assert helper.get_attribute_value(squeeze.attribute[0]) == []


def test_integer_inputs_no_adapter_reads_are_diverted(tmp_path: Path) -> None:
    """Gather indices and a quantized bias are payloads like any other: nothing reads them."""
    idx = numpy_helper.from_array(np.arange(400, dtype=np.int64) % 16, "idx")
    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "w")
    bias = numpy_helper.from_array(np.arange(300, dtype=np.int32), "bias")
    shape = numpy_helper.from_array(np.array([400, 8], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "idx"], ["g"]),
         helper.make_node("Reshape", ["g", "shape"], ["y"]),
         helper.make_node("Add", ["b0", "bias"], ["z"])],
        "g", [helper.make_tensor_value_info("b0", onnx.TensorProto.INT32, [300])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", onnx.TensorProto.INT32, None)],
        initializer=[w, idx, bias, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sk = skeleton_of(model.SerializeToString(), tmp_path, 0)
    # the Reshape's shape is read (Reshape 5->4 turns it into an attribute)
    assert {p.name for p in sk.payloads.values()} == {"w", "idx", "bias"}


#: What README promises streamconv reads of a value-read tensor (MAX_VALUE_READ).
VALUE_READ_CAP = 64 << 20


def test_a_value_read_tensor_past_the_cap_is_refused(tmp_path: Path) -> None:
    """Unsqueeze axes of 64 MiB + 8 bytes in external data are refused, naming op and tensor.

    The data file is sparse: nothing of it is written or read.
    """
    from attacks import _files
    from streamconv import convert
    from streamconv.errors import LimitError

    count = VALUE_READ_CAP // 8 + 1
    shape = w_.external_tensor("shape", [count], [("location", "s.bin")], data_type=w_.INT64)
    body = w_.graph(
        "cap", [w_.node("Unsqueeze", ["X", "shape"], ["Y"])],
        inputs=[w_.value_info("X")], outputs=[w_.value_info("Y")], initializers=[shape],
    )
    model = _files.model_folder(tmp_path) / "model.onnx"
    model.write_bytes(w_.model(body, opset=13))
    with open(model.parent / "s.bin", "wb") as f:
        f.truncate(count * 8)
    with pytest.raises(LimitError) as e:
        convert(model, tmp_path / "out.onnx", opset=11)
    assert str(e.value) == (
        f"{model}: graph.initializer[0] 'shape': tensor of {count * 8} bytes feeds input 1 of "
        "Unsqueeze 'Y', whose value conversion reads; streamconv reads such values up to 64 MiB"
    )
    assert not (tmp_path / "out.onnx").exists()


def test_a_value_read_payload_past_the_cap_names_its_offset(tmp_path: Path) -> None:
    """The same inline: the error names the payload's byte offset in the file."""
    from streamconv import convert
    from streamconv.errors import LimitError

    count = VALUE_READ_CAP // 8 + 1
    raw = bytes(count * 8)
    shape = w_.tensor("shape", [count], raw, data_type=w_.INT64)
    body = w_.graph(
        "cap", [w_.node("Squeeze", ["X", "shape"], ["Y"])],
        inputs=[w_.value_info("X")], outputs=[w_.value_info("Y")], initializers=[shape],
    )
    data = w_.model(body, opset=13)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    del raw, data
    with pytest.raises(LimitError) as e:
        convert(path, tmp_path / "out.onnx", opset=11)
    with open(path, "rb") as f:
        head = f.read(200)
    start = head.index(b"\x4a") + 1 + 4  # raw_data tag, then a 4-byte length
    assert e.value.offset == start and e.value.path == "graph.initializer[0] 'shape'"
    assert "feeds input 1 of Squeeze 'Y'" in str(e.value)
    assert not (tmp_path / "out.onnx").exists()


def test_raw_data_length_must_match_dims(tmp_path: Path) -> None:
    model = reduce_chain()
    w = model.graph.initializer[0]
    w.raw_data = w.raw_data[:-4]
    data = model.SerializeToString()
    expected = r"raw_data holds 1020 bytes but dims \[16, 16\]"
    with pytest.raises(WireFormatError, match=expected) as e:
        skeleton_of(data, tmp_path, 64)
    assert e.value.path == "graph.initializer[0] 'W'"
    assert e.value.offset is not None and data[e.value.offset] == 0x4A  # raw_data tag


def test_typed_count_must_match_dims(tmp_path: Path) -> None:
    model = reduce_chain(as_float_data=True)
    del model.graph.initializer[0].float_data[-1]
    with pytest.raises(WireFormatError, match="255 stored values but dims"):
        skeleton_of(model.SerializeToString(), tmp_path, 64)


def test_lost_and_duplicated_stubs_are_errors(tmp_path: Path) -> None:
    sk = skeleton_of(reduce_chain().SerializeToString(), tmp_path, 64)
    assert len(sk.payloads) == 2
    # lost: drop the initializer holding stub 1 from the converted skeleton
    lost = onnx.ModelProto()
    lost.CopyFrom(sk.model)
    del lost.graph.initializer[:]
    with pytest.raises(ConversionError, match="lost in conversion"):
        plan_output(lost.SerializeToString(), sk.payloads, "inline")
    # duplicated: the same stub twice
    dup = onnx.ModelProto()
    dup.CopyFrom(sk.model)
    dup.graph.initializer.append(dup.graph.initializer[0])
    with pytest.raises(ConversionError, match="came back twice"):
        plan_output(dup.SerializeToString(), sk.payloads, "inline")


def test_stub_bytes_parse_as_external_reference() -> None:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(encode_len_header(8, 1) + b"w" + stub_bytes(42))
    assert tensor.data_location == onnx.TensorProto.EXTERNAL
    assert tensor.external_data[0].value == "__streamconv__/42"


@pytest.mark.parametrize(
    "key, text",
    [("offset", "0_0"), ("offset", " 0"), ("offset", "0 "), ("length", "+4096"),
     ("length", "4_096"), ("length", "\u0664\u0660\u0669\u0666"), ("length", "\uff14096")],
)
def test_external_offset_and_length_are_plain_ascii_decimal(
    key: str, text: str, tmp_path: Path
) -> None:
    """int() takes every one of these; the tensor they describe is refused by name."""
    from attacks import _files
    from streamconv import convert
    from streamconv.errors import ExternalDataError

    entries = [("location", "w.bin"), ("offset", "0"), ("length", "4096")]
    entries = [(k, text if k == key else v) for k, v in entries]
    model = _files.external_model(tmp_path, entries)
    (model.parent / "w.bin").write_bytes(bytes(4096))
    with pytest.raises(ExternalDataError) as e:
        convert(model, tmp_path / "out.onnx", opset=13)
    assert e.value.path == "graph.initializer[0] 'W'"
    assert f"{key} {text!r} is not a plain decimal number" in str(e.value)
    assert not (tmp_path / "out.onnx").exists()


def _converted_stub(tmp_path: Path) -> tuple[onnx.ModelProto, dict[int, Any]]:
    sk = skeleton_of(reduce_chain().SerializeToString(), tmp_path, 64)
    stubbed = [t for t in sk.model.graph.initializer if t.data_location == t.EXTERNAL]
    assert [t.name for t in stubbed] == ["W"]
    converted = onnx.ModelProto()
    converted.CopyFrom(sk.model)
    return converted, sk.payloads


@pytest.mark.parametrize(
    "change, expect",
    [
        ("dims", r"came back from conversion as dims \[256\] of float, but its payload holds "
                 r"dims \[16, 16\] of float"),
        ("data_type", r"as dims \[16, 16\] of float16, but its payload holds dims \[16, 16\] "
                      "of float"),
        ("data_location", "carries the reserved location '__streamconv__/\\d+' but not "
                          "data_location EXTERNAL"),
    ],
)
def test_a_converted_stub_must_still_match_its_payload(
    change: str, expect: str, tmp_path: Path
) -> None:
    """A converter that reshapes, retypes or inlines a stub gets its output refused."""
    converted, payloads = _converted_stub(tmp_path)
    w = converted.graph.initializer[0]
    if change == "dims":
        w.dims[:] = [256]
    elif change == "data_type":
        w.data_type = onnx.TensorProto.FLOAT16
    else:
        w.ClearField("data_location")
    with pytest.raises(ConversionError, match=expect) as e:
        plan_output(converted.SerializeToString(), payloads, "inline")
    assert e.value.path == "graph.initializer[0]"


# -- packed varint payloads: memory stays flat whatever the field's size ----------

#: Peak resident memory a conversion may reach, in either process (Python, numpy
#: and onnx alone take about 55 MB).
VARINT_PEAK_MIB = 150

_PEAK = (
    "import resource, sys; from streamconv.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
    "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
    "print(hwm.split()[1], children); sys.exit(rc)"
)


def _peak_run(*argv: str) -> tuple[int, dict[str, float], str]:
    """The CLI in a child process: exit code, peak RSS of it and of its copy process, stderr.

    VmHWM is the child's own peak; ru_maxrss of its children is the copy process
    it forks (the test process's own size never enters either number).
    """
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "-c", _PEAK, *argv, "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    own, children = map(int, result.stdout.split()[-2:])
    return result.returncode, {"own": own / 1024, "copy": children / 1024}, result.stderr


@pytest.fixture(scope="module")
def varint_models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fixtures.varintmodel import write_varint_model

    folder = tmp_path_factory.mktemp("varint")
    # 50M float16 elements in int32_data: a 112 MB field (onnx's helper stores them so)
    big = write_varint_model(folder / "f16.onnx", 50_000_000)
    # one varint that never ends, 200 MiB long
    endless = write_varint_model(folder / "endless.onnx", 0, endless=True, nbytes=200 << 20)
    yield big, endless
    for p in folder.iterdir():
        p.unlink()


def _payload_matches(path: Path, data_file: Path | None, count: int) -> None:
    """The converted W, read in blocks, holds the float16 patterns the fixture wrote."""
    from fixtures.varintmodel import element_values

    if data_file is None:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            (p,) = build_skeleton(buf, path.stat().st_size, str(path), 1 << 20,
                                  for_conversion=False).payloads.values()
            buf.close()
        assert p.encoding == "raw" and p.nbytes == 2 * count
        source, offset = path, p.offset
    else:
        source, offset = data_file, 0
    block = 1 << 22
    with open(source, "rb") as f:
        for start in range(0, count, block):
            n = min(block, count - start)
            f.seek(offset + 2 * start)
            got = np.frombuffer(f.read(2 * n), dtype="<u2")
            np.testing.assert_array_equal(got, element_values(start, n))


@pytest.mark.parametrize("layout", ["external", "inline"])
def test_a_large_varint_field_converts_in_flat_memory(
    varint_models: Any, layout: str, tmp_path: Path
) -> None:
    big, _ = varint_models
    dst = tmp_path / "out.onnx"
    code, peaks, stderr = _peak_run(str(big.path), str(dst), "--opset", "18",
                                    "--layout", layout)
    assert code == 0, stderr
    data = tmp_path / "out.onnx.data"
    _payload_matches(dst, data if layout == "external" else None, big.count)
    assert peaks["copy"] > 0, peaks  # the copy ran in a process of its own
    assert max(peaks.values()) < VARINT_PEAK_MIB, peaks


@pytest.mark.parametrize("layout", ["external", "inline"])
def test_an_endless_varint_is_refused_in_the_scan(
    varint_models: Any, layout: str, tmp_path: Path
) -> None:
    _, endless = varint_models
    dst = tmp_path / "out.onnx"
    code, peaks, stderr = _peak_run(str(endless.path), str(dst), "--opset", "18",
                                    "--layout", layout)
    # the varint starts right after the field's tag and its 4-byte length
    offset = endless.field_offset + 1 + 4
    assert code == 2
    assert stderr == (f"streamconv: error: {endless.path}: byte {offset}, "
                      "graph.initializer[0] 'W': varint longer than 10 bytes in a packed field\n")
    assert os.listdir(tmp_path) == []
    assert max(peaks.values()) < VARINT_PEAK_MIB, peaks


@pytest.mark.parametrize(
    "field, offset, expect",
    [
        # the second varint has 11 bytes
        (b"\x01" + b"\x80" * 10 + b"\x01", 1, "longer than 10 bytes"),
        # a 10-byte varint is fine, the 11-byte one after it is not
        (b"\x80" * 9 + b"\x01" + b"\x80" * 10 + b"\x01", 10, "longer than 10 bytes"),
        # refused at its tenth continuation byte, though the field goes on
        (b"\x01\x02" + b"\x80" * 11, 2, "longer than 10 bytes"),
        (b"\x01\x02\x80\x80", 2, "packed varints end inside a varint"),
    ],
)
def test_packed_varint_errors_name_offset_and_path(
    field: bytes, offset: int, expect: str, tmp_path: Path
) -> None:
    body = (encode_len_header(1, 1) + b"\x02" + b"\x10\x07" + encode_len_header(8, 1) + b"W"
            + encode_len_header(7, len(field)) + field)
    graph = encode_len_header(5, len(body)) + body
    data = b"\x08\x08" + encode_len_header(7, len(graph)) + graph
    start = data.index(field)
    with pytest.raises(WireFormatError, match=expect) as e:
        skeleton_of(data, tmp_path, 0)
    assert e.value.offset == start + offset
    assert e.value.path == "graph.initializer[0] 'W'"
