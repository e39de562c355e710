"""Models the benchmark converts: tiny, weight-heavy and graph-heavy, all inline, opset 11.

Weight-heavy models come from :func:`fixtures.bigmodel.write_big_model`: a few
float32 weights (one stored as packed ``float_data``) and a handful of nodes.

Graph-heavy models have tens of thousands of small nodes whose conversion from
opset 11 to 18 does real work, plus a few large weights::

    repeated block (5 nodes):
        u = Unsqueeze(h, axes=[0])           # axes attribute -> input at opset 13
        s = Squeeze(u, axes=[0])             # axes attribute -> input at opset 13
        r = Relu(s)
        m = ReduceMean(r, axes=[1])          # axes attribute -> input at opset 18
        h = Add(r, m)
    big branch:  B = Add(...Add(XB, W0)..., W(n-1))

The small nodes are built with onnx's helpers (they are small); the large
weights are streamed into the file by :mod:`fixtures.wirewriter`, so nothing
of their size is ever held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from fixtures import onnx_fields as F
from fixtures.bigmodel import write_big_model
from fixtures.wirewriter import (
    ByteSink,
    LenField,
    Part,
    Payload,
    encode_repeated_varints_field,
    encode_string_field,
    encode_varint_field,
    write_message_file,
)

__all__ = [
    "BLOCK_NODES",
    "SOURCE_OPSET",
    "ModelFile",
    "write_graph_heavy_model",
    "write_tiny_model",
    "write_weight_heavy_model",
]

SOURCE_OPSET = 11
BLOCK_NODES = 5
GB = 10**9
MIB = 1 << 20
_WIDTH = 8  # the small chain works on [1, 8] float tensors
_FILL_ELEMS = MIB  # 4 MiB of float32 per write while streaming a weight
_N_WEIGHTS = 4  # weights in a weight-heavy model


@dataclass(frozen=True)
class ModelFile:
    """A model the benchmark wrote: where, how big, how many nodes."""

    path: Path
    file_size: int
    nodes: int


def write_weight_heavy_model(path: Path, size_gb: float) -> ModelFile:
    """Write an inline opset-11 model of about *size_gb* GB (10**9 bytes) of weights.

    Raises ValueError if *size_gb* is not positive.
    """
    if size_gb <= 0:
        raise ValueError(f"size must be > 0 GB, got {size_gb}")
    tensor_mib = size_gb * GB / _N_WEIGHTS / MIB
    info = write_big_model(path, n_tensors=_N_WEIGHTS, tensor_mib=tensor_mib, opset=SOURCE_OPSET)
    # Weight adds, ReduceSum, Unsqueeze, Squeeze, Constant, Mul.
    return ModelFile(Path(path), info.file_size, _N_WEIGHTS + 5)


def write_tiny_model(path: Path) -> ModelFile:
    """Write an opset-11 model of one Relu node: what it costs to convert is start-up."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"], name="relu")],
        "tiny",
        inputs=[helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, _WIDTH])],
        outputs=[helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, _WIDTH])],
    )
    model = helper.make_model(
        graph, producer_name="streamconv-bench",
        opset_imports=[helper.make_opsetid("", SOURCE_OPSET)],
    )
    model.ir_version = F.IR_VERSION_FOR_OPSET[SOURCE_OPSET]
    onnx.save(model, str(path))
    return ModelFile(Path(path), Path(path).stat().st_size, 1)


def _small_graph(n_nodes: int, n_weights: int, weight_elems: int) -> onnx.GraphProto:
    """The graph without its large initializers: *n_nodes* nodes in all."""
    nodes: list[onnx.NodeProto] = []
    previous = "XB"
    for i in range(n_weights):
        nodes.append(helper.make_node("Add", [previous, f"W{i}"], [f"B{i}"], name=f"big_add_{i}"))
        previous = f"B{i}"
    h = "X"
    blocks = (n_nodes - n_weights) // BLOCK_NODES
    for b in range(blocks):
        nodes += [
            helper.make_node("Unsqueeze", [h], [f"u{b}"], name=f"unsqueeze_{b}", axes=[0]),
            helper.make_node("Squeeze", [f"u{b}"], [f"s{b}"], name=f"squeeze_{b}", axes=[0]),
            helper.make_node("Relu", [f"s{b}"], [f"r{b}"], name=f"relu_{b}"),
            helper.make_node(
                "ReduceMean", [f"r{b}"], [f"m{b}"], name=f"mean_{b}", axes=[1], keepdims=1
            ),
            helper.make_node("Add", [f"r{b}", f"m{b}"], [f"h{b}"], name=f"add_{b}"),
        ]
        h = f"h{b}"
    for i in range(n_nodes - len(nodes)):
        nodes.append(helper.make_node("Relu", [h], [f"t{i}"], name=f"relu_tail_{i}"))
        h = f"t{i}"
    return helper.make_graph(
        nodes,
        "graph_heavy",
        inputs=[
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, _WIDTH]),
            helper.make_tensor_value_info("XB", TensorProto.FLOAT, [weight_elems]),
        ],
        outputs=[
            helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, _WIDTH]),
            helper.make_tensor_value_info(previous, TensorProto.FLOAT, [weight_elems]),
        ],
    )


def _weight_payload(nbytes: int, seed: int) -> Payload:
    block = np.random.default_rng(seed).random(_FILL_ELEMS, dtype=np.float32).tobytes()

    def write(sink: ByteSink) -> None:
        left = nbytes
        while left:
            n = min(left, len(block))
            sink.write(block[:n])
            left -= n

    return Payload(nbytes, write, label=f"weight {seed}")


def _initializer(name: str, elems: int, seed: int) -> LenField:
    return LenField(
        F.GRAPH_INITIALIZER,
        [
            encode_repeated_varints_field(F.TENSOR_DIMS, [elems]),
            encode_varint_field(F.TENSOR_DATA_TYPE, F.DTYPE_FLOAT),
            encode_string_field(F.TENSOR_NAME, name),
            LenField(F.TENSOR_RAW_DATA, [_weight_payload(elems * 4, seed)]),
        ],
    )


def write_graph_heavy_model(
    path: Path, n_nodes: int, *, n_weights: int = 2, weight_mib: int = 64
) -> ModelFile:
    """Write an inline opset-11 model with *n_nodes* small nodes and a few large weights.

    Raises ValueError if *n_nodes* is smaller than one block plus the weight adds.
    """
    if n_nodes < n_weights + BLOCK_NODES:
        raise ValueError(f"n_nodes must be >= {n_weights + BLOCK_NODES}, got {n_nodes}")
    elems = weight_mib * MIB // 4
    graph_bytes = _small_graph(n_nodes, n_weights, elems).SerializeToString()
    # A message's fields may come in any order and repeated fields accumulate,
    # so the large initializers can follow the serialized small graph.
    graph = LenField(
        F.MODEL_GRAPH,
        [graph_bytes, *(_initializer(f"W{i}", elems, seed=i) for i in range(n_weights))],
    )
    model: list[Part] = [
        encode_varint_field(F.MODEL_IR_VERSION, F.IR_VERSION_FOR_OPSET[SOURCE_OPSET]),
        encode_string_field(F.MODEL_PRODUCER_NAME, "streamconv-bench"),
        graph,
        LenField(
            F.MODEL_OPSET_IMPORT,
            [
                encode_string_field(F.OPSET_DOMAIN, ""),
                encode_varint_field(F.OPSET_VERSION, SOURCE_OPSET),
            ],
        ),
    ]
    size = write_message_file(path, model)
    return ModelFile(Path(path), size, n_nodes)
