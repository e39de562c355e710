"""Exporter-style models at opset 18 and 20, downgraded to 17, 13 and 11.

The models are built the way PyTorch's exporter writes a transformer block and
a recurrent encoder: LayerNormalization, Gelu (opset 20) or its Erf form,
Pad with an axes input, Split with num_outputs, a batch-first GRU and LSTM,
Shape with start/end feeding a Reshape.  Each conversion (through the file
API, as a user runs it) must pass onnx's full checker and give the original
model's outputs on seeded inputs: the converted model runs in ONNX Runtime,
the original too where ONNX Runtime can run it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from streamconv import convert
from tests.models import save

RNG = np.random.default_rng(7)
B, T, D, H = 2, 5, 8, 6


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def transformer_block(opset: int) -> onnx.ModelProto:
    """x[B, T, D] -> LayerNorm -> MatMul -> Gelu -> Split(num_outputs) -> Add -> Pad(axes)
    -> Shape(start, end) driven Reshape."""
    gelu = ([helper.make_node("Gelu", ["h"], ["g"], name="mlp/gelu")] if opset >= 20 else [
        helper.make_node("Div", ["h", "sqrt2"], ["h_s"]),
        helper.make_node("Erf", ["h_s"], ["h_e"]),
        helper.make_node("Add", ["h_e", "one"], ["h_p"]),
        helper.make_node("Mul", ["h", "h_p"], ["h_m"]),
        helper.make_node("Mul", ["h_m", "half"], ["g"]),
    ])
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_w", "ln_b"], ["n"], name="attn/ln_1",
                         axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n", "w1"], ["h"], name="mlp/fc"),
        *gelu,
        helper.make_node("Split", ["g"], ["g0", "g1"], name="mlp/split", axis=-1,
                         num_outputs=2),
        helper.make_node("Add", ["g0", "g1"], ["s"], name="mlp/merge"),
        helper.make_node("Pad", ["s", "pads", "pad_value", "pad_axes"], ["p"], name="pad",
                         mode="constant"),
        helper.make_node("Shape", ["p"], ["bt"], name="shape_bt", start=0, end=2),
        helper.make_node("Concat", ["bt", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["p", "new_shape"], ["y"], name="reshape"),
        helper.make_node("Softmax", ["y"], ["z"], name="softmax_time", axis=1),
    ]
    inits = [
        _init("ln_w", D), _init("ln_b", D), _init("w1", D, 2 * H),
        numpy_helper.from_array(np.array(2 ** 0.5, dtype=np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        _ints("pads", [1, 2]), _ints("pad_axes", [-1]),
        numpy_helper.from_array(np.array(0.25, dtype=np.float32), "pad_value"),
        _ints("minus_one", [-1]),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, D])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [B, T, H + 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="pytorch")
    model.ir_version = 8
    return model


def recurrent_encoder(opset: int = 18) -> onnx.ModelProto:
    """Batch-first (layout=1) GRU followed by a batch-first LSTM, as exporters write them."""
    nodes = [
        helper.make_node("GRU", ["x", "gw", "gr", "gb"], ["gy", "gh"], name="enc/gru",
                         hidden_size=H, layout=1, linear_before_reset=1),
        helper.make_node("Squeeze", ["gy", "axis_dir"], ["gs"]),
        helper.make_node("LSTM", ["gs", "lw", "lr", "lb"], ["ly", "lh", "lc"], name="enc/lstm",
                         hidden_size=H, layout=1),
        helper.make_node("Squeeze", ["lh", "axis_one"], ["hidden"]),
    ]
    inits = [_init("gw", 1, 3 * H, D), _init("gr", 1, 3 * H, H), _init("gb", 1, 6 * H),
             _init("lw", 1, 4 * H, H), _init("lr", 1, 4 * H, H), _init("lb", 1, 8 * H),
             _ints("axis_dir", [2]), _ints("axis_one", [1])]
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, D])],
        [helper.make_tensor_value_info("ly", TensorProto.FLOAT, [B, T, 1, H]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [B, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="pytorch")
    model.ir_version = 8
    return model


def _run(path: Path | str, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})  # type: ignore[no-any-return]


def _reference(path: Path | str, x: np.ndarray) -> list[np.ndarray]:
    """The original's outputs: ONNX Runtime, or onnx's reference evaluator where ONNX
    Runtime cannot run the original (its CPU GRU/LSTM refuse layout=1)."""
    try:
        return _run(path, x)
    except ort.capi.onnxruntime_pybind11_state.Fail as e:
        if "layout" not in str(e):
            raise
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(None, {"x": x})  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "build"), [
    ("block18", lambda: transformer_block(18)),
    ("block20", lambda: transformer_block(20)),
    ("encoder18", recurrent_encoder),
])
@pytest.mark.parametrize("target", [17, 13, 11])
def test_downgrade_keeps_outputs(tmp_path: Path, name: str, build: object,
                                 target: int) -> None:
    model = build()  # type: ignore[operator]
    onnx.checker.check_model(model, full_check=True)
    src = save(model, tmp_path / f"{name}.onnx")
    dst = tmp_path / f"{name}-{target}.onnx"
    report = convert(src, dst, opset=target)
    assert report.opset_to == target
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert [o.version for o in out.opset_import if o.domain == ""] == [target]
    ops = {n.op_type for n in out.graph.node}
    assert not ops & {"LayerNormalization", "Gelu"} or target >= 17
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)
        # at 14 and above a batch-first GRU stays batch-first, which ONNX Runtime's CPU
        # kernels refuse; below, the converted model must run in ONNX Runtime itself
        actual = _run(dst, x) if target < 14 else _reference(dst, x)
        for a, b in zip(_reference(src, x), actual, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
