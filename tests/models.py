"""Small models built in code for the unit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG_SEED = 1234


def rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(RNG_SEED + seed).standard_normal(shape).astype(np.float32)


def reduce_chain(opset: int = 11, n: int = 16, as_float_data: bool = False) -> onnx.ModelProto:
    """X + W (+ Constant C) -> ReduceSum/Squeeze/Unsqueeze with axes as attributes (opset < 13)."""
    w = numpy_helper.from_array(rand((n, n)), "W")
    if as_float_data:
        w = helper.make_tensor("W", TensorProto.FLOAT, [n, n], rand((n, n)).ravel().tolist())
    c = numpy_helper.from_array(rand((n, n), 1), "c_value")
    if opset >= 13:
        axes = [numpy_helper.from_array(np.array([0], np.int64), f"axes{i}") for i in range(3)]
        reduce_ = helper.make_node("ReduceSum", ["B", "axes0"], ["R"], keepdims=1)
        squeeze = helper.make_node("Squeeze", ["R", "axes1"], ["S"])
        unsqueeze = helper.make_node("Unsqueeze", ["S", "axes2"], ["U"])
        inits = [w, *axes]
    else:
        reduce_ = helper.make_node("ReduceSum", ["B"], ["R"], axes=[0], keepdims=1)
        squeeze = helper.make_node("Squeeze", ["R"], ["S"], axes=[0])
        unsqueeze = helper.make_node("Unsqueeze", ["S"], ["U"], axes=[0])
        inits = [w]
    nodes = [
        helper.make_node("Constant", [], ["C"], value=c),
        helper.make_node("Add", ["X", "W"], ["A"]),
        helper.make_node("Add", ["A", "C"], ["B"]),
        reduce_, squeeze, unsqueeze,
    ]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("U", TensorProto.FLOAT, [1, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 13 else 8
    return model


def if_loop_model(n: int = 16) -> onnx.ModelProto:
    """An If whose branches hold big initializers and Constants, and a Loop with a big body."""
    def branch(name: str, seed: int) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"{name}_c"],
                                 value=numpy_helper.from_array(rand((n, n), seed), f"{name}_cv")),
                helper.make_node("Add", ["X", f"{name}_w"], [f"{name}_a"]),
                helper.make_node("Add", [f"{name}_a", f"{name}_c"], [f"{name}_out"]),
            ],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [n, n])],
            initializer=[numpy_helper.from_array(rand((n, n), seed + 1), f"{name}_w")],
        )

    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "loop_w"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [n, n]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [n, n]),
        ],
        initializer=[numpy_helper.from_array(rand((n, n), 9), "loop_w")],
    )
    nodes = [
        helper.make_node("If", ["flag"], ["Y"], then_branch=branch("then", 2),
                         else_branch=branch("else", 4)),
        helper.make_node("Loop", ["trips", "", "Y"], ["Z"], body=body),
    ]
    graph = helper.make_graph(
        nodes, "control",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, n]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model


def typed_model(n: int = 600) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Initializers in every typed field onnx defines, each cast to float and summed."""
    rng = np.random.default_rng(RNG_SEED)
    arrays = {
        "f32": rng.standard_normal(n).astype(np.float32),
        "f64": rng.standard_normal(n),
        "i64": rng.integers(-2**40, 2**40, n, dtype=np.int64),
        "i32": rng.integers(-2**31, 2**31 - 1, n, dtype=np.int32),
        "i16": rng.integers(-2**15, 2**15 - 1, n, dtype=np.int16),
        "i8": rng.integers(-128, 127, n, dtype=np.int8),
        "u8": rng.integers(0, 255, n, dtype=np.uint8),
        "u16": rng.integers(0, 2**16 - 1, n, dtype=np.uint16),
        "bool": rng.integers(0, 2, n).astype(bool),
        "f16": rng.standard_normal(n).astype(np.float16),
        "u32": rng.integers(0, 2**32 - 1, n, dtype=np.uint32),
        "u64": rng.integers(0, 2**63, n, dtype=np.uint64),
    }
    inits = []
    nodes = []
    for name, array in arrays.items():
        dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
        t = helper.make_tensor(name, dtype, [n], array.tolist())
        assert not t.raw_data
        np.testing.assert_array_equal(numpy_helper.to_array(t), array)
        inits.append(t)
        nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.DOUBLE))
    nodes.append(helper.make_node("Sum", [f"{name}_f" for name in arrays], ["Y"]))
    graph = helper.make_graph(
        nodes, "typed", [], [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, [n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model, arrays


def save(model: onnx.ModelProto, path: object) -> str:
    onnx.save(model, str(path))
    return str(path)
