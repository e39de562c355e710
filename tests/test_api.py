"""convert(): results run in ONNX Runtime like the input; errors are clear and leave nothing."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from streamconv import convert
from streamconv.cli import main as cli_main
from streamconv.converter import max_opset
from streamconv.errors import ConversionError, StreamconvError, UsageError, WireFormatError
from tests.conftest import leftovers, run
from tests.models import if_loop_model, rand, reduce_chain, save, typed_model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", ["inline", "external", "auto"])
@pytest.mark.parametrize("target", [13, 17, 18, 21])
def test_chain_converts_and_runs(tmp_path: Path, layout: str, target: int) -> None:
    src = save(reduce_chain(opset=11), tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    report = convert(src, dst, opset=target, layout=layout, size_threshold=64)
    assert report.opset_from == 11 and report.opset_to == target
    assert report.tensors_diverted == 2
    assert report.layout == ("inline" if layout == "auto" else layout)
    assert (report.data_file is not None) == (layout == "external")
    model = onnx.load(str(dst))
    assert {(o.domain, o.version) for o in model.opset_import} == {("", target)}
    squeeze = next(n for n in model.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2  # axes became an input at 13+
    x = rand((16, 16), 5)
    np.testing.assert_allclose(run(dst, {"X": x})[0], run(src, {"X": x})[0], rtol=1e-6)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_subgraphs_convert_and_run(tmp_path: Path, layout: str) -> None:
    src = save(if_loop_model(), tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    report = convert(src, dst, opset=18, layout=layout, size_threshold=64)
    assert report.tensors_diverted == 5
    x = rand((16, 16), 3)
    for flag in (True, False):
        feeds = {"X": x, "flag": np.array(flag), "trips": np.array(3, np.int64)}
        np.testing.assert_allclose(run(dst, feeds)[0], run(src, feeds)[0], rtol=1e-6)


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_typed_fields_become_raw_data_with_equal_values(tmp_path: Path, layout: str) -> None:
    model, arrays = typed_model()
    src = save(model, tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    convert(src, dst, opset=18, layout=layout, size_threshold=64)
    out = onnx.load(str(dst))
    by_name = {t.name: t for t in out.graph.initializer}
    for name, array in arrays.items():
        tensor = by_name[name]
        if layout == "inline":
            assert tensor.HasField("raw_data"), name
        np.testing.assert_array_equal(
            numpy_helper.to_array(tensor, base_dir=str(tmp_path)), array, err_msg=name
        )
    np.testing.assert_array_equal(run(dst, {})[0], run(src, {})[0])


def test_output_is_deterministic(tmp_path: Path) -> None:
    src = save(if_loop_model(), tmp_path / "in.onnx")
    for name in ("a", "b"):
        convert(src, tmp_path / f"{name}.onnx", opset=17, layout="external", size_threshold=64)
    assert digest(tmp_path / "a.onnx.data") == digest(tmp_path / "b.onnx.data")
    a = (tmp_path / "a.onnx").read_bytes().replace(b"a.onnx.data", b"X.onnx.data")
    b = (tmp_path / "b.onnx").read_bytes().replace(b"b.onnx.data", b"X.onnx.data")
    assert a == b


def test_external_layout_alignment_and_data_name(tmp_path: Path) -> None:
    big = reduce_chain(n=600)  # 1.4 MB weights: aligned
    src = save(big, tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    convert(src, dst, opset=18, layout="external", data_name="weights/w.bin")
    assert (tmp_path / "weights" / "w.bin").exists()
    model = onnx.load(str(dst), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            keys = {e.key: e.value for e in tensor.external_data}
            assert keys["location"] == "weights/w.bin"
            assert int(keys["offset"]) % 65536 == 0
    x = rand((600, 600), 1)
    np.testing.assert_allclose(run(dst, {"X": x})[0], run(src, {"X": x})[0], rtol=1e-5)


def test_progress_reaches_total(tmp_path: Path) -> None:
    src = save(if_loop_model(), tmp_path / "in.onnx")
    seen: list[tuple[int, int]] = []
    report = convert(src, tmp_path / "o.onnx", opset=13, size_threshold=64,
                     progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] == report.bytes_out
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))


def test_default_target_is_newest(tmp_path: Path) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    report = convert(src, tmp_path / "o.onnx")
    assert report.opset_to == max_opset()


def test_downgrade(tmp_path: Path) -> None:
    from tests.test_skeleton import axes_model

    src = save(axes_model(), tmp_path / "in.onnx")
    dst = tmp_path / "o.onnx"
    convert(src, dst, opset=11, size_threshold=0)
    model = onnx.load(str(dst))
    assert model.opset_import[0].version == 11
    x = rand((4, 16))
    np.testing.assert_allclose(run(dst, {"X": x})[0], run(src, {"X": x})[0], rtol=1e-6)


# --- bad input: one clear error, nothing left behind, input untouched ---------------

def _corruptions(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[1] ^= 0xFF  # the length of the first field
    return {
        "truncated": data[: len(data) // 2],
        "bit-flipped": bytes(flipped),
        "text": b"# not a model\nhello world\n",
        "zeros": bytes(64),
        "png": b"\x89PNG\r\n\x1a\n" + bytes(40),
        "overlong-varint": b"\x08" + b"\xff" * 12,
        "group": b"\x0b\x0c",
    }


@pytest.mark.parametrize("kind", sorted(_corruptions(b"xx")))
def test_bad_input_clear_error(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _corruptions(reduce_chain().SerializeToString())[kind]
    src = tmp_path / "bad.onnx"
    src.write_bytes(data)
    dst = tmp_path / "out.onnx"
    code = cli_main([str(src), str(dst), "--opset", "13"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamconv: error: "), err
    assert str(src) in lines[0]
    assert "Traceback" not in err
    assert not dst.exists() and leftovers(tmp_path) == []
    assert src.read_bytes() == data


def test_truncated_error_names_offset_and_path(tmp_path: Path) -> None:
    data = if_loop_model().SerializeToString()
    src = tmp_path / "bad.onnx"
    src.write_bytes(data[:-300])
    with pytest.raises(WireFormatError) as info:
        convert(src, tmp_path / "o.onnx", size_threshold=64)
    assert info.value.offset is not None and info.value.path
    assert f"byte {info.value.offset}" in str(info.value)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "no such file"),
        ("folder", "folder"),
        ("empty", "empty file"),
    ],
)
def test_unreadable_inputs(tmp_path: Path, setup: str, message: str) -> None:
    src = tmp_path / "x.onnx"
    if setup == "folder":
        src.mkdir()
    elif setup == "empty":
        src.write_bytes(b"")
    with pytest.raises(StreamconvError, match=message):
        convert(src, tmp_path / "o.onnx")


def test_output_over_input_is_refused(tmp_path: Path) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    before = digest(Path(src))
    with pytest.raises(UsageError, match="overwrite the input"):
        convert(src, src, opset=13)
    os.symlink(src, tmp_path / "link.onnx")
    with pytest.raises(UsageError, match="overwrite the input"):
        convert(src, tmp_path / "link.onnx", opset=13)
    assert digest(Path(src)) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"opset": 0}, "--opset must be between 1 and"),
        ({"opset": 10_000}, "--opset must be between 1 and"),
        ({"layout": "zip"}, "--layout must be one of"),
        ({"size_threshold": -3}, "--size-threshold must be >= 0, got -3"),
        ({"align": 3}, "--align must be a power of two"),
        ({"data_name": "../x.data"}, "--data-name must be a relative file path"),
        ({"data_name": "/tmp/x.data"}, "--data-name must be a relative file path"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    with pytest.raises(UsageError, match=message):
        convert(src, tmp_path / "o.onnx", **kwargs)  # type: ignore[arg-type]


def test_missing_output_folder(tmp_path: Path) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    with pytest.raises(StreamconvError, match="does not exist"):
        convert(src, tmp_path / "nope" / "o.onnx")


def test_conversion_failure_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = reduce_chain(opset=13)  # onnx has no adapter for Add 13 -> 12
    src = save(model, tmp_path / "in.onnx")
    code = cli_main([src, str(tmp_path / "o.onnx"), "--opset", "11", "--strict-onnx"])
    err = capsys.readouterr().err
    assert code == 1
    assert "version converter failed" in err and len(err.strip().splitlines()) == 1
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.onnx").exists()


def test_refused_step_names_node_and_range(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.INT32, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [4])
    graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["a"]),
         helper.make_node("BitwiseNot", ["a"], ["y"], name="invert")], "g", [x], [y])
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
               tmp_path / "in.onnx")
    code = cli_main([src, str(tmp_path / "o.onnx"), "--opset", "11"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cannot convert the main graph to opset 11: node 'invert' (BitwiseNot, " \
        "graph.node[1]) has no equivalent below opset 18" in err
    assert f"it can be converted to opsets 18..{onnx.defs.onnx_opset_version()}" in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.onnx").exists()


def test_model_without_default_opset(tmp_path: Path) -> None:
    model = reduce_chain()
    del model.opset_import[:]
    model.opset_import.add(domain="custom", version=1)
    src = save(model, tmp_path / "in.onnx")
    with pytest.raises(ConversionError, match=r"imports no ai\.onnx opset"):
        convert(src, tmp_path / "o.onnx")


def test_checker_failure_refuses_output(tmp_path: Path) -> None:
    from onnx import helper

    node = helper.make_node("AveragePool", ["X"], ["Y"], kernel_shape=[2, 2], dilations=[2, 2])
    graph = helper.make_graph(
        [node], "pool", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
    )
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]),
               tmp_path / "in.onnx")
    # onnx's own adapter keeps dilations, which AveragePool 11 does not have
    with pytest.raises(ConversionError, match=r"fails onnx\.checker"):
        convert(src, tmp_path / "o.onnx", opset=18, strict_onnx=True)
    assert not (tmp_path / "o.onnx").exists() and leftovers(tmp_path) == []
    report = convert(src, tmp_path / "o.onnx", opset=18, check=False, strict_onnx=True)
    assert report.check == "skipped"


def _failing_input(dilations: bool) -> onnx.ModelProto:
    """Opset 19: a Relu with an attribute it does not have (the input fails the checker),
    then an AveragePool, with *dilations* (which onnx's 19->18 adapter keeps, though
    AveragePool-11 has none)."""
    from onnx import helper

    extra = {"dilations": [2, 2]} if dilations else {}
    side = 6 if dilations else 7
    nodes = [
        helper.make_node("Relu", ["X"], ["A"], foo=1),
        helper.make_node("AveragePool", ["A"], ["Y"], kernel_shape=[2, 2], **extra),
    ]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 1, side, side])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_a_new_checker_error_behind_an_old_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The input fails at the Relu; the result fails there too, and at the AveragePool.

    The checker stops at its first error, the same in both, so only comparing
    node by node sees the second.  (onnx's own AveragePool adapter keeps the
    dilations; streamconv's would refuse them before the checker runs.)
    """
    src = save(_failing_input(dilations=True), tmp_path / "in.onnx")
    before = digest(Path(src))
    code = cli_main([src, str(tmp_path / "o.onnx"), "--opset", "18", "-q",
                     "--strict-onnx"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"streamconv: error: {src}: the converted model fails onnx.checker "
                          "at the node making 'Y', where the input does not fail so: "
                          "Unrecognized attribute: dilations for operator AveragePool"), err
    assert not (tmp_path / "o.onnx").exists() and leftovers(tmp_path) == []
    assert digest(Path(src)) == before


def test_an_old_checker_error_alone_is_passed_through_with_a_warning(tmp_path: Path) -> None:
    src = save(_failing_input(dilations=False), tmp_path / "in.onnx")
    report = convert(src, tmp_path / "o.onnx", opset=18)
    assert report.warnings == [
        "the input already fails onnx.checker the same way: "
        "Unrecognized attribute: foo for operator Relu"
    ]
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert [n.op_type for n in out.graph.node] == ["Relu", "AveragePool"]


def test_cli_summary_and_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    assert cli_main([src, str(tmp_path / "o.onnx"), "--opset", "13"]) == 0
    out = capsys.readouterr().out
    assert "opset 11" in out and "opset 13" in out
    assert cli_main([src, str(tmp_path / "q.onnx"), "--opset", "13", "-q"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_usage_error_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    code = cli_main([src, str(tmp_path / "o.onnx"), "--size-threshold", "-3"])
    err = capsys.readouterr().err
    assert code == 2 and "--size-threshold must be >= 0, got -3" in err


def test_external_layout_with_value_read_tensor_copied_early(tmp_path: Path) -> None:
    """A large value-read input (a Reshape shape of 8200 ones, 65600 bytes) is copied into
    the sidecar before analysis keeps it inline; the output stays correct."""
    from onnx import helper

    shape = numpy_helper.from_array(np.ones(8200, dtype=np.int64), "shape")
    table = numpy_helper.from_array(rand((512, 64)), "table")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "shape"], ["R"]),
         helper.make_node("Identity", ["table"], ["T"])], "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("R", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("T", onnx.TensorProto.FLOAT, None)],
        initializer=[table, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    src = save(model, tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    report = convert(src, dst, opset=18, layout="external")
    assert report.tensors_diverted == 1  # the table; the shape stays inline
    out = onnx.load(str(dst), load_external_data=False)
    by_name = {t.name: t for t in out.graph.initializer}
    assert by_name["shape"].raw_data == shape.raw_data
    assert by_name["table"].data_location == onnx.TensorProto.EXTERNAL
    loaded = {t.name: t for t in onnx.load(str(dst)).graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(loaded["table"]),
                                  numpy_helper.to_array(table))


def test_checksums_match_sidecar_bytes(tmp_path: Path) -> None:
    src = save(reduce_chain(n=600), tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    convert(src, dst, opset=18, layout="external", checksum=True)
    model = onnx.load(str(dst), load_external_data=False)
    data = (tmp_path / "out.onnx.data").read_bytes()
    checked = 0
    for tensor in model.graph.initializer:
        keys = {e.key: e.value for e in tensor.external_data}
        if keys:
            start, length = int(keys["offset"]), int(keys["length"])
            assert keys["checksum"] == hashlib.sha1(data[start:start + length]).hexdigest()
            checked += 1
    assert checked == 1
