"""Wire layer: varints, tags, fields; every error names its byte offset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamconv.errors import WireFormatError
from streamconv.wire import (
    encode_len_header,
    encode_tag,
    encode_varint,
    read_field,
    read_tag,
    read_varint,
    varint_size,
)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    data = encode_varint(value)
    assert len(data) == varint_size(value)
    assert read_varint(data, 0, len(data)) == (value, len(data))


@given(st.integers(min_value=1, max_value=2**29 - 1), st.sampled_from([0, 1, 2, 5]))
def test_tag_round_trip(field: int, wire_type: int) -> None:
    data = b"\x00" + encode_tag(field, wire_type)
    assert read_tag(data, 1, len(data)) == (field, wire_type, len(data))


@pytest.mark.parametrize(
    "data, pos, message, offset",
    [
        (b"\x80", 0, "varint truncated", 0),
        (b"\x00\x80\x80", 1, "varint truncated", 1),
        (b"\xff" * 11, 0, "longer than 10 bytes", 0),
    ],
)
def test_bad_varints(data: bytes, pos: int, message: str, offset: int) -> None:
    with pytest.raises(WireFormatError, match=message) as info:
        read_varint(data, pos, len(data))
    assert info.value.offset == offset


def test_varint_respects_end() -> None:
    # The varint continues past `end`; bytes beyond end must not be used.
    with pytest.raises(WireFormatError, match="truncated"):
        read_varint(b"\x81\x01", 0, 1)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00", "invalid field number 0"),
        (b"\x0b", "invalid wire type 3"),
        (b"\x0c", "invalid wire type 4"),
        (b"\x0e", "invalid wire type 6"),
        (b"\x0f", "invalid wire type 7"),
    ],
)
def test_bad_tags(data: bytes, message: str) -> None:
    with pytest.raises(WireFormatError, match=message) as info:
        read_tag(b"\x08\x01" + data, 2, 2 + len(data))
    assert info.value.offset == 2


def test_read_field_kinds() -> None:
    data = (
        encode_tag(1, 0) + encode_varint(300)
        + encode_len_header(2, 3) + b"abc"
        + encode_tag(3, 5) + b"\x01\x02\x03\x04"
        + encode_tag(4, 1) + bytes(8)
    )
    pos = 0
    number, wt, value, _, pos = read_field(data, pos, len(data))
    assert (number, wt, value) == (1, 0, 300)
    number, wt, start, end, pos = read_field(data, pos, len(data))
    assert (number, wt, data[start:end]) == (2, 2, b"abc")
    number, wt, start, end, pos = read_field(data, pos, len(data))
    assert (number, wt, data[start:end]) == (3, 5, b"\x01\x02\x03\x04")
    number, wt, start, end, pos = read_field(data, pos, len(data))
    assert (number, wt, end - start) == (4, 1, 8)
    assert pos == len(data)


def test_length_past_end_names_offset() -> None:
    data = b"\x08\x01" + encode_len_header(9, 1000) + b"xy"
    with pytest.raises(WireFormatError, match="length 1000 exceeds the 2 bytes left") as info:
        read_field(data, 2, len(data))
    assert info.value.offset == 3


def test_fixed_past_end() -> None:
    data = encode_tag(3, 5) + b"\x01\x02"
    with pytest.raises(WireFormatError, match="fixed32 value needs 4 bytes, 2 left"):
        read_field(data, 0, len(data))


def test_length_beyond_parent_end() -> None:
    # Plenty of bytes in the buffer, but the parent message ends earlier.
    data = encode_len_header(2, 5) + b"abcde"
    with pytest.raises(WireFormatError, match="exceeds"):
        read_field(data, 0, 4)


def test_error_renders_one_line() -> None:
    error = WireFormatError("bad", file="m.onnx", offset=17, path="graph.initializer[2]")
    assert str(error) == "m.onnx: byte 17, graph.initializer[2]: bad"
