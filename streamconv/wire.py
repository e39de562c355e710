"""Protobuf wire format: pure functions over a buffer.

Every reader takes ``(buf, pos, end)`` and returns ``(value, new_pos)``; it
never reads at or past *end* and raises :class:`WireFormatError` naming the
absolute byte offset of the problem.  *buf* is anything indexable by byte
(``bytes``, ``mmap``, ``memoryview``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import WireFormatError
from .fields import WT_FIXED32, WT_FIXED64, WT_LEN, WT_VARINT

__all__ = [
    "MAX_VARINT_BYTES",
    "encode_len_header",
    "encode_tag",
    "encode_varint",
    "read_field",
    "read_tag",
    "read_varint",
    "varint_size",
]

MAX_VARINT_BYTES = 10
MAX_FIELD_NUMBER = (1 << 29) - 1


def read_varint(buf: Sequence[int], pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at *pos*; return ``(value, pos_after)``.

    Raises WireFormatError if the varint runs past *end* or is longer than
    10 bytes.  Values are unsigned and truncated to 64 bits, as protobuf does.
    """
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireFormatError(
                f"varint truncated: needs more than the {end - start} bytes left", offset=start
            )
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if pos - start >= MAX_VARINT_BYTES:
            raise WireFormatError("varint longer than 10 bytes", offset=start)


def read_tag(buf: Sequence[int], pos: int, end: int) -> tuple[int, int, int]:
    """Decode a field tag; return ``(field_number, wire_type, pos_after)``.

    Raises WireFormatError for field number 0, numbers past 2**29-1, and wire
    types other than 0, 1, 2 and 5 (groups never occur in ONNX).
    """
    key, new_pos = read_varint(buf, pos, end)
    field = key >> 3
    wire_type = key & 7
    if field == 0 or field > MAX_FIELD_NUMBER:
        raise WireFormatError(f"invalid field number {field}", offset=pos)
    if wire_type not in (WT_VARINT, WT_FIXED64, WT_LEN, WT_FIXED32):
        raise WireFormatError(f"invalid wire type {wire_type} for field {field}", offset=pos)
    return field, wire_type, new_pos


def read_field(buf: Sequence[int], pos: int, end: int) -> tuple[int, int, int, int, int]:
    """Read one whole field at *pos*.

    Returns ``(field, wire_type, value_or_start, value_end, pos_after)``: for
    varints ``value_or_start`` is the value; for the other wire types it is the
    offset where the field's content starts and ``value_end`` where it ends
    (for length-delimited fields the content excludes tag and length).
    Raises WireFormatError if the field does not fit before *end*.
    """
    # Fast path (most fields of a graph): one-byte tag, short length prefix.
    if pos + 2 < end:
        key = buf[pos]
        if key < 0x80 and key & 7 == WT_LEN and key >= 8:
            length = buf[pos + 1]
            q = pos + 2
            if length >= 0x80:
                length, q = read_varint(buf, pos + 1, end)
            if length <= end - q:
                return key >> 3, WT_LEN, q, q + length, q + length
    field, wire_type, p = read_tag(buf, pos, end)
    if wire_type == WT_VARINT:
        value, q = read_varint(buf, p, end)
        return field, wire_type, value, q, q
    if wire_type == WT_LEN:
        length, q = read_varint(buf, p, end)
        if length > end - q:
            raise WireFormatError(
                f"field {field}: length {length} exceeds the {end - q} bytes left", offset=p
            )
        return field, wire_type, q, q + length, q + length
    size = 8 if wire_type == WT_FIXED64 else 4
    if size > end - p:
        raise WireFormatError(
            f"field {field}: fixed{size * 8} value needs {size} bytes, {end - p} left", offset=p
        )
    return field, wire_type, p, p + size, p + size


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer (< 2**64) as a varint."""
    if value < 0:
        value &= 0xFFFFFFFFFFFFFFFF
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_size(value: int) -> int:
    """Number of bytes :func:`encode_varint` produces for *value*."""
    return max(1, (value.bit_length() + 6) // 7)


def encode_tag(field: int, wire_type: int) -> bytes:
    """Encode a field tag."""
    return encode_varint((field << 3) | wire_type)


def encode_len_header(field: int, length: int) -> bytes:
    """Tag and length prefix of a length-delimited field whose content is *length* bytes."""
    return encode_tag(field, WT_LEN) + encode_varint(length)
