"""The adapters in axes.py, inputs.py and misc.py, against the numbers.

onnx's backend node cases are converted down with ``convert_down`` and run in
ONNX Runtime against their reference outputs (rtol 1e-3, atol 1e-7, like
onnx's backend tests).  Their parameter inputs (axes, starts, K, min, ratio…)
are graph inputs; those are frozen into initializers first, since an
attribute-to-input step can only go down with a constant, and the reference
outputs stay the same.  Models built here cover what the cases lack and are
compared with the original model's ORT outputs on seeded inputs.  Every
converted model passes ``onnx.checker.check_model(full_check=True)``; a model
below opset 7, which ORT cannot run, is checked and then reported as skipped,
never counted as a pass.  Each refusal is asserted by its message.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import streamconv
from streamconv.steps import StepError, convert_down

RTOL, ATOL = 1e-3, 1e-7
SEED = 20261201
#: input positions of the parameters that are frozen into initializers, per op
FROZEN = {"Slice": {1, 2, 3, 4}, "Squeeze": {1}, "Unsqueeze": {1}, "Clip": {1, 2}, "TopK": {1},
          "Dropout": {1, 2}, "QuantizeLinear": {1, 2},
          "DequantizeLinear": {1, 2}}


@cache
def _cases() -> dict[str, object]:
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c.name: c for c in collect_testcases()}


def _case(name: str) -> tuple[onnx.ModelProto, list[np.ndarray], list[np.ndarray]]:
    """Backend case *name* with its parameter inputs frozen: model, inputs, outputs."""
    case = _cases()[name]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)  # type: ignore[attr-defined]
    inputs, outputs = case.data_sets[0]  # type: ignore[attr-defined]
    inputs = [np.asarray(v) for v in inputs]
    frozen = {x for n in model.graph.node for i, x in enumerate(n.input)
              if i in FROZEN.get(n.op_type, ())}
    kept, feeds = [], []
    for info, value in zip(model.graph.input, inputs, strict=True):
        if info.name in frozen:
            model.graph.initializer.append(numpy_helper.from_array(value, info.name))
        else:
            kept.append(info)
            feeds.append(value)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model, feeds, [np.asarray(v) for v in outputs]


def _convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """*model* converted down to *target*, checked by onnx's full checker."""
    out = convert_down(model, target)
    assert {o.version for o in out.opset_import if o.domain in ("", "ai.onnx")} == {target}
    onnx.checker.check_model(out, full_check=True)
    return out


def _run(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds, strict=True)))  # type: ignore[no-any-return]


def _same(got: list[np.ndarray], want: list[np.ndarray], rtol: float = RTOL,
          atol: float = ATOL) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def _unrunnable(target: int) -> None:
    """Report a converted, checked model ORT cannot run (not a pass)."""
    pytest.skip(f"converted and checked; ONNX Runtime runs opset >= 7 only, not {target}")


def _refusal(model: onnx.ModelProto, target: int, *words: str) -> str:
    with pytest.raises(StepError) as e:
        convert_down(model, target)
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- backend cases

def _pairs(names: str, targets: tuple[int, ...]) -> list[tuple[str, int]]:
    return [(n, t) for n in names.split() for t in targets]


