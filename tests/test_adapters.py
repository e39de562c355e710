"""Numeric checks of the step adapters for Pad, Split, Shape, GRU/LSTM/RNN, Reshape,
BatchNormalization, AveragePool, Cast/CastLike, Constant and GridSample.

The oracle is ONNX Runtime: onnx's backend node cases are converted down with
:func:`streamconv.steps.convert_down`, checked with the full checker, run, and
compared with their reference outputs at the backend tolerance.  Cases the
backend lacks are built here and compared with the original model's outputs
(ORT's, or onnx's reference evaluator where ORT cannot run the original).  A
converted model ORT cannot run at the old opset is reported as a skip, never
counted as a pass.  Every refusal is asserted by its message.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from streamconv import convert
from streamconv.steps import StepError, convert_down

RTOL, ATOL = 1e-3, 1e-7


# -- helpers ---------------------------------------------------------------------------


@cache
def _backend() -> dict[str, Any]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cast cases overflow on purpose
        return {c.name: c for c in collect_testcases()}


def _array(value: Any) -> np.ndarray:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def backend_case(name: str, constants: tuple[str, ...] = ()
                 ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[np.ndarray], Any]:
    """Backend case *name*: its model, feeds and expected outputs.

    The graph inputs named in *constants* become initializers holding the
    case's data, as they are in real models (pads, axes, split sizes, shapes).
    """
    case = _backend()[name]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, outputs = case.data_sets[0]
    kept, feeds = [], {}
    for info, value in zip(case.model.graph.input, inputs, strict=True):
        if info.name in constants:
            model.graph.initializer.append(numpy_helper.from_array(_array(value), info.name))
        else:
            kept.append(info)
            feeds[info.name] = _array(value)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model, feeds, [_array(o) for o in outputs], case


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """An ORT session for *model*; skip (reported) when ORT cannot load it."""
    try:
        return ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT lacks kernels for some old opsets
        pytest.skip(f"ORT cannot run this model: {str(e).splitlines()[0][:160]}")


def converted(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """*model* converted down to *target*, which must pass the full checker."""
    out = convert_down(model, target)
    opset = max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == target
    onnx.checker.check_model(out, full_check=True)
    return out


def assert_close(got: list[np.ndarray], want: list[np.ndarray], rtol: float = RTOL,
                 atol: float = ATOL) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def refusal(model: onnx.ModelProto, target: int) -> str:
    """The message of the refusal converting *model* to *target* raises."""
    with pytest.raises(StepError) as caught:
        convert_down(model, target)
    return str(caught.value)


def model_of(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[onnx.ValueInfoProto], opset: int,
             initializers: list[onnx.TensorProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def vi(name: str, elem: int, shape: list[Any] | int | None) -> onnx.ValueInfoProto:
    """A tensor's value info; an int *shape* is a rank of symbolic dimensions."""
    if isinstance(shape, int):
        shape = [f"{name}_{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, elem, shape)


def same_as_original(model: onnx.ModelProto, target: int, feeds: dict[str, np.ndarray],
                     rtol: float = RTOL, atol: float = ATOL) -> onnx.ModelProto:
    """Convert *model* to *target*; its ORT outputs must be the original's."""
    want = session(model).run(None, feeds)
    out = converted(model, target)
    assert_close(session(out).run(None, feeds), want, rtol, atol)
    return out


def rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- backend node cases ----------------------------------------------------------------

PADS = ("pads", "axes", "value")
BACKEND_PASSES: list[tuple[str, int, tuple[str, ...]]] = [
    *[(n, t, PADS) for n in ("test_constant_pad", "test_constant_pad_axes",
                             "test_constant_pad_negative_axes") for t in (18, 17, 13, 11, 10, 7)],
    *[(n, t, PADS) for n in ("test_edge_pad", "test_reflect_pad") for t in (17, 13, 11)],
    # pads computed at run time (only the axes constant): scattered into full-rank pads
    *[(n, t, ("axes",)) for n in ("test_constant_pad_axes", "test_constant_pad_negative_axes")
      for t in (17, 13, 11)],
    ("test_constant_pad", 2, PADS),
    # split sizes computed at run time: Split 13 takes them as an input too
    *[(n, t, ()) for n in ("test_split_variable_parts_1d_opset18",
                           "test_split_variable_parts_2d_opset18") for t in (17, 13)],
    *[(n, t, ("split",)) for n in (
        "test_split_equal_parts_1d_opset18", "test_split_variable_parts_1d_opset18",
        "test_split_equal_parts_2d", "test_split_variable_parts_2d_opset18",
        "test_split_equal_parts_default_axis_opset18",
        "test_split_variable_parts_default_axis_opset18", "test_split_zero_size_splits_opset18",
        "test_split_1d_uneven_split_opset18", "test_split_2d_uneven_split_opset18",
    ) for t in (17, 13, 12, 10, 7)],
    *[(n, t, ("split",)) for n in (
        "test_split_equal_parts_1d_opset13", "test_split_variable_parts_2d_opset13",
        "test_split_equal_parts_default_axis_opset13", "test_split_zero_size_splits_opset13",
    ) for t in (11, 10)],
    *[(n, t, ()) for n in (
        "test_shape", "test_shape_example", "test_shape_start_1", "test_shape_end_1",
        "test_shape_start_negative_1", "test_shape_end_negative_1",
        "test_shape_start_1_end_negative_1", "test_shape_start_1_end_2", "test_shape_clip_start",
        "test_shape_clip_end", "test_shape_start_greater_than_end",
    ) for t in (14, 13, 10, 7)],
    *[(n, t, ()) for n in (
        "test_gru_defaults", "test_gru_with_initial_bias", "test_gru_seq_length",
        "test_gru_batchwise", "test_gru_reverse", "test_gru_bidirectional",
        "test_lstm_defaults", "test_lstm_with_initial_bias", "test_lstm_with_peepholes",
        "test_lstm_batchwise", "test_lstm_reverse", "test_lstm_bidirectional",
        "test_simple_rnn_defaults", "test_simple_rnn_with_initial_bias", "test_rnn_seq_length",
        "test_simple_rnn_batchwise", "test_simple_rnn_reverse", "test_simple_rnn_bidirectional",
    ) for t in (13, 7)],
    *[(n, t, ("shape",)) for n in (
        "test_reshape_reordered_all_dims", "test_reshape_reordered_last_dims",
        "test_reshape_reduced_dims", "test_reshape_extended_dims", "test_reshape_one_dim",
        "test_reshape_negative_dim", "test_reshape_negative_extended_dims",
        "test_reshape_zero_dim", "test_reshape_zero_and_negative_dim",
    ) for t in (13, 7)],
    *[(n, t, ()) for n in ("test_batchnorm_example", "test_batchnorm_epsilon")
      for t in (13, 9, 7)],
    *[(n, t, ()) for n in (
        "test_averagepool_1d_default", "test_averagepool_2d_default",
        "test_averagepool_3d_default", "test_averagepool_2d_pads",
        "test_averagepool_2d_pads_count_include_pad", "test_averagepool_2d_precomputed_pads",
        "test_averagepool_2d_precomputed_strides", "test_averagepool_2d_same_upper",
        "test_averagepool_2d_same_lower", "test_averagepool_2d_strides",
        "test_averagepool_2d_ceil",
    ) for t in (18, 11)],
    *[(f"test_cast_{a}_to_{b}", t, ()) for a, b in (
        ("FLOAT", "FLOAT16"), ("FLOAT", "DOUBLE"), ("FLOAT16", "FLOAT"), ("FLOAT16", "DOUBLE"),
        ("DOUBLE", "FLOAT"), ("DOUBLE", "FLOAT16"),
    ) for t in (18, 13, 9, 8)],
    *[(f"test_castlike_{a}_to_{b}{x}", t, ()) for a, b in (
        ("FLOAT", "FLOAT16"), ("FLOAT", "DOUBLE"), ("FLOAT16", "FLOAT"), ("DOUBLE", "FLOAT16"),
    ) for x in ("", "_expanded") for t in (18, 13, 9)],
    *[("test_constant", t, ()) for t in (18, 11, 8, 7)],
    *[(n, t, ()) for n in (
        "test_gridsample", "test_gridsample_zeros_padding", "test_gridsample_border_padding",
        "test_gridsample_reflection_padding", "test_gridsample_bilinear",
        "test_gridsample_aligncorners_true", "test_gridsample_nearest",
        "test_gridsample_bicubic", "test_gridsample_nearest_align_corners_0_additional_1",
        "test_gridsample_nearest_align_corners_1_additional_1",
        "test_gridsample_bilinear_align_corners_0_additional_1",
        "test_gridsample_bilinear_align_corners_1_additional_1",
        "test_gridsample_bicubic_align_corners_0_additional_1",
        "test_gridsample_bicubic_align_corners_1_additional_1",
    ) for t in (19, 16)],
]


@pytest.mark.parametrize(("name", "target", "constants"), BACKEND_PASSES,
                         ids=[f"{n}-{t}-{'+'.join(c) or 'no_constants'}"
                              for n, t, c in BACKEND_PASSES])
def test_backend_case(name: str, target: int, constants: tuple[str, ...]) -> None:
    model, feeds, want, case = backend_case(name, constants)
    out = converted(model, target)
    got = session(out).run(None, feeds)
    assert_close(got, want, case.rtol, case.atol)


BACKEND_REFUSALS: list[tuple[str, int, tuple[str, ...], str]] = [
    ("test_constant_pad", 10, (), "the pads input 'pads' is not a constant, and Pad below 11 "
     "takes pads as an attribute"),
    ("test_edge_pad", 10, PADS, "input 'x' is tensor(int32), which opset 10 does not allow"),
    ("test_constant_pad_axes", 17, ("pads",), "the axes input 'axes' is not a constant, and "
     "Pad below 18 needs pads for every axis"),
    ("test_wrap_pad", 17, PADS, "mode 'wrap' exists only from opset 19"),
    ("test_wrap_pad", 18, PADS, "mode 'wrap' exists only from opset 19"),
    ("test_wrap_pad", 18, (), "mode 'wrap' exists only from opset 19"),
    ("test_reshape_allowzero_reordered", 13, ("shape",),
     "allowzero=1 with a 0 in shape [3, 4, 0] has no equivalent below 14"),
    ("test_reshape_allowzero_reordered", 13, (),
     "allowzero=1 with a shape ('shape') that is not a constant has no equivalent below 14"),
    ("test_batchnorm_example_training_mode", 13, (),
     "training_mode=1 (normalising with the batch's statistics and updating the running "
     "ones) has no equivalent below 14"),
    ("test_averagepool_2d_dilations", 18, (), "dilations=[2, 2] has no equivalent below 19"),
    ("test_averagepool_3d_dilations_small", 18, (),
     "dilations=[2, 2, 2] has no equivalent below 19"),
    ("test_cast_FLOAT_to_FLOAT8E4M3FN", 18, (),
     "the target type (to) is float8e4m3fn: float8 types exist only from opset 19"),
    ("test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2", 18, (),
     "the target type (to) is float8e5m2: float8 types exist only from opset 19"),
    ("test_cast_FLOAT8E5M2FNUZ_to_FLOAT", 18, (),
     "input 'input' is float8e5m2fnuz: float8 types exist only from opset 19"),
    ("test_castlike_FLOAT_to_FLOAT8E4M3FNUZ", 18, (),
     "the target type (input 'like') is float8e4m3fnuz: float8 types exist only from opset 19"),
    ("test_gridsample_volumetric_bilinear_align_corners_0", 19, (),
     "a 5-D input has no equivalent below 20 (GridSample took only 4-D inputs)"),
    ("test_gridsample_volumetric_nearest_align_corners_1", 16, (),
     "a 5-D input has no equivalent below 20 (GridSample took only 4-D inputs)"),
]


@pytest.mark.parametrize(("name", "target", "constants", "message"), BACKEND_REFUSALS,
                         ids=[f"{n}-{t}" for n, t, _, _ in BACKEND_REFUSALS])
def test_backend_refusal(name: str, target: int, constants: tuple[str, ...],
                         message: str) -> None:
    model, _, _, _ = backend_case(name, constants)
    assert message in refusal(model, target)


def test_backend_case_ort_cannot_run_pad_1() -> None:
    model, feeds, want, _ = backend_case("test_constant_pad", PADS)
    out = converted(model, 1)
    assert "paddings" in {a.name for a in out.graph.node[0].attribute}
    # ORT has no Pad-1 kernel: reported as a skip, not counted as a pass
    assert_close(session(out).run(None, feeds), want)


# -- end to end on saved files ---------------------------------------------------------


@pytest.mark.parametrize(("name", "target", "constants"), [
    ("test_constant_pad_negative_axes", 17, PADS),
    ("test_split_1d_uneven_split_opset18", 17, ()),
    ("test_gru_batchwise", 13, ()),
    ("test_shape_start_negative_1", 14, ()),
    ("test_castlike_FLOAT_to_DOUBLE", 18, ()),
])
def test_convert_file(tmp_path: Path, name: str, target: int,
                      constants: tuple[str, ...]) -> None:
    model, feeds, want, case = backend_case(name, constants)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    report = convert(src, dst, opset=target)
    assert report.opset_to == target
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert_close(session(out).run(None, feeds), want, case.rtol, case.atol)


# -- Pad -------------------------------------------------------------------------------


def _pad_model(axes: list[int], pads: list[int], rank_known: bool = True,
               value: float | None = None, elem: int = TensorProto.FLOAT,
               axes_constant: bool = True) -> onnx.ModelProto:
    shape = [2, 3, 4] if rank_known else None
    inits = [numpy_helper.from_array(np.array(pads, np.int64), "pads")]
    inputs = [vi("x", elem, shape)]
    names = ["x", "pads", "", "axes"]
    if value is not None:
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        inits.append(numpy_helper.from_array(np.array(value, dtype), "value"))
        names[2] = "value"
    if axes_constant:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
    else:
        inputs.append(vi("axes", TensorProto.INT64, [len(axes)]))
    node = helper.make_node("Pad", names, ["y"], name="pad")
    return model_of([node], inputs, [vi("y", elem, 3)], 18, inits)


@pytest.mark.parametrize("target", [17, 13, 11, 10])
def test_pad_negative_axes(target: int) -> None:
    model = _pad_model([-1, 0], [1, 2, 3, 0], value=1.5)
    same_as_original(model, target, {"x": rand((2, 3, 4))})


def test_pad_without_axes_drops_nothing() -> None:
    model = _pad_model([], [0, 1, 0, 1, 0, 2])
    model.graph.node[0].input[:] = ["x", "pads"]
    del model.graph.initializer[1:]
    out = same_as_original(model, 17, {"x": rand((2, 3, 4))})
    assert list(out.graph.node[0].input) == ["x", "pads"]


def test_pad_double_value_not_a_float32_refused() -> None:
    model = _pad_model([1], [1, 1], value=0.1, elem=TensorProto.DOUBLE)
    same_as_original(model, 11, {"x": rand((2, 3, 4)).astype(np.float64)})
    assert "constant_value 0.1 is not exactly a 32-bit float, which the attribute value of " \
        "Pad below 11 is" in refusal(model, 10)


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
@pytest.mark.parametrize("target", [10, 7])
def test_pad_modes_below_11(mode: str, target: int) -> None:
    model = _pad_model([0, 2], [1, 2, 0, 3], value=0.5 if mode == "constant" else None)
    model.graph.node[0].attribute.append(helper.make_attribute("mode", mode))
    out = same_as_original(model, target, {"x": rand((2, 3, 4))})
    assert [helper.get_attribute_value(a) for a in out.graph.node[-1].attribute
            if a.name == "mode"] == [mode.encode()]


def test_pad_refusals() -> None:
    assert "the rank of input 'x' is unknown, and Pad below 18 needs pads for every axis" \
        in refusal(_pad_model([1], [1, 1], rank_known=False), 17)
    assert "the axes input 'axes' is not a constant" \
        in refusal(_pad_model([1], [1, 1], axes_constant=False), 17)
    assert "axis 3 is out of range for an input of rank 3" \
        in refusal(_pad_model([3], [1, 1]), 17)
    assert "axes [1, -2] name an axis twice" in refusal(_pad_model([1, -2], [1, 1, 1, 1]), 17)
    assert "pads holds 4 values for 1 axes (it needs 2)" \
        in refusal(_pad_model([1], [1, 1, 1, 1]), 17)


# -- Split -----------------------------------------------------------------------------


def _split_model(length: int | None, parts: int, axis: int = 1,
                 opset: int = 18) -> onnx.ModelProto:
    shape = [2, length, 3] if length is not None else [2, "n", 3]
    outs = [f"y{i}" for i in range(parts)]
    attrs: dict[str, Any] = {"axis": axis}
    if opset >= 18:
        attrs["num_outputs"] = parts
    node = helper.make_node("Split", ["x"], outs, name="split", **attrs)
    return model_of([node], [vi("x", TensorProto.FLOAT, shape)],
                    [vi(o, TensorProto.FLOAT, 3) for o in outs], opset)


@pytest.mark.parametrize(("length", "parts", "sizes"), [(7, 3, [3, 3, 1]), (10, 4, [3, 3, 3, 1]),
                                                        (6, 3, [2, 2, 2]), (4, 3, [2, 2, 0])])
@pytest.mark.parametrize("target", [17, 12])
def test_split_num_outputs_uneven(length: int, parts: int, sizes: list[int],
                                  target: int) -> None:
    model = _split_model(length, parts, axis=-2)
    x = rand((2, length, 3))
    out = converted(model, target)
    got = session(out).run(None, {"x": x})
    assert [g.shape[1] for g in got] == sizes
    # onnx's reference evaluator gives Split-18's own meaning of num_outputs
    want = ReferenceEvaluator(model).run(None, {"x": x})
    assert_close(got, list(want))


def test_split_refusals() -> None:
    assert "num_outputs=3 needs the length of axis 1 of input 'x', which shape inference " \
        "could not tell" in refusal(_split_model(None, 3), 17)
    assert "num_outputs=4 cannot split an axis of length 5 into parts of 2" \
        in refusal(_split_model(5, 4), 17)


def test_split_negative_axis_below_11() -> None:
    model = _split_model(4, 2, axis=-2, opset=11)
    out = same_as_original(model, 10, {"x": rand((2, 4, 3))})
    assert helper.get_attribute_value(out.graph.node[0].attribute[0]) == 1
    unknown = _split_model(4, 2, axis=-2, opset=11)
    unknown.graph.input[0].type.tensor_type.ClearField("shape")
    assert "axis=-2 is negative and the rank of input 'x' is unknown" \
        in refusal(unknown, 10)


# -- Shape -----------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"), [(-3, -1), (-10, 10), (1, None), (None, -2), (3, 1),
                                            (0, None)])
