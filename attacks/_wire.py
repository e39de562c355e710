"""Byte-level builders for the attack files: protobuf wire format by concatenation.

Nothing here uses protobuf or onnx, so the files can be as wrong as an attacker
likes (lengths past their parent, ten-byte varints, nesting a thousand deep).
Messages are built bottom-up with plain ``bytes`` concatenation, never by
recursion, so any nesting depth can be written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

__all__ = [
    "attribute_graph",
    "attribute_tensor",
    "external_tensor",
    "f32",
    "field_bytes",
    "field_str",
    "field_varint",
    "graph",
    "model",
    "nested_if_model",
    "node",
    "simple_model",
    "tag",
    "tensor",
    "value_info",
    "varint",
]

WT_VARINT = 0
WT_LEN = 2

FLOAT = 1
INT64 = 7
BOOL = 9


def varint(value: int, *, min_bytes: int = 1) -> bytes:
    """Encode *value* (two's complement for negatives) as a varint of at least *min_bytes*.

    ``min_bytes`` pads with continuation bytes: a valid but non-canonical
    encoding up to 10 bytes, an invalid one past that.
    """
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or len(out) + 1 < min_bytes:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    """A field key: ``field << 3 | wire_type`` as a varint (no range checks, on purpose)."""
    return varint(field << 3 | wire_type)


def field_varint(field: int, value: int) -> bytes:
    """A complete varint field."""
    return tag(field, WT_VARINT) + varint(value)


def field_bytes(field: int, content: bytes, *, length: int | None = None) -> bytes:
    """A length-delimited field; *length* overrides the declared length (to lie)."""
    declared = len(content) if length is None else length
    return tag(field, WT_LEN) + varint(declared) + content


def field_str(field: int, text: str) -> bytes:
    """A length-delimited field holding UTF-8 text."""
    return field_bytes(field, text.encode())


def f32(values: Iterable[float]) -> bytes:
    """Little-endian float32 bytes."""
    values = list(values)
    return struct.pack(f"<{len(values)}f", *values)


def tensor(name: str, dims: Sequence[int], raw: bytes, data_type: int = FLOAT) -> bytes:
    """A TensorProto body with ``raw_data``."""
    return (
        b"".join(field_varint(1, d) for d in dims)
        + field_varint(2, data_type)
        + field_str(8, name)
        + field_bytes(9, raw)
    )


def external_tensor(
    name: str, dims: Sequence[int], entries: Sequence[tuple[str, str]], data_type: int = FLOAT
) -> bytes:
    """A TensorProto body whose data is external, with the given key/value entries."""
    body = b"".join(field_varint(1, d) for d in dims) + field_varint(2, data_type)
    body += field_str(8, name)
    for key, value in entries:
        body += field_bytes(13, field_str(1, key) + field_str(2, value))
    return body + field_varint(14, 1)


def attribute_tensor(name: str, tensor_body: bytes) -> bytes:
    """An AttributeProto of type TENSOR."""
    return field_str(1, name) + field_bytes(5, tensor_body) + field_varint(20, 4)


def attribute_graph(name: str, graph_body: bytes) -> bytes:
    """An AttributeProto of type GRAPH."""
    return field_str(1, name) + field_bytes(6, graph_body) + field_varint(20, 5)


def node(
    op_type: str, inputs: Sequence[str], outputs: Sequence[str], attributes: Sequence[bytes] = ()
) -> bytes:
    """A NodeProto body."""
    body = b"".join(field_str(1, i) for i in inputs) + b"".join(field_str(2, o) for o in outputs)
    body += field_str(4, op_type)
    return body + b"".join(field_bytes(5, a) for a in attributes)


def value_info(name: str, elem_type: int = FLOAT, dims: Sequence[int] | None = None) -> bytes:
    """A ValueInfoProto body: a tensor type, with a shape when *dims* is given."""
    tensor_type = field_varint(1, elem_type)
    if dims is not None:
        shape = b"".join(field_bytes(1, field_varint(1, d)) for d in dims)
        tensor_type += field_bytes(2, shape)
    return field_str(1, name) + field_bytes(2, field_bytes(1, tensor_type))


def graph(
    name: str,
    nodes: Sequence[bytes],
    *,
    inputs: Sequence[bytes] = (),
    outputs: Sequence[bytes] = (),
    initializers: Sequence[bytes] = (),
) -> bytes:
    """A GraphProto body from node, value-info and tensor bodies."""
    return (
        b"".join(field_bytes(1, n) for n in nodes)
        + field_str(2, name)
        + b"".join(field_bytes(5, t) for t in initializers)
        + b"".join(field_bytes(11, i) for i in inputs)
        + b"".join(field_bytes(12, o) for o in outputs)
    )


def model(graph_body: bytes, opset: int = 11, ir_version: int = 7) -> bytes:
    """A whole ModelProto: IR version, producer, graph and one ai.onnx opset import."""
    return (
        field_varint(1, ir_version)
        + field_str(2, "attacks")
        + field_bytes(7, graph_body)
        + field_bytes(8, field_varint(2, opset))
    )


def simple_model(initializer: bytes, opset: int = 11) -> bytes:
    """``Y = X + W`` with *initializer* (a TensorProto body named ``W``) as W."""
    body = graph(
        "attack",
        [node("Add", ["X", "W"], ["Y"])],
        inputs=[value_info("X")],
        outputs=[value_info("Y")],
        initializers=[initializer],
    )
    return model(body, opset)


def nested_if_model(depth: int, payload: int = 16) -> bytes:
    """A model whose main graph holds an If whose then-branch holds an If … *depth* deep.

    The innermost branch returns an initializer of *payload* bytes; every
    else-branch is a one-node leaf, so the file grows linearly with *depth*.
    """
    inner = graph(
        "leaf",
        [node("Identity", ["w"], ["y"])],
        outputs=[value_info("y")],
        initializers=[tensor("w", [payload // 4], bytes(payload))],
    )
    for level in range(depth):
        leaf = graph(
            f"else{level}",
            [node("Identity", [f"e{level}"], ["y"])],
            outputs=[value_info("y")],
            initializers=[tensor(f"e{level}", [1], bytes(4))],
        )
        flag = node(
            "Constant", [], [f"c{level}"],
            [attribute_tensor("value", tensor("", [], b"\x01", BOOL))],
        )
        branch = node(
            "If", [f"c{level}"], ["y"],
            [attribute_graph("then_branch", inner), attribute_graph("else_branch", leaf)],
        )
        inner = graph(f"level{level}", [flag, branch], outputs=[value_info("y")])
    return model(inner)