BACKEND = (
    _pairs("test_slice test_slice_neg test_slice_start_out_of_bounds "
           "test_slice_end_out_of_bounds test_slice_default_axes test_slice_default_steps "
           "test_slice_negative_axes", (11, 10, 9, 7))
    + _pairs("test_slice_neg_steps", (11, 10))
    + _pairs("test_squeeze test_squeeze_negative_axes test_unsqueeze_axis_0 "
             "test_unsqueeze_axis_2 test_unsqueeze_two_axes test_unsqueeze_three_axes "
             "test_unsqueeze_unsorted_axes test_unsqueeze_negative_axes", (11, 10, 9, 7))
    + _pairs("test_gather_0 test_gather_1 test_gather_2d_indices test_gather_negative_indices",
             (11, 10, 9))
    + _pairs("test_onehot_without_axis test_onehot_with_axis test_onehot_negative_indices "
             "test_onehot_out_of_range_indices test_onehot_with_negative_axis", (11, 10, 9))
    + _pairs("test_compress_0 test_compress_1 test_compress_default_axis "
             "test_compress_negative_axis", (11, 10, 9))
    + _pairs("test_hardmax_example test_hardmax_axis_0 test_hardmax_axis_2 "
             "test_hardmax_negative_axis test_hardmax_default_axis", (11, 10, 8, 7))
    + _pairs("test_clip test_clip_example test_clip_inbounds test_clip_outbounds "
             "test_clip_splitbounds test_clip_default_min test_clip_default_max "
             "test_clip_default_inbounds", (11, 10, 9, 7))
    + _pairs("test_top_k test_top_k_negative_axis", (11, 10, 9, 7))
    + _pairs("test_dropout_default test_dropout_default_ratio test_dropout_default_mask "
             "test_dropout_default_mask_ratio", (12, 11, 10, 8))
    + _pairs("test_constantofshape_float_ones test_constantofshape_int_zeros "
             "test_constantofshape_int_shape_zero", (11, 9, 8))
    + _pairs("test_roialign_aligned_false test_roialign_mode_max", (15, 12, 10))
    + _pairs("test_dequantizelinear test_quantizelinear", (12, 10))
    + _pairs("test_equal test_equal_bcast test_greater test_greater_bcast test_less "
             "test_less_bcast", (12, 9, 7))
    + _pairs("test_gru_defaults test_gru_seq_length test_lstm_defaults test_lstm_bidirectional "
             "test_rnn_seq_length", (13, 9, 7))
)


@pytest.mark.parametrize(("name", "target"), BACKEND, ids=[f"{n}-{t}" for n, t in BACKEND])
def test_backend_case_matches_reference(name: str, target: int) -> None:
    model, feeds, want = _case(name)
    _same(_run(_convert(model, target), feeds), want)


LEGACY = _pairs("test_and2d test_and_bcast3v1d test_and_bcast4v3d test_or3d test_or_bcast4v2d "
                "test_xor4d test_xor_bcast3v2d test_equal_bcast test_greater_bcast "
                "test_less test_gru_defaults test_lstm_defaults test_rnn_seq_length "
                "test_clip test_dropout_default", (6,))


@pytest.mark.parametrize(("name", "target"), LEGACY, ids=[f"{n}-{t}" for n, t in LEGACY])
def test_backend_case_below_7_is_checked_and_reported(name: str, target: int) -> None:
    model, _, _ = _case(name)
    out = _convert(model, target)
    for node in out.graph.node:
        if node.op_type in ("And", "Or", "Xor", "Equal", "Greater", "Less"):
            a, b = (next(v for v in (*out.graph.input, *out.graph.value_info) if v.name == x)
                    for x in node.input)
            same = a.type.tensor_type.shape == b.type.tensor_type.shape
            assert any(x.name == "broadcast" for x in node.attribute) != same
        if node.op_type in ("GRU", "LSTM", "RNN") and node.output[0]:
            assert helper.get_attribute_value(
                next(x for x in node.attribute if x.name == "output_sequence")) == 1
    _unrunnable(target)


REFUSED = [
    ("test_slice_neg_steps", 9, "steps [-1, -3, -2] are not all 1, and opset 9's Slice has "
     "no steps"),
    ("test_clip_min_greater_than_max", 10, "min 2.0 is greater than max 1.0, which opset 6's "
     "Clip leaves undefined"),
    ("test_roialign_aligned_true", 15, "coordinate_transformation_mode='half_pixel': opset "
     "15's RoiAlign always maps coordinates as output_half_pixel"),
    ("test_dequantizelinear_axis", 12, "the scale has 3 elements (per-axis quantization), and "
     "opset 12 quantizes per tensor only"),
    ("test_quantizelinear_axis", 12, "the scale has 3 elements (per-axis quantization)"),
    ("test_and_bcast4v4d", 6, "shapes [1, 4, 1, 6] and [3, 1, 5, 6] broadcast numpy-style, and "
     "opset 6 broadcasts only B over A with B's shape a suffix of A's"),
    ("test_xor_bcast4v4d", 6, "broadcast numpy-style"),
]


@pytest.mark.parametrize(("name", "target", "message"), REFUSED,
                         ids=[f"{n}-{t}" for n, t, _ in REFUSED])
def test_backend_case_refused_in_words(name: str, target: int, message: str) -> None:
    model, _, _ = _case(name)
    _refusal(model, target, message)


