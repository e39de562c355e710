"""Scanner and splicer with no conversion: the input comes back byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from streamconv import roundtrip
from streamconv.errors import LimitError, WireFormatError
from streamconv.scan import Hooks, rewrite_message
from streamconv.wire import encode_len_header, encode_tag, encode_varint
from tests.models import if_loop_model, reduce_chain, typed_model

MODELS = {
    "chain": lambda: reduce_chain(),
    "chain_float_data": lambda: reduce_chain(as_float_data=True),
    "if_loop": if_loop_model,
    "typed": lambda: typed_model()[0],
}


@pytest.mark.parametrize("threshold", [0, 64, 1024, 1 << 30])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_byte_exact(tmp_path: Path, name: str, threshold: int) -> None:
    data = MODELS[name]().SerializeToString()
    src = tmp_path / "in.onnx"
    src.write_bytes(data)
    written = roundtrip(src, tmp_path / "out.onnx", size_threshold=threshold)
    assert (tmp_path / "out.onnx").read_bytes() == data
    assert written == len(data)


def test_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    model = reduce_chain()
    model.graph.initializer[0].MergeFromString(encode_len_header(777, 3) + b"xyz")
    data = model.SerializeToString() + encode_tag(999, 0) + encode_varint(5)
    src = tmp_path / "in.onnx"
    src.write_bytes(data)
    roundtrip(src, tmp_path / "out.onnx", size_threshold=0)
    assert (tmp_path / "out.onnx").read_bytes() == data


_dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.int8, np.uint8,
                           np.float16, np.bool_])


@st.composite
def tensors(draw: st.DrawFn, index: int) -> TensorProto:
    dtype = draw(_dtypes)
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    array = np.arange(int(np.prod(shape)), dtype=np.int64).astype(dtype).reshape(shape)
    name = f"t{index}"
    if draw(st.booleans()):
        return numpy_helper.from_array(array, name)
    data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    return helper.make_tensor(name, data_type, list(shape), array.ravel().tolist())


@st.composite
def models(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 5))
    inits = [draw(tensors(i)) for i in range(n)]
    nodes = [helper.make_node("Identity", [t.name], [f"o{i}"]) for i, t in enumerate(inits)]
    constant = draw(tensors(99))
    nodes.append(helper.make_node("Constant", [], ["k"], value=constant))
    outputs = [helper.make_tensor_value_info(f"o{i}", t.data_type, None)
               for i, t in enumerate(inits)]
    graph = helper.make_graph(nodes, "g", [], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model.SerializeToString()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=models(), threshold=st.sampled_from([0, 8, 100]))
def test_round_trip_property(tmp_path: Path, data: bytes, threshold: int) -> None:
    src = tmp_path / "in.onnx"
    dst = tmp_path / "out.onnx"
    src.write_bytes(data)
    roundtrip(src, dst, size_threshold=threshold)
    assert dst.read_bytes() == data


def _never(buf: object, start: int, end: int, path: object) -> None:
    return None


def test_graph_with_wrong_wire_type_names_path() -> None:
    data = encode_tag(7, 0) + encode_varint(1)
    hooks = Hooks(enter=lambda b, s, e: True, tensor=_never)
    with pytest.raises(WireFormatError, match="expected a length-delimited message") as info:
        rewrite_message(data, 0, len(data), "model", (), hooks)
    assert info.value.path == "graph"
    assert info.value.offset == 0


def test_nested_error_names_field_path() -> None:
    bad_tensor = encode_len_header(9, 50) + b"short"
    graph = encode_len_header(5, len(bad_tensor)) + bad_tensor
    data = encode_len_header(7, len(graph)) + graph
    hooks = Hooks(enter=lambda b, s, e: True, tensor=lambda b, s, e, p: _parse(b, s, e))
    with pytest.raises(WireFormatError) as info:
        rewrite_message(data, 0, len(data), "model", (), hooks)
    assert info.value.path == "graph.initializer[0]"
    assert info.value.offset == 5


def _parse(buf: bytes, start: int, end: int) -> None:
    from streamconv.scan import parse_tensor_fields

    parse_tensor_fields(buf, start, end)


def test_nesting_limit() -> None:
    # graph -> node -> attribute -> graph ... far deeper than the limit
    inner = b""
    for _ in range(60):
        attribute = encode_len_header(6, len(inner)) + inner
        node = encode_len_header(5, len(attribute)) + attribute
        inner = encode_len_header(1, len(node)) + node
    data = encode_len_header(7, len(inner)) + inner
    hooks = Hooks(enter=lambda b, s, e: True, tensor=_never)
    with pytest.raises(LimitError, match="nested more than"):
        rewrite_message(data, 0, len(data), "model", (), hooks)
