"""Walk an ONNX model's wire format along the paths where tensors live.

The walker enters only the length-delimited fields that can hold tensors
(graphs, nodes, attributes, functions, training graphs, sparse tensors) and
only when a caller-supplied test says the field is worth entering; everything
else is an opaque byte span.  A caller-supplied hook may rewrite a tensor;
the walker then rebuilds every enclosing message with recomputed length
prefixes.  Output is a :class:`Rewrite`: a list of pieces (``bytes`` or
opaque payload references with a size) and their total length, so that
messages far beyond 2 GiB can be described without holding their bytes.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import fields as F
from .errors import LimitError, WireFormatError
from .wire import encode_len_header, read_field, read_varint

__all__ = [
    "MAX_DEPTH",
    "Hooks",
    "Rewrite",
    "Sized",
    "TensorField",
    "format_path",
    "map_file",
    "parse_tensor_fields",
    "read_packed_varints",
    "rewrite_message",
]

#: Deepest message nesting the walker enters (protobuf's own default limit is 100).
MAX_DEPTH = 100

Path = tuple[str, ...]

# message kind -> {field number: (child kind, label, repeated)}
CHILDREN: dict[str, dict[int, tuple[str, str, bool]]] = {
    "model": {
        F.MODEL_GRAPH: ("graph", "graph", False),
        F.MODEL_TRAINING_INFO: ("training", "training_info", True),
        F.MODEL_FUNCTIONS: ("function", "functions", True),
    },
    "training": {
        F.TRAINING_INITIALIZATION: ("graph", "initialization", False),
        F.TRAINING_ALGORITHM: ("graph", "algorithm", False),
    },
    "function": {
        F.FUNCTION_NODE: ("node", "node", True),
        F.FUNCTION_ATTRIBUTE_PROTO: ("attribute", "attribute_proto", True),
    },
    "graph": {
        F.GRAPH_NODE: ("node", "node", True),
        F.GRAPH_INITIALIZER: ("tensor", "initializer", True),
        F.GRAPH_SPARSE_INITIALIZER: ("sparse", "sparse_initializer", True),
    },
    "node": {F.NODE_ATTRIBUTE: ("attribute", "attribute", True)},
    "attribute": {
        F.ATTR_T: ("tensor", "t", False),
        F.ATTR_G: ("graph", "g", False),
        F.ATTR_TENSORS: ("tensor", "tensors", True),
        F.ATTR_GRAPHS: ("graph", "graphs", True),
        F.ATTR_SPARSE_TENSOR: ("sparse", "sparse_tensor", False),
        F.ATTR_SPARSE_TENSORS: ("sparse", "sparse_tensors", True),
    },
    "sparse": {
        F.SPARSE_VALUES: ("tensor", "values", False),
        F.SPARSE_INDICES: ("tensor", "indices", False),
    },
}


class Sized(Protocol):
    """A piece of output whose bytes live elsewhere (a payload reference)."""

    @property
    def size(self) -> int: ...


Piece = Any  # bytes | Sized


@dataclass
class Rewrite:
    """New content of a message: pieces in order and their total byte length."""

    pieces: list[Piece] = field(default_factory=list)
    length: int = 0

    def add(self, piece: Piece) -> None:
        if isinstance(piece, (bytes, bytearray)):
            if not piece:
                return
            self.length += len(piece)
            if self.pieces and isinstance(self.pieces[-1], bytearray):
                self.pieces[-1] += piece
            else:
                self.pieces.append(bytearray(piece))
        else:
            self.length += piece.size
            self.pieces.append(piece)

    def extend(self, other: Rewrite) -> None:
        for piece in other.pieces:
            self.add(piece)


@dataclass
class Hooks:
    """What the walker asks its caller.

    ``enter(buf, start, end)`` says whether a candidate sub-message is worth
    entering; ``tensor(buf, start, end, path)`` returns a tensor's new content
    or None to keep it unchanged.
    """

    enter: Callable[[Any, int, int], bool]
    tensor: Callable[[Any, int, int, Path], Rewrite | None]


def format_path(path: Path) -> str:
    """Render a field path as ``graph.node[3].attribute[0].t``."""
    return ".".join(path) if path else "model"


def _short_path(path: Path, keep: int = 4) -> str:
    """Like :func:`format_path`, eliding the middle of paths too deep to read on one line."""
    if len(path) <= 2 * keep + 1:
        return format_path(path)
    hidden = len(path) - 2 * keep
    return ".".join((*path[:keep], f"<{hidden} more>", *path[-keep:]))


def rewrite_message(
    buf: Any, start: int, end: int, kind: str, path: Path, hooks: Hooks, depth: int = 0
) -> Rewrite | None:
    """Walk the message of *kind* in ``buf[start:end]``; return its new content.

    Returns None when no tensor below it was rewritten (the caller keeps the
    original bytes).  Raises WireFormatError (with offset and path) for
    malformed fields and LimitError past :data:`MAX_DEPTH` levels.
    """
    if depth > MAX_DEPTH:
        raise LimitError(
            f"messages nested more than {MAX_DEPTH} deep", offset=start, path=_short_path(path)
        )
    children = CHILDREN[kind]
    counts: dict[int, int] = {}
    changes: list[tuple[int, int, int, Rewrite]] = []
    pos = start
    try:
        while pos < end:
            field_start = pos
            number, wire_type, a, b, pos = read_field(buf, pos, end)
            child = children.get(number)
            if child is None:
                continue
            child_kind, label, repeated = child
            index = counts.get(number, 0)
            counts[number] = index + 1
            child_path = (*path, f"{label}[{index}]" if repeated else label)
            if index and not repeated:
                # protobuf merges the copies (dims add up, payloads replace each other),
                # so the tensors it would see are not the ones walked here
                raise WireFormatError(
                    f"'{label}' appears {index + 1} times; it is a single message",
                    offset=field_start,
                    path=format_path(path),
                )
            if wire_type != F.WT_LEN:
                raise WireFormatError(
                    f"expected a length-delimited message, found wire type {wire_type}",
                    offset=field_start,
                    path=format_path(child_path),
                )
            if not hooks.enter(buf, a, b):
                continue
            if child_kind == "tensor":
                try:
                    new = hooks.tensor(buf, a, b, child_path)
                except WireFormatError as error:
                    if error.path is None:
                        error.path = format_path(child_path)
                    raise
            else:
                new = rewrite_message(buf, a, b, child_kind, child_path, hooks, depth + 1)
            if new is not None:
                changes.append((field_start, b, number, new))
    except WireFormatError as error:
        if error.path is None:
            error.path = format_path(path)
        raise
    if not changes:
        return None
    out = Rewrite()
    pos = start
    for field_start, field_end, number, new in changes:
        out.add(bytes(buf[pos:field_start]))
        out.add(encode_len_header(number, new.length))
        out.extend(new)
        pos = field_end
    out.add(bytes(buf[pos:end]))
    return out


@dataclass(frozen=True)
class TensorField:
    """One field of a TensorProto: number, wire type, content span, whole-field span."""

    number: int
    wire_type: int
    value: int  # varint value, or content start
    end: int  # content end
    field_start: int
    field_end: int


def parse_tensor_fields(buf: Sequence[int], start: int, end: int) -> list[TensorField]:
    """Split a TensorProto into its fields without reading any payload."""
    out = []
    pos = start
    while pos < end:
        field_start = pos
        number, wire_type, value, value_end, pos = read_field(buf, pos, end)
        out.append(TensorField(number, wire_type, value, value_end, field_start, pos))
    return out


def read_packed_varints(buf: Sequence[int], start: int, end: int) -> list[int]:
    """Decode a (small) packed run of varints."""
    values = []
    pos = start
    while pos < end:
        value, pos = read_varint(buf, pos, end)
        values.append(value)
    return values


def map_file(fd: int, size: int) -> Any:
    """Map *fd* read-only; an empty file maps to ``b""``."""
    if size == 0:
        return b""
    return mmap.mmap(fd, size, access=mmap.ACCESS_READ)