@pytest.mark.parametrize("rank_known", [True, False])
def test_shape_negative_start_end(start: int | None, end: int | None, rank_known: bool) -> None:
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    node = helper.make_node("Shape", ["x"], ["s"], name="shape", **attrs)
    if rank_known:
        model = model_of([node], [vi("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                         [vi("s", TensorProto.INT64, [None])], 15)
        for target in (14, 9):
            same_as_original(model, target, {"x": rand((2, 3, 4, 5))})
        return
    # axes known only at run time: shape inference cannot tell the rank
    squeeze = helper.make_node("Squeeze", ["x5", "axes"], ["x"], name="squeeze")
    model = model_of([squeeze, node], [vi("x5", TensorProto.FLOAT, [2, 3, 4, 5, 1]),
                                       vi("axes", TensorProto.INT64, [1])],
                     [vi("s", TensorProto.INT64, [None])], 15)
    out = same_as_original(model, 14, {"x5": rand((2, 3, 4, 5, 1)),
                                       "axes": np.array([4], np.int64)})
    assert "Slice" in [n.op_type for n in out.graph.node] or (start, end) == (0, None)


# -- GRU / LSTM / RNN ------------------------------------------------------------------


def _recurrent(op: str, direction: str, seed: int) -> tuple[onnx.ModelProto,
                                                            dict[str, np.ndarray]]:
    """A batch-first (layout=1) *op* at opset 14 with every optional input and output."""
    batch, seq, size, hidden = 3, 5, 4, 6
    dirs = 2 if direction == "bidirectional" else 1
    gates = {"GRU": 3, "LSTM": 4, "RNN": 1}[op]
    rng = np.random.default_rng(seed)

    def tensor(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    inits = [tensor("W", (dirs, gates * hidden, size)), tensor("R", (dirs, gates * hidden, hidden)),
             tensor("B", (dirs, 2 * gates * hidden)),
             numpy_helper.from_array(np.array([5, 3, 4], np.int32), "lens")]
    inputs = ["X", "W", "R", "B", "lens", "h0"]
    feeds = {"X": rng.standard_normal((batch, seq, size)).astype(np.float32),
             "h0": rng.standard_normal((batch, dirs, hidden)).astype(np.float32)}
    graph_inputs = [vi("X", TensorProto.FLOAT, [batch, seq, size]),
                    vi("h0", TensorProto.FLOAT, [batch, dirs, hidden])]
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        inputs += ["c0", "P"]
        feeds["c0"] = rng.standard_normal((batch, dirs, hidden)).astype(np.float32)
        graph_inputs.append(vi("c0", TensorProto.FLOAT, [batch, dirs, hidden]))
        inits.append(tensor("P", (dirs, 3 * hidden)))
        outputs.append("Y_c")
    node = helper.make_node(op, inputs, outputs, name="cell", hidden_size=hidden, layout=1,
                            direction=direction)
    model = model_of([node], graph_inputs,
                     [vi(o, TensorProto.FLOAT, 4 if o == "Y" else 3) for o in outputs], 14, inits)
    return model, feeds


def _sequence_first_twin(model: onnx.ModelProto, feeds: dict[str, np.ndarray]
                         ) -> list[np.ndarray]:
    """*model*'s outputs from its layout=0 twin in ORT, inputs and outputs moved by numpy."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    node = twin.graph.node[0]
    kept = [a for a in node.attribute if a.name != "layout"]
    del node.attribute[:]
    node.attribute.extend(kept)
    moved = {k: v.transpose(1, 0, 2).copy() for k, v in feeds.items()}
    for info in twin.graph.input:
        dims = info.type.tensor_type.shape.dim
        first, second = dims[0].dim_value, dims[1].dim_value
        dims[0].dim_value, dims[1].dim_value = second, first
    for info in twin.graph.output:
        info.type.tensor_type.ClearField("shape")
        info.type.tensor_type.shape.SetInParent()
        for _ in range(4 if info.name == "Y" else 3):
            info.type.tensor_type.shape.dim.add()
    outs = session(twin).run(None, moved)
    return [o.transpose(2, 0, 1, 3) if o.ndim == 4 else o.transpose(1, 0, 2) for o in outs]


@pytest.mark.parametrize("op", ["GRU", "LSTM", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("lengths", [False, True])
def test_recurrent_layout_1(op: str, direction: str, lengths: bool) -> None:
    model, feeds = _recurrent(op, direction, seed=len(op) + len(direction))
    if lengths:
        # onnx's reference evaluator ignores sequence_lens: the oracle is ORT running the
        # sequence-first twin of the model
        want = _sequence_first_twin(model, feeds)
    else:
        model.graph.node[0].input[4] = ""
        del model.graph.initializer[3]
        # ORT runs no layout=1 recurrent op at any opset: onnx's reference evaluator is
        # the oracle
        want = list(ReferenceEvaluator(model).run(None, feeds))
    out = converted(model, 13)
    # X and initial_h (and initial_c) in, Y and Y_h (and Y_c) out
    assert [n.op_type for n in out.graph.node].count("Transpose") == (6 if op == "LSTM" else 4)
    assert_close(session(out).run(None, feeds), want, rtol=1e-4, atol=1e-5)


def test_recurrent_layout_0_drops_attribute() -> None:
    model, feeds = _recurrent("GRU", "forward", seed=1)
    node = model.graph.node[0]
    for a in node.attribute:
        if a.name == "layout":
            a.i = 0
    node.input[:] = ["X", "W", "R", "B"]
    del model.graph.input[1:]
    feeds = {"X": feeds["X"].transpose(1, 0, 2).copy()}
    model.graph.input[0].CopyFrom(vi("X", TensorProto.FLOAT, [5, 3, 4]))
    out = same_as_original(model, 13, feeds)
    assert [n.op_type for n in out.graph.node] == ["GRU"]
    assert "layout" not in {a.name for a in out.graph.node[0].attribute}


# -- Reshape, BatchNormalization, AveragePool ------------------------------------------


def _reshape(allowzero: int, shape: list[int] | None) -> onnx.ModelProto:
    inits = [] if shape is None else [numpy_helper.from_array(np.array(shape, np.int64), "s")]
    inputs = [vi("x", TensorProto.FLOAT, [2, 3, 4])]
    if shape is None:
        inputs.append(vi("s", TensorProto.INT64, [2]))
    node = helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape", allowzero=allowzero)
    return model_of([node], inputs, [vi("y", TensorProto.FLOAT, 2)], 14, inits)


def test_reshape_allowzero() -> None:
    out = same_as_original(_reshape(1, [6, -1]), 13, {"x": rand((2, 3, 4))})
    assert not out.graph.node[0].attribute
    same_as_original(_reshape(0, [0, -1]), 13, {"x": rand((2, 3, 4))})
    assert "allowzero=1 with a shape ('s') that is not a constant has no equivalent below 14" \
        in refusal(_reshape(1, None), 13)


def test_batchnorm_extra_outputs_refused() -> None:
    model, _, _, _ = backend_case("test_batchnorm_example")
    node = model.graph.node[0]
    node.output.extend(["m", "v"])
    assert "outputs 'm', 'v' (running mean and variance) exist only in training mode" \
        in refusal(model, 13)


def test_averagepool_unit_dilations() -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[2, 2],
                            dilations=[1, 1], strides=[1, 2])
    model = model_of([node], [vi("x", TensorProto.FLOAT, [1, 2, 5, 6])],
                     [vi("y", TensorProto.FLOAT, 4)], 19)
    out = same_as_original(model, 18, {"x": rand((1, 2, 5, 6))})
    assert "dilations" not in {a.name for a in out.graph.node[0].attribute}


# -- Cast, CastLike, Constant ----------------------------------------------------------


def test_cast_saturate_dropped() -> None:
    node = helper.make_node("Cast", ["x"], ["y"], name="cast", to=TensorProto.FLOAT16,
                            saturate=0)
    model = model_of([node], [vi("x", TensorProto.FLOAT, [3, 4])],
                     [vi("y", TensorProto.FLOAT16, [3, 4])], 19)
    with np.errstate(over="ignore"):
        x = rand((3, 4)) * 1e5
        want = x.astype(np.float16)
    # ORT refuses saturate on a cast to anything but float8, so the original cannot run:
    # numpy's cast (no saturation, as saturate=0 asks) is the oracle
    out = converted(model, 18)
    assert not [a for a in out.graph.node[0].attribute if a.name == "saturate"]
    assert_close(session(out).run(None, {"x": x}), [want])


def test_cast_unknown_input_type_refused() -> None:
    node = helper.make_node("Cast", ["x"], ["y"], name="cast", to=TensorProto.FLOAT)
    model = model_of([node], [helper.make_value_info("x", onnx.TypeProto())],
                     [vi("y", TensorProto.FLOAT, None)], 19)
    assert "the type of input 'x' is unknown, and Cast below 19 has no float8 types" \
        in refusal(model, 18)


def _constant_model(value: onnx.TensorProto | None, opset: int, out_elem: int,
                    **attrs: Any) -> onnx.ModelProto:
    if value is not None:
        attrs["value"] = value
    node = helper.make_node("Constant", [], ["c"], name="const", **attrs)
    ident = helper.make_node("Identity", ["c"], ["y"], name="out")
    rank = 1
    for name in ("value_float", "value_int", "value_string"):
        rank = 0 if name in attrs else rank
    return model_of([node, ident], [], [vi("y", out_elem, rank)], opset)


@pytest.mark.parametrize(("values", "dtype", "elem"), [
    ([1, -2, 2**40, 0], np.int64, TensorProto.INT64),
    ([3, 7], np.int32, TensorProto.INT32),
    ([255, 0], np.uint8, TensorProto.UINT8),
    ([2**53, -(2**53)], np.int64, TensorProto.INT64),
    ([True, False, True], np.bool_, TensorProto.BOOL),
])
def test_constant_below_9_as_float_and_cast(values: list[Any], dtype: Any, elem: int) -> None:
    model = _constant_model(numpy_helper.from_array(np.array(values, dtype), "v"), 9, elem)
    want = session(model).run(None, {})
    out = converted(model, 8)
    assert [n.op_type for n in out.graph.node] == ["Constant", "Cast", "Identity"]
    got = session(out).run(None, {})
    assert got[0].dtype == want[0].dtype and np.array_equal(got[0], want[0])


def test_constant_below_9_refusals() -> None:
    inexact = _constant_model(numpy_helper.from_array(np.array([2**53 + 1], np.int64), "v"),
                              9, TensorProto.INT64)
    assert "the int64 value is not exactly representable as a double" in refusal(inexact, 8)
    text = _constant_model(helper.make_tensor("v", TensorProto.STRING, [1], [b"a"]), 9,
                           TensorProto.STRING)
    assert "a string value has no equivalent below 9" in refusal(text, 8)


@pytest.mark.parametrize(("attr", "value", "elem"), [
    ("value_float", 2.5, TensorProto.FLOAT),
    ("value_floats", [1.0, -2.0], TensorProto.FLOAT),
    ("value_int", 7, TensorProto.INT64),
    ("value_ints", [1, 2, 3], TensorProto.INT64),
    ("value_string", "abc", TensorProto.STRING),
    ("value_strings", ["a", "bc"], TensorProto.STRING),
])
def test_constant_value_attributes_below_12(attr: str, value: Any, elem: int) -> None:
    model = _constant_model(None, 12, elem, **{attr: value})
    want = session(model).run(None, {})
    out = converted(model, 11)
    assert [a.name for a in out.graph.node[0].attribute] == ["value"]
    got = session(out).run(None, {})
    assert got[0].shape == want[0].shape and got[0].tolist() == want[0].tolist()
    if elem != TensorProto.STRING:
        # and on down to 8, where the int64 ones become a float Constant and a Cast
        low = converted(model, 8)
        assert session(low).run(None, {})[0].tolist() == want[0].tolist()


# -- GridSample ------------------------------------------------------------------------


def test_gridsample_unknown_rank_refused() -> None:
    node = helper.make_node("GridSample", ["x", "g"], ["y"], name="gs", mode="linear")
    model = model_of([node], [vi("x", TensorProto.FLOAT, None), vi("g", TensorProto.FLOAT, None)],
                     [vi("y", TensorProto.FLOAT, None)], 20)
    assert "the rank of input 'x' is unknown, and below 20 GridSample takes only 4-D inputs" \
        in refusal(model, 19)


def test_gridsample_modes_renamed() -> None:
    for mode, old in (("linear", b"bilinear"), ("cubic", b"bicubic"), ("nearest", b"nearest")):
        model, feeds, _, _ = backend_case("test_gridsample")
        attrs = model.graph.node[0].attribute
        for a in attrs:
            if a.name == "mode":
                a.s = mode.encode()
        out = converted(model, 19)
        assert [a.s for a in out.graph.node[0].attribute if a.name == "mode"] == [old]
        same_as_original(model, 19, feeds)


def test_convert_file_constant_int64_to_8(tmp_path: Path) -> None:
    value = numpy_helper.from_array(np.array([[1, -2], [2**40, 0]], np.int64), "v")
    node = helper.make_node("Constant", [], ["c"], name="const", value=value)
    add = helper.make_node("Add", ["x", "c"], ["y"], name="add")
    model = model_of([node, add], [vi("x", TensorProto.INT64, [2, 2])],
                     [vi("y", TensorProto.INT64, [2, 2])], 9)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    convert(src, dst, opset=8)
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.array([[3, 4], [5, -6]], np.int64)}
    got = session(out).run(None, feeds)
    assert got[0].dtype == np.int64 and np.array_equal(got[0], session(model).run(None, feeds)[0])