def test_parameters_computed_at_run_time_are_refused() -> None:
    case = _cases()["test_slice"].model  # type: ignore[attr-defined]
    _refusal(case, 10, "axes 'axes' is not a constant, so whether it counts from the back "
             "(not allowed at opset 10) cannot be told")
    default_axes = _cases()["test_slice_default_axes"].model  # type: ignore[attr-defined]
    _refusal(default_axes, 9, "starts 'starts' is not a constant, and opset 9 takes it only "
             "as an attribute")
    clip = _cases()["test_clip"].model  # type: ignore[attr-defined]
    _refusal(clip, 10, "min 'min' is not a constant, and opset 10 takes it only as an "
             "attribute")


# --------------------------------------------------------------------------- models built here

def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], opset: int,
           initializers: tuple[onnx.TensorProto, ...] | list[onnx.TensorProto] = (),
           check: bool = True) -> onnx.ModelProto:
    """A model of *nodes* at ai.onnx *opset*, checked unless *check* is false
    (the checker wants every input's rank, and some tests need one unknown)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _tensor(name: str, elem: int, shape: list[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _like_original(model: onnx.ModelProto, targets: tuple[int, ...],
                   feeds: list[np.ndarray]) -> list[onnx.ModelProto]:
    """*model* converted to each target, each giving the original's ORT outputs."""
    want = _run(model, feeds)
    done = []
    for target in targets:
        out = _convert(model, target)
        _same(_run(out, feeds), want, rtol=1e-6, atol=1e-7)
        done.append(out)
    return done


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def _gather(indices: np.ndarray | None, axis: int, elem: int = TensorProto.INT64
            ) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    x = _rng().standard_normal((3, 4, 5)).astype(np.float32)
    inits = []
    inputs = [_tensor("x", TensorProto.FLOAT, [3, 4, 5])]
    feeds = [x]
    if indices is None:
        inputs.append(_tensor("i", elem, [2, 3]))
        dim = x.shape[axis]
        feeds.append(np.array([[0, -1, 1], [-dim, dim - 1, -2]],
                              dtype=helper.tensor_dtype_to_np_dtype(elem)))
    else:
        inits.append(numpy_helper.from_array(indices, "i"))
    node = helper.make_node("Gather", ["x", "i"], ["y"], axis=axis)
    taken = np.take(x, (feeds[1] if indices is None else indices) % x.shape[axis], axis=axis)
    return _model([node], inputs, [_tensor("y", TensorProto.FLOAT, list(taken.shape))], 11,
                  inits), feeds


def test_gather_constant_negative_indices_become_a_constant() -> None:
    model, feeds = _gather(np.array([[-1, 0], [2, -3]], dtype=np.int64), axis=-2)
    ten = _like_original(model, (10, 9, 8), feeds)[0]
    gather = next(n for n in ten.graph.node if n.op_type == "Gather")
    assert helper.get_attribute_value(gather.attribute[0]) == 1
    assert _ops(ten) == ["Constant", "Gather"]


def test_gather_constant_non_negative_indices_cross_unchanged() -> None:
    model, feeds = _gather(np.array([2, 0, 1], dtype=np.int64), axis=0)
    (ten,) = _like_original(model, (10,), feeds)
    assert _ops(ten) == ["Gather"] and ten.graph.node[0] == model.graph.node[0]


@pytest.mark.parametrize("elem", [TensorProto.INT64, TensorProto.INT32])
@pytest.mark.parametrize("axis", [0, 2, -1])
def test_gather_run_time_indices_counted_from_the_back(elem: int, axis: int) -> None:
    model, feeds = _gather(None, axis=axis, elem=elem)
    ten = _like_original(model, (10, 9, 7), feeds)[0]
    assert "Shape" in _ops(ten) and _ops(ten)[-1] == "Gather"
    assert "Where" not in _ops(ten)  # valid below 9, where Where does not exist yet


def test_gather_run_time_scalar_index_stays_scalar() -> None:
    node = helper.make_node("Gather", ["x", "i"], ["y"], axis=1)
    model = _model([node], [_tensor("x", TensorProto.FLOAT, [3, 4, 5]),
                            _tensor("i", TensorProto.INT64, [])],
                   [_tensor("y", TensorProto.FLOAT, [3, 5])], 11)
    x = _rng().standard_normal((3, 4, 5)).astype(np.float32)
    ten = _like_original(model, (10, 9), [x, np.array(-1, np.int64)])[0]
    np.testing.assert_array_equal(_run(ten, [x, np.array(-1, np.int64)])[0], x[:, -1])


