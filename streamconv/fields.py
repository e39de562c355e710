"""ONNX field numbers (onnx.proto3) and element sizes, named in one place."""

from __future__ import annotations

# Wire types (3 and 4, groups, never occur in ONNX and are rejected).
WT_VARINT = 0
WT_FIXED64 = 1
WT_LEN = 2
WT_FIXED32 = 5

# ModelProto
MODEL_IR_VERSION = 1
MODEL_PRODUCER_NAME = 2
MODEL_GRAPH = 7
MODEL_OPSET_IMPORT = 8
MODEL_METADATA_PROPS = 14
MODEL_TRAINING_INFO = 20
MODEL_FUNCTIONS = 25

# TrainingInfoProto
TRAINING_INITIALIZATION = 1
TRAINING_ALGORITHM = 2

# FunctionProto
FUNCTION_NODE = 7
FUNCTION_ATTRIBUTE_PROTO = 11

# GraphProto
GRAPH_NODE = 1
GRAPH_NAME = 2
GRAPH_INITIALIZER = 5
GRAPH_SPARSE_INITIALIZER = 15

# NodeProto
NODE_INPUT = 1
NODE_OUTPUT = 2
NODE_NAME = 3
NODE_OP_TYPE = 4
NODE_ATTRIBUTE = 5

# AttributeProto
ATTR_NAME = 1
ATTR_T = 5
ATTR_G = 6
ATTR_TENSORS = 10
ATTR_GRAPHS = 11
ATTR_SPARSE_TENSOR = 22
ATTR_SPARSE_TENSORS = 23

# SparseTensorProto
SPARSE_VALUES = 1
SPARSE_INDICES = 2

# TensorProto
TENSOR_DIMS = 1
TENSOR_DATA_TYPE = 2
TENSOR_SEGMENT = 3
TENSOR_FLOAT_DATA = 4
TENSOR_INT32_DATA = 5
TENSOR_STRING_DATA = 6
TENSOR_INT64_DATA = 7
TENSOR_NAME = 8
TENSOR_RAW_DATA = 9
TENSOR_DOUBLE_DATA = 10
TENSOR_UINT64_DATA = 11
TENSOR_DOC_STRING = 12
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
TENSOR_METADATA_PROPS = 16

# StringStringEntryProto
ENTRY_KEY = 1
ENTRY_VALUE = 2

DATA_LOCATION_EXTERNAL = 1

# Payload-bearing TensorProto fields and how their packed elements are encoded.
PAYLOAD_FIELDS = {
    TENSOR_RAW_DATA: "raw",
    TENSOR_FLOAT_DATA: "fixed32",
    TENSOR_DOUBLE_DATA: "fixed64",
    TENSOR_INT32_DATA: "varint",
    TENSOR_INT64_DATA: "varint",
    TENSOR_UINT64_DATA: "varint",
}

# TensorProto.DataType -> (name, bits per element); 0 bits = not fixed size.
DATA_TYPES: dict[int, tuple[str, int]] = {
    1: ("float", 32),
    2: ("uint8", 8),
    3: ("int8", 8),
    4: ("uint16", 16),
    5: ("int16", 16),
    6: ("int32", 32),
    7: ("int64", 64),
    8: ("string", 0),
    9: ("bool", 8),
    10: ("float16", 16),
    11: ("double", 64),
    12: ("uint32", 32),
    13: ("uint64", 64),
    14: ("complex64", 64),
    15: ("complex128", 128),
    16: ("bfloat16", 16),
    17: ("float8e4m3fn", 8),
    18: ("float8e4m3fnuz", 8),
    19: ("float8e5m2", 8),
    20: ("float8e5m2fnuz", 8),
    21: ("uint4", 4),
    22: ("int4", 4),
    23: ("float4e2m1", 4),
    24: ("float8e8m0", 8),
    25: ("uint2", 2),
    26: ("int2", 2),
}

# Which typed field may carry which data types, and the numpy dtype each
# element becomes in little-endian raw_data.  Types not listed here (4-bit and
# 2-bit types, strings) are never diverted out of typed fields.
TYPED_FIELD_TARGETS: dict[int, dict[int, str]] = {
    TENSOR_FLOAT_DATA: {1: "<f4", 14: "<f4"},
    TENSOR_DOUBLE_DATA: {11: "<f8", 15: "<f8"},
    TENSOR_INT32_DATA: {
        2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 9: "u1", 10: "<u2", 16: "<u2",
        17: "u1", 18: "u1", 19: "u1", 20: "u1", 24: "u1",
    },
    TENSOR_INT64_DATA: {7: "<i8"},
    TENSOR_UINT64_DATA: {12: "<u4", 13: "<u8"},
}


def payload_nbytes(data_type: int, count: int) -> int | None:
    """Bytes that *count* elements of *data_type* occupy in raw_data, or None if unknown."""
    entry = DATA_TYPES.get(data_type)
    if entry is None or entry[1] == 0:
        return None
    return (count * entry[1] + 7) // 8