def test_gather_constant_indices_out_of_range_refused() -> None:
    model, _ = _gather(np.array([-4], dtype=np.int64), axis=0)
    _refusal(model, 10, "constant indices are out of range for an axis of length 3")


def test_slice_negative_constant_axes() -> None:
    x = _rng().standard_normal((4, 5, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
             (("starts", [1, -4]), ("ends", [-1, 1000]), ("axes", [-1, -3]))]
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])
    model = _model([node], [_tensor("x", TensorProto.FLOAT, [4, 5, 6])],
                   [_tensor("y", TensorProto.FLOAT, [4, 5, 4])], 11, inits)
    nine = _like_original(model, (10, 9, 7), [x])[1]
    assert helper.get_attribute_value(
        next(a for a in nine.graph.node[-1].attribute if a.name == "axes")) == [2, 0]


def test_negative_axes_of_unknown_rank_refused() -> None:
    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
             (("starts", [1]), ("ends", [3]), ("axes", [-1]))]
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])
    model = _model([node], [_tensor("x", TensorProto.FLOAT, None)],
                   [_tensor("y", TensorProto.FLOAT, None)], 11, inits, check=False)
    _refusal(model, 10, "axes [-1] counts from the back, and the rank it counts in is unknown")
    squeeze = helper.make_node("Squeeze", ["x"], ["y"], axes=[-1])
    model = _model([squeeze], [_tensor("x", TensorProto.FLOAT, None)],
                   [_tensor("y", TensorProto.FLOAT, None)], 11, check=False)
    _refusal(model, 10, "axes [-1] counts from the back")


def test_squeeze_unsqueeze_negative_axes_at_11() -> None:
    x = _rng().standard_normal((3, 1, 4)).astype(np.float32)
    nodes = [helper.make_node("Squeeze", ["x"], ["s"], axes=[-2]),
             helper.make_node("Unsqueeze", ["s"], ["y"], axes=[-1, 0])]
    model = _model(nodes, [_tensor("x", TensorProto.FLOAT, [3, 1, 4])],
                   [_tensor("y", TensorProto.FLOAT, [1, 3, 4, 1])], 11)
    ten = _like_original(model, (10, 7), [x])[0]
    axes = [helper.get_attribute_value(n.attribute[0]) for n in ten.graph.node]
    assert axes == [[1], [3, 0]]  # Unsqueeze counts in the output's rank, 4


def _scan(opset: int) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """A running sum over axis -1 of a [2, 3] input, the partial sums stacked on axis -1."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body",
        [_tensor("s_in", TensorProto.FLOAT, [2]), _tensor("x_t", TensorProto.FLOAT, [2])],
        [_tensor("s_out", TensorProto.FLOAT, [2]), _tensor("y_t", TensorProto.FLOAT, [2])])
    node = helper.make_node("Scan", ["s0", "x"], ["s", "y"], body=body, num_scan_inputs=1,
                            scan_input_axes=[-1], scan_output_axes=[-1])
    model = _model([node], [_tensor("s0", TensorProto.FLOAT, [2]),
                            _tensor("x", TensorProto.FLOAT, [2, 3])],
                   [_tensor("s", TensorProto.FLOAT, [2]), _tensor("y", TensorProto.FLOAT, [2, 3])],
                   opset)
    x = _rng().standard_normal((2, 3)).astype(np.float32)
    return model, [np.zeros(2, np.float32), x]


def test_scan_negative_axes() -> None:
    model, feeds = _scan(11)
    nine = _like_original(model, (10, 9), feeds)[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in nine.graph.node[0].attribute}
    assert attrs["scan_input_axes"] == [1] and attrs["scan_output_axes"] == [1]
    np.testing.assert_allclose(_run(nine, feeds)[1], np.cumsum(feeds[1], axis=1), rtol=1e-6)


def _onehot(indices: np.ndarray | None, axis: int, elem: int = TensorProto.INT64
            ) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """OneHot at 11 over depth 3 with float values; run-time indices when *indices* is None.

    Depth is int64 for int64 indices and float otherwise: the pairs ORT has kernels for.
    """
    depth = numpy_helper.from_array(
        np.array(3, dtype=np.int64 if elem == TensorProto.INT64 else np.float32), "depth")
    inits = [depth]
    inputs = [_tensor("values", TensorProto.FLOAT, [2])]
    feeds = [np.array([0.5, 2.0], np.float32)]
    given = indices
    if given is None:
        given = np.array([[0, -1, 2], [-3, -4, 3]], dtype=helper.tensor_dtype_to_np_dtype(elem))
        inputs.insert(0, _tensor("i", elem, [2, 3]))
        feeds.insert(0, given)
    else:
        inits.append(numpy_helper.from_array(given, "i"))
    shape = list(given.shape)
    shape.insert(axis % (len(shape) + 1), 3)
    node = helper.make_node("OneHot", ["i", "depth", "values"], ["y"], axis=axis)
    return _model([node], inputs, [_tensor("y", TensorProto.FLOAT, shape)], 11, inits), feeds


def test_onehot_constant_non_negative_indices() -> None:
    model, feeds = _onehot(np.array([[0, 2], [1, 5]], dtype=np.int64), axis=-2)
    ten = _like_original(model, (10, 9), feeds)[0]
    assert _ops(ten) == ["OneHot"]
    assert helper.get_attribute_value(ten.graph.node[0].attribute[0]) == 1


@pytest.mark.parametrize("elem", [TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT])
def test_onehot_negative_indices_counted_from_the_front(elem: int) -> None:
    model, feeds = _onehot(None, axis=1, elem=elem)
    ten = _like_original(model, (10, 9), feeds)[0]
    # ONNX Runtime reads negative indices from the back at 10 as well, so the
    # numbers alone cannot tell whether the rewrite is there: look for it
    onehot = ten.graph.node[-1]
    assert onehot.op_type == "OneHot" and onehot.input[0] != "i"
    want = np.zeros((2, 3, 3), np.float32) + 0.5
    for r, row in enumerate(feeds[0].astype(np.int64)):
        for c, i in enumerate(row):
            if -3 <= i < 3:
                want[r, i % 3, c] = 2.0
    np.testing.assert_array_equal(_run(ten, feeds)[0], want)
    constant, feeds = _onehot(np.array([[0, -1], [-3, -4]], dtype=np.int64), axis=0)
    assert _ops(_like_original(constant, (10,), feeds)[0])[-1] == "OneHot"


def test_onehot_indices_of_unknown_type_refused() -> None:
    node = helper.make_node("OneHot", ["i", "depth", "values"], ["y"])
    model = _model([node], [helper.make_empty_tensor_value_info("i"),
                            _tensor("depth", TensorProto.INT64, []),
                            _tensor("values", TensorProto.FLOAT, [2])],
                   [_tensor("y", TensorProto.FLOAT, None)], 11, check=False)
    _refusal(model, 10, "the element type of indices 'i' is unknown, so negative ones (all "
             "off values below opset 11) cannot be counted from the back")


def test_gather_negative_axis_of_unknown_rank_refused() -> None:
    node = helper.make_node("Gather", ["x", "i"], ["y"], axis=-1)
    model = _model([node], [_tensor("x", TensorProto.FLOAT, None),
                            _tensor("i", TensorProto.INT64, [2])],
                   [_tensor("y", TensorProto.FLOAT, None)], 11, check=False)
    _refusal(model, 10, "axis -1 counts from the back of an input of unknown rank")


def test_clip_bounds_and_topk_k_computed_at_run_time_refused() -> None:
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"])
    model = _model([node], [_tensor("x", TensorProto.FLOAT, [3, 4]),
                            _tensor("k", TensorProto.INT64, [1])],
                   [_tensor("v", TensorProto.FLOAT, [3, "k"]),
                    _tensor("i", TensorProto.INT64, [3, "k"])], 10)
    _refusal(model, 9, "K 'k' is not a constant, and opset 9 takes it only as an attribute")


def _dropout(training: bool | None, ratio: str = "const") -> onnx.ModelProto:
    inits = []
    inputs = [_tensor("x", TensorProto.FLOAT, [2, 3])]
    names = ["x", "ratio"]
    if ratio == "const":
        inits.append(numpy_helper.from_array(np.array(0.25, np.float32), "ratio"))
    else:
        inputs.append(_tensor("ratio", TensorProto.FLOAT, []))
    if training is not None:
        inits.append(numpy_helper.from_array(np.array(training), "training"))
        names.append("training")
    node = helper.make_node("Dropout", names, ["y", "mask"], seed=3)
    return _model([node], inputs, [_tensor("y", TensorProto.FLOAT, [2, 3]),
                                   _tensor("mask", TensorProto.BOOL, [2, 3])], 12, inits)


def test_dropout_inference_mask_made_apart() -> None:
    model = _dropout(False)
    x = _rng().standard_normal((2, 3)).astype(np.float32)
    eleven = _like_original(model, (11, 8), [x])[0]
    dropout = next(n for n in eleven.graph.node if n.op_type == "Dropout")
    assert list(dropout.output) == ["y"] and list(dropout.input) == ["x"]
    attrs = {a.name: helper.get_attribute_value(a) for a in dropout.attribute}
    assert attrs == {"ratio": 0.25}
    y, mask = _run(eleven, [x])
    assert mask.dtype == np.bool_ and mask.all() and np.array_equal(y, x)


def test_dropout_training_or_run_time_ratio_refused() -> None:
    _refusal(_dropout(True), 11, "training_mode is not false: opset 11's Dropout has no "
             "training input")
    _refusal(_dropout(None, ratio="input"), 11, "ratio 'ratio' is not a constant")


def _resize(scales: list[float], mode: str) -> onnx.ModelProto:
    node = helper.make_node("Resize", ["x", "scales"], ["y"], mode=mode)
    return _model([node], [_tensor("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                  [_tensor("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], 10,
                  [numpy_helper.from_array(np.array(scales, np.float32), "scales")])


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_10_as_upsample(mode: str) -> None:
    model = _resize([1.0, 1.0, 2.0, 1.5], mode)
    x = _rng().standard_normal((1, 2, 3, 4)).astype(np.float32)
    nine = _like_original(model, (9, 8), [x])[0]
    assert _ops(nine) == ["Upsample"]
    with pytest.raises(StepError, match=r"scales .* sample down, and opset 9's Upsample takes "
                       r"scales >= 1 only"):
        convert_down(_resize([1.0, 1.0, 0.5, 1.0], mode), 9)


def _constant_of_shape(value: onnx.TensorProto | None) -> onnx.ModelProto:
    attrs = {} if value is None else {"value": value}
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"], **attrs)
    elem = TensorProto.FLOAT if value is None else value.data_type
    return _model([node], [_tensor("shape", TensorProto.INT64, [2])],
                  [_tensor("y", elem, ["a", "b"])], 9)


@pytest.mark.parametrize("value", [
    None,
    helper.make_tensor("value", TensorProto.BOOL, [1], [True]),
    helper.make_tensor("value", TensorProto.INT64, [1], [-(2 ** 40)]),
    helper.make_tensor("value", TensorProto.INT32, [1], [7]),
    helper.make_tensor("value", TensorProto.FLOAT16, [1], [np.float16(1.5)]),
], ids=["default", "bool", "int64", "int32", "float16"])
def test_constant_of_shape_as_expand(value: onnx.TensorProto | None) -> None:
    model = _constant_of_shape(value)
    (eight,) = _like_original(model, (8,), [np.array([2, 3], np.int64)])
    assert _ops(eight)[-1] == "Expand"
    for node in eight.graph.node:
        if node.op_type == "Constant":
            assert node.attribute[0].t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE,
                                                     TensorProto.FLOAT16)


def test_constant_of_shape_value_no_double_holds_refused() -> None:
    big = helper.make_tensor("value", TensorProto.INT64, [1], [2 ** 60 + 1])
    _refusal(_constant_of_shape(big), 8, f"value {2 ** 60 + 1} is not exactly a double")


def _quantize(scale_shape: list[int], constant: bool) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    x = _rng().standard_normal((2, 3)).astype(np.float32)
    scale = np.full(scale_shape, 0.05, np.float32)
    zero = np.full(scale_shape, 3, np.uint8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], axis=0),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], axis=0)]
    inputs = [_tensor("x", TensorProto.FLOAT, [2, 3])]
    feeds = [x]
    inits = []
    if constant:
        inits = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero, "zero")]
    else:
        inputs += [_tensor("scale", TensorProto.FLOAT, scale_shape),
                   _tensor("zero", TensorProto.UINT8, scale_shape)]
        feeds += [scale, zero]
    model = _model(nodes, inputs, [_tensor("q", TensorProto.UINT8, [2, 3]),
                                   _tensor("y", TensorProto.FLOAT, [2, 3])], 13, inits)
    return model, feeds


@pytest.mark.parametrize("constant", [True, False], ids=["constant", "input"])
@pytest.mark.parametrize("shape", [[], [1]], ids=["scalar", "one-element"])
def test_quantize_per_tensor(shape: list[int], constant: bool) -> None:
    model, feeds = _quantize(shape, constant)
    twelve = _like_original(model, (12, 10), feeds)[0]
    for node in twelve.graph.node:
        assert not any(a.name == "axis" for a in node.attribute)
    if shape and not constant:
        assert _ops(twelve).count("Reshape") == 4


def test_quantize_shape_unknown_refused() -> None:
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["y"])]
    model = _model(nodes, [_tensor("q", TensorProto.UINT8, [2, 3]),
                           _tensor("scale", TensorProto.FLOAT, None)],
                   [_tensor("y", TensorProto.FLOAT, None)], 13, check=False)
    _refusal(model, 12, "the shape of the scale 'scale' is unknown")


def _compare(op: str, a: list[int | str] | None, b: list[int | str] | None,
             y: list[int | str] | None) -> onnx.ModelProto:
    elem = TensorProto.BOOL if op in ("And", "Or", "Xor") else TensorProto.FLOAT
    node = helper.make_node(op, ["a", "b"], ["y"])
    return _model([node], [_tensor("a", elem, a), _tensor("b", elem, b)],
                  [_tensor("y", TensorProto.BOOL, y)], 7, check=y is not None)


def test_legacy_broadcast() -> None:
    same = convert_down(_compare("Less", [2, "n"], [2, "n"], [2, "n"]), 6)
    assert list(same.graph.node[0].attribute) == []
    suffix = convert_down(_compare("Greater", [2, 3, 4], [4], [2, 3, 4]), 6)
    assert (suffix.graph.node[0].op_type, list(suffix.graph.node[0].input)) == ("Greater",
                                                                               ["a", "b"])
    assert helper.get_attribute_value(suffix.graph.node[0].attribute[0]) == 1
    swapped = convert_down(_compare("Greater", [], [2, 3], [2, 3]), 6)
    assert (swapped.graph.node[0].op_type, list(swapped.graph.node[0].input)) == ("Less",
                                                                                 ["b", "a"])
    for model in (same, suffix, swapped):
        onnx.checker.check_model(model, full_check=True)
    _refusal(_compare("And", [2, 3], None, None), 6, "an input's shape is unknown, and opset 6 "
             "broadcasts only B over A")
    _refusal(_compare("Or", [2, 1], [1, 3], [2, 3]), 6, "shapes [2, 1] and [1, 3] broadcast "
             "numpy-style")


def test_rnn_without_y_unchanged_below_7() -> None:
    case = _cases()["test_rnn_seq_length"].model  # type: ignore[attr-defined]
    model = onnx.ModelProto()
    model.CopyFrom(case)
    node = model.graph.node[0]
    node.output[:] = ["", "Y_h"]
    del model.graph.output[:]
    model.graph.output.append(_tensor("Y_h", TensorProto.FLOAT, ["d", "b", "h"]))
    out = _convert(model, 6)
    assert not any(a.name == "output_sequence" for a in out.graph.node[0].attribute)


# --------------------------------------------------------------------------- end to end

def test_convert_end_to_end_on_files(tmp_path: Path) -> None:
    model, feeds = _gather(None, axis=1)
    cases = [("gather", model, feeds, 9),
             ("slice", *_case("test_slice_negative_axes")[:2], 7),
             ("constantofshape", *_case("test_constantofshape_int_zeros")[:2], 8)]
    for name, m, f, target in cases:
        src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}-{target}.onnx"
        onnx.save(m, src)
        streamconv.convert(src, dst, opset=target)
        out = onnx.load(dst)
        onnx.checker.check_model(out, full_check=True)
        assert out.opset_import[0].version == target
        _same(_run(out, f), _run(m, f))
