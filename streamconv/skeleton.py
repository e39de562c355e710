"""Build the skeleton: the model with every large payload replaced by a stub.

A stub is an external-data reference whose ``location`` is
``__streamconv__/<id>``; onnx's converter carries such references through
unchanged.  The payload itself stays where it is (in the input file, or in
the input's own external-data file) and is described by a :class:`Payload`.
Tensors whose values onnx's converter reads (Squeeze axes, Reshape shapes,
Split sizes, …) are never stubbed, whatever their size.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import fields as F
from .errors import ExternalDataError, LimitError, WireFormatError
from .scan import (
    Hooks,
    Path,
    Rewrite,
    format_path,
    parse_tensor_fields,
    read_packed_varints,
    rewrite_message,
)
from .wire import MAX_VARINT_BYTES, encode_len_header, encode_tag, encode_varint

if TYPE_CHECKING:  # onnx and numpy load lazily: the wire phase runs while they import
    import numpy as np
    import onnx

__all__ = [
    "MARKER",
    "MAX_VALUE_READ",
    "VALUE_INPUTS",
    "Payload",
    "Skeleton",
    "ValueReader",
    "analyze_skeleton",
    "build_skeleton",
    "iter_raw_chunks",
    "iter_stub_tensors",
    "parse_decimal",
    "read_at",
    "scan_payloads",
    "stub_id",
    "value_readers",
]

log = logging.getLogger(__name__)

MARKER = "__streamconv__/"
MARKER_BYTES = MARKER.encode()
CHUNK = 8 << 20
#: Bytes of a packed varint field read (and decoded) at a time: decoding costs
#: about 40 bytes of temporary arrays per input byte.
VARINT_CHUNK = 1 << 20

#: Largest tensor put back into the skeleton because conversion reads its value.
#: Such values are shapes, axes, pads, scales and the like: a few bytes in any
#: real model.  Past this the tensor is refused rather than read whole (and past
#: 2 GiB protobuf could not serialize the skeleton at all).
MAX_VALUE_READ = 64 << 20

_REDUCE_OPS = (
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)

# The one table of inputs whose *values* conversion reads, by op type: a stub
# would read as empty there (a Squeeze 13->12 turns axes [0] into []).  An index
# an op's version does not have is never matched, so one row serves every
# version (Resize 10's scales at 1 and Resize 11's roi/scales/sizes at 1-3 both
# fall under (1, 2, 3)).  Read by onnx's adapters (version_converter/adapters):
# Reshape 5->4, Split 13->12, Squeeze/Unsqueeze/ReduceSum 13->12 and the other
# Reduce* 18->17 (axes to attribute), Upsample 9->8 (scales), DFT 20->19 (axis,
# input 2).  The others are read by streamconv's own adapters, which move these
# inputs back to attributes or check their values against an older schema.
VALUE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "Pad": (1, 2, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Slice": (1, 2, 3, 4),
    "TopK": (1,),
    "Tile": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Clip": (1, 2),
    "Dropout": (1, 2),
    "OneHot": (1, 2),
    "Range": (0, 1, 2),
    "CumSum": (1,),
    "Trilu": (1,),
    "CenterCropPad": (1, 2),
    "Col2Im": (1, 2, 3),
    "DFT": (1, 2),
    **{op: (1,) for op in _REDUCE_OPS},
}


@dataclass
class Payload:
    """A tensor payload held outside the skeleton.

    ``source``/``offset``/``length`` locate its bytes as stored; ``encoding``
    says how they are stored (``raw`` little-endian bytes, packed ``fixed32``
    or ``fixed64``, or packed ``varint``); ``nbytes`` is its size as raw_data.
    """

    id: int
    path: str
    name: str
    source: str
    offset: int
    length: int
    encoding: str
    number: int
    data_type: int
    count: int | None
    nbytes: int
    header: bytes = b""
    #: True when the payload lives in one of the input's external-data files
    external: bool = False
    #: the tensor's dims as read; its stub must come back from conversion with these
    dims: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return self.nbytes


@dataclass
class Skeleton:
    """The stubbed model: wire bytes, parsed proto, and the payloads set aside."""

    data: bytes
    model: onnx.ModelProto
    payloads: dict[int, Payload] = field(default_factory=dict)


def stub_id(tensor: onnx.TensorProto) -> int | None:
    """The stub id a tensor carries, or None if it is not a stub."""
    if tensor.data_location != F.DATA_LOCATION_EXTERNAL:
        return None
    for entry in tensor.external_data:
        if not isinstance(entry.value, str) or not isinstance(entry.key, str):
            return None  # not UTF-8: protobuf hands it over as bytes; never a stub
        if entry.key == "location" and entry.value.startswith(MARKER):
            try:
                return int(entry.value[len(MARKER):])
            except ValueError:
                return None
    return None


def stub_bytes(ident: int) -> bytes:
    """Wire bytes of the fields that turn a tensor into stub *ident*."""
    key = b"location"
    value = f"{MARKER}{ident}".encode()
    entry = encode_len_header(F.ENTRY_KEY, len(key)) + key
    entry += encode_len_header(F.ENTRY_VALUE, len(value)) + value
    return (
        encode_len_header(F.TENSOR_EXTERNAL_DATA, len(entry))
        + entry
        + encode_tag(F.TENSOR_DATA_LOCATION, F.WT_VARINT)
        + encode_varint(F.DATA_LOCATION_EXTERNAL)
    )


def _elements(dims: list[int], where: dict[str, Any]) -> int:
    for d in dims:
        if d >= 1 << 63:
            raise WireFormatError(f"negative dimension in dims {dims}", **where)
    return math.prod(dims)


def _release(buf: Any, start: int, end: int) -> None:
    """Drop the mapped pages of ``buf[start:end]`` from this process's memory.

    Pages of a file mapping that were read count towards the process's
    resident memory until the mapping goes; a varint field is read whole, so
    without this a 2 GB field would leave 2 GB resident.  The bytes stay in the
    page cache and fault back in if read again.
    """
    madvise = getattr(buf, "madvise", None)
    if madvise is None:
        return  # not a mapping: the bytes are in memory anyway
    first = start - start % mmap.PAGESIZE
    last = end - end % mmap.PAGESIZE  # keep the partial page at the end (it may hold a header)
    if last > first:
        madvise(mmap.MADV_DONTNEED, first, last - first)


def _count_varints(buf: Any, start: int, end: int, where: dict[str, Any]) -> int:
    """Count the varints in a packed run in one bounded-memory pass.

    Refuses, naming the varint's own offset, a varint longer than 10 bytes (as
    soon as its tenth continuation byte is seen) and a run that ends inside a
    varint; so the copy that decodes the run later never meets either.
    """
    import numpy as np

    count = 0
    run = 0  # continuation bytes at the end of what was read so far
    path = where.get("path")
    for pos in range(start, end, VARINT_CHUNK):
        n = min(VARINT_CHUNK, end - pos)
        if isinstance(buf, (bytes, bytearray, mmap.mmap)):
            arr = np.frombuffer(buf, dtype=np.uint8, count=n, offset=pos)
        else:  # a remote model's scan buffer: its bytes in one read
            arr = np.frombuffer(buf[pos:pos + n], dtype=np.uint8)
        ends = np.flatnonzero(arr < 0x80)
        del arr
        if len(ends) == 0:
            run += n
        else:
            # a varint is longer than 10 bytes when 10 continuation bytes precede its last
            if run + int(ends[0]) >= MAX_VARINT_BYTES:
                raise WireFormatError("varint longer than 10 bytes in a packed field",
                                      offset=pos - run, path=path)
            long = np.flatnonzero(np.diff(ends) > MAX_VARINT_BYTES)
            if len(long):
                raise WireFormatError("varint longer than 10 bytes in a packed field",
                                      offset=pos + int(ends[long[0]]) + 1, path=path)
            run = n - 1 - int(ends[-1])
            count += len(ends)
        del ends
        if run >= MAX_VARINT_BYTES:
            raise WireFormatError("varint longer than 10 bytes in a packed field",
                                  offset=pos + n - run, path=path)
        _release(buf, pos, pos + n)
    if run:
        raise WireFormatError("packed varints end inside a varint", offset=end - run, path=path)
    return count


class _Stubber:
    """Tensor hook that stubs payloads above a threshold."""

    def __init__(self, buf: Any, source: str, threshold: int) -> None:
        self.buf = buf
        self.source = source
        self.threshold = threshold
        self.payloads: dict[int, Payload] = {}

    def enter(self, buf: Any, start: int, end: int) -> bool:
        return end - start > self.threshold

    def tensor(self, buf: Any, start: int, end: int, path: Path) -> Rewrite | None:
        fields = parse_tensor_fields(buf, start, end)
        dims: list[int] = []
        data_type = 0
        name = ""
        payload = []
        for f in fields:
            if f.number == F.TENSOR_DIMS:
                if f.wire_type == F.WT_VARINT:
                    dims.append(f.value)
                elif f.wire_type == F.WT_LEN:
                    dims.extend(read_packed_varints(buf, f.value, f.end))
            elif f.number == F.TENSOR_DATA_TYPE and f.wire_type == F.WT_VARINT:
                data_type = f.value
            elif f.number == F.TENSOR_NAME and f.wire_type == F.WT_LEN:
                try:
                    name = bytes(buf[f.value:f.end]).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise WireFormatError(
                        "tensor name is not valid UTF-8", offset=f.field_start
                    ) from e
            elif f.number in F.PAYLOAD_FIELDS:
                payload.append(f)
            elif f.number in (F.TENSOR_EXTERNAL_DATA, F.TENSOR_DATA_LOCATION):
                # external data is handled on the parsed skeleton; an explicit
                # data_location stays with its inline payload
                return None
        if len(payload) != 1 or payload[0].wire_type != F.WT_LEN:
            return None
        if path and path[-1] == "indices":
            return None  # sparse indices are read by onnx's checker and shape inference
        p = payload[0]
        length = p.end - p.value
        if length <= self.threshold:
            return None
        label = f"{format_path(path)} '{name}'" if name else format_path(path)
        where: dict[str, Any] = {"offset": p.field_start, "path": label}
        encoding = F.PAYLOAD_FIELDS[p.number]
        count: int | None
        if encoding == "raw":
            if data_type == 8:
                return None
            count = _elements(dims, where)
            expected = F.payload_nbytes(data_type, count)
            if expected is not None and expected != length:
                raise WireFormatError(
                    f"raw_data holds {length} bytes but dims {dims} of "
                    f"{F.DATA_TYPES[data_type][0]} need {expected}",
                    **where,
                )
            nbytes = length
        else:
            target = F.TYPED_FIELD_TARGETS[p.number].get(data_type)
            if target is None:
                return None  # a combination onnx does not define; leave it inline
            itemsize = int(target[-1])  # "<f4" -> 4
            if encoding == "varint":
                stored = _count_varints(buf, p.value, p.end, where)
            else:
                width = 4 if encoding == "fixed32" else 8
                if length % width:
                    raise WireFormatError(
                        f"packed {encoding} field of {length} bytes is not a multiple of {width}",
                        **where,
                    )
                stored = length // width
            count = _elements(dims, where)
            per_element = 2 if data_type in (14, 15) else 1
            if stored != count * per_element:
                raise WireFormatError(
                    f"{stored} stored values but dims {dims} of "
                    f"{F.DATA_TYPES[data_type][0]} need {count * per_element}",
                    **where,
                )
            nbytes = stored * itemsize
        ident = len(self.payloads) + 1
        self.payloads[ident] = Payload(
            id=ident,
            path=format_path(path),
            name=name,
            source=self.source,
            offset=p.value,
            length=length,
            encoding=encoding,
            number=p.number,
            data_type=data_type,
            count=count,
            nbytes=nbytes,
            header=bytes(buf[p.field_start:p.value]),
            dims=tuple(dims),
        )
        out = Rewrite()
        out.add(bytes(buf[start:p.field_start]))
        out.add(stub_bytes(ident))
        out.add(bytes(buf[p.end:end]))
        return out


def _decode_varints(arr: np.ndarray, offset: int) -> np.ndarray:
    """Decode a packed run of whole varints into uint64 values."""
    import numpy as np

    ends = np.flatnonzero(arr < 0x80)
    if len(ends) == 0:
        return np.zeros(0, np.uint64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > 10:
        raise WireFormatError("varint longer than 10 bytes in packed field", offset=offset)
    values = starts.astype(np.uint64) * 0
    if longest == 1:
        return arr[ends].astype(np.uint64)
    for k in range(longest):
        sel = lengths > k
        part = arr[starts[sel] + k].astype(np.uint64) & np.uint64(0x7F)
        values[sel] |= part << np.uint64(7 * k)
    return values


def read_at(source: Any, length: int, offset: int) -> Any:
    """Up to *length* bytes at *offset* of *source*: a file descriptor, or a remote
    file (:class:`streamconv.storage.RemoteFile`, anything with ``pread``)."""
    if isinstance(source, int):
        return os.pread(source, length, offset)
    return source.pread(length, offset)


def _iter_stored(payload: Payload, fd: Any, chunk: int = CHUNK) -> Iterator[tuple[int, Any]]:
    """The payload's bytes as stored, in chunks of at most *chunk* bytes, with their offsets."""
    end = payload.offset + payload.length
    pos = payload.offset
    while pos < end:
        data = read_at(fd, min(chunk, end - pos), pos)
        if not data:
            raise ExternalDataError(
                f"file ended at byte {pos}, before the payload's end at {end}",
                file=payload.source, path=payload.path,
            )
        yield pos, data
        pos += len(data)


def iter_raw_chunks(payload: Payload, fd: Any) -> Iterator[Any]:
    """Yield the payload as little-endian raw_data bytes, in bounded chunks."""
    if payload.encoding != "varint":
        for _, data in _iter_stored(payload, fd):
            yield data
        return
    import numpy as np

    end = payload.offset + payload.length
    target = np.dtype(F.TYPED_FIELD_TARGETS[payload.number][payload.data_type])
    signed = payload.number != F.TENSOR_UINT64_DATA
    carry = b""
    for pos, data in _iter_stored(payload, fd, VARINT_CHUNK):
        chunk_start = pos - len(carry)
        block = np.frombuffer(carry + bytes(data), dtype=np.uint8)
        ends = np.flatnonzero(block < 0x80)
        cut = int(ends[-1]) + 1 if len(ends) else 0
        # the scan checked every varint; these hold only if the file changed since
        if len(block) - cut >= MAX_VARINT_BYTES:
            raise WireFormatError("varint longer than 10 bytes in a packed field",
                                  offset=pos + cut - len(carry), path=payload.path)
        if pos + len(data) >= end and cut != len(block):
            raise WireFormatError("packed varints end inside a varint", offset=chunk_start,
                                  path=payload.path)
        values = _decode_varints(block[:cut], chunk_start)
        carry = block[cut:].tobytes()
        del block, ends
        if signed:
            values = values.view(np.int64)
        yield values.astype(target, casting="unsafe").tobytes()


def read_payload(payload: Payload) -> bytes:
    """The whole payload as raw_data bytes (only for small, value-read tensors)."""
    if _remote(payload.source):
        from . import storage

        return b"".join(bytes(c) for c in iter_raw_chunks(payload, storage.reader(payload.source)))
    fd = os.open(payload.source, os.O_RDONLY)
    try:
        return b"".join(iter_raw_chunks(payload, fd))
    finally:
        os.close(fd)


def _graphs_of(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs_of(attr.g)
            for g in attr.graphs:
                yield from _graphs_of(g)


def _all_node_lists(model: onnx.ModelProto) -> Iterator[Any]:
    """Every node container: graphs at any depth, function bodies, training graphs."""
    roots = [model.graph]
    for info in model.training_info:
        roots += [info.initialization, info.algorithm]
    for root in roots:
        for g in _graphs_of(root):
            yield g
    for fn in model.functions:
        yield fn
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from _graphs_of(attr.g)
                for g in attr.graphs:
                    yield from _graphs_of(g)


@dataclass(frozen=True)
class ValueReader:
    """The first node input found that reads a value: op type, input index, node label."""

    op_type: str
    index: int
    node: str

    def __str__(self) -> str:
        return f"input {self.index} of {self.op_type} {self.node!r}"


def value_readers(model: onnx.ModelProto) -> dict[str, ValueReader]:
    """Names feeding an input listed in :data:`VALUE_INPUTS`, each with a node that reads it."""
    readers: dict[str, ValueReader] = {}
    for container in _all_node_lists(model):
        for node in container.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            listed = VALUE_INPUTS.get(node.op_type, ())
            for i, name in enumerate(node.input):
                if name and i in listed and name not in readers:
                    label = node.name or (node.output[0] if node.output else "")
                    readers[name] = ValueReader(node.op_type, i, label)
    return readers


def iter_stub_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str, str]]:
    """Every TensorProto in the model with its value name and a field path."""

    def of_graph(g: onnx.GraphProto, path: str) -> Iterator[tuple[onnx.TensorProto, str, str]]:
        for i, t in enumerate(g.initializer):
            yield t, t.name, f"{path}.initializer[{i}]"
        for i, st in enumerate(g.sparse_initializer):
            yield st.values, st.values.name, f"{path}.sparse_initializer[{i}].values"
            yield st.indices, "", f"{path}.sparse_initializer[{i}].indices"
        yield from of_nodes(g.node, path)

    def of_nodes(nodes: Any, path: str) -> Iterator[tuple[onnx.TensorProto, str, str]]:
        for i, node in enumerate(nodes):
            for j, attr in enumerate(node.attribute):
                apath = f"{path}.node[{i}].attribute[{j}]"
                if attr.HasField("t"):
                    value = (
                        node.output[0]
                        if node.op_type == "Constant" and node.output and attr.name == "value"
                        else attr.t.name
                    )
                    yield attr.t, value, f"{apath}.t"
                for k, t in enumerate(attr.tensors):
                    yield t, t.name, f"{apath}.tensors[{k}]"
                if attr.HasField("sparse_tensor"):
                    value = node.output[0] if node.op_type == "Constant" and node.output else ""
                    yield attr.sparse_tensor.values, value, f"{apath}.sparse_tensor.values"
                    yield attr.sparse_tensor.indices, "", f"{apath}.sparse_tensor.indices"
                for k, st in enumerate(attr.sparse_tensors):
                    yield st.values, "", f"{apath}.sparse_tensors[{k}].values"
                    yield st.indices, "", f"{apath}.sparse_tensors[{k}].indices"
                if attr.HasField("g"):
                    yield from of_graph(attr.g, f"{apath}.g")
                for k, g in enumerate(attr.graphs):
                    yield from of_graph(g, f"{apath}.graphs[{k}]")

    yield from of_graph(model.graph, "graph")
    for i, info in enumerate(model.training_info):
        yield from of_graph(info.initialization, f"training_info[{i}].initialization")
        yield from of_graph(info.algorithm, f"training_info[{i}].algorithm")
    for i, fn in enumerate(model.functions):
        yield from of_nodes(fn.node, f"functions[{i}]")


#: Digits of the largest external-data offset or length read (2**64 has 20).
MAX_DECIMAL_DIGITS = 20


def parse_decimal(text: str | None) -> int | None:
    """The value of *text* if it is plain ASCII decimal digits, else None.

    ONNX writes external-data offsets and lengths as decimal strings.  Python's
    ``int()`` also takes signs, ``_`` separators, surrounding whitespace and
    non-ASCII digits, so two readers could disagree on where a tensor lies.
    """
    if text is None or not text or not text.isascii() or not text.isdigit():
        return None
    if len(text) > MAX_DECIMAL_DIGITS:
        return None  # past any file size (and int() refuses over 4300 digits)
    return int(text)


def _remote(path: str) -> bool:
    """Whether *path* is a URL (read through :mod:`streamconv.storage`), cheaply."""
    if "://" not in path:
        return False
    from .storage import is_url

    return is_url(path)


def _safe_location(location: str, base: str, where: dict[str, Any]) -> str:
    """Resolve an external-data location inside *base*, or raise ExternalDataError.

    *base* is the model's folder, or for a remote model the model's URL: the
    same text checks hold, and the data must be an object in the same folder
    tree of the same bucket (no URL, no ``..``, no absolute key).
    """
    if not location:
        raise ExternalDataError("external data without a location", **where)
    if location.startswith(MARKER):
        raise ExternalDataError(f"location {location!r} uses a reserved name", **where)
    if "\0" in location:
        raise ExternalDataError(f"location {location!r} contains a NUL byte", **where)
    if location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ExternalDataError(f"location {location!r} is an absolute path", **where)
    norm = posixpath.normpath(location.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise ExternalDataError(f"location {location!r} escapes the model's folder", **where)
    if _remote(base):
        from . import storage

        storage.check_remote_location(location, where)
        return base
    full = os.path.join(base, *norm.split("/"))
    real_base = os.path.realpath(base)
    real = os.path.realpath(full)
    if os.path.commonpath([real_base, real]) != real_base:
        raise ExternalDataError(
            f"location {location!r} resolves outside the model's folder (symlink)", **where
        )
    try:
        st = os.stat(real)
    except OSError as e:
        raise ExternalDataError(
            f"external data file {location!r} cannot be opened: {e.strerror}", **where
        ) from e
    if not stat.S_ISREG(st.st_mode):
        raise ExternalDataError(f"external data {location!r} is not a regular file", **where)
    if st.st_nlink > 1:
        # A hard link can point anywhere on the same file system.
        raise ExternalDataError(
            f"external data file {location!r} has {st.st_nlink} hard links; refusing to read it",
            **where,
        )
    return real


def _external_payload(
    tensor: onnx.TensorProto, ident: int, base: str, model_file: str, path: str
) -> Payload:
    """Describe an input tensor stored as external data, checking every key."""
    where: dict[str, Any] = {"file": model_file, "path": f"{path} '{tensor.name}'"}
    keys = {e.key: e.value for e in tensor.external_data}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise ExternalDataError("external_data keys and values must be UTF-8 text", **where)
    real = _safe_location(keys.get("location", ""), base, where)
    remote_size = None
    if _remote(real):
        from . import storage

        norm = posixpath.normpath(keys["location"].replace("\\", "/"))
        real, remote_size = storage.resolve_location(model_file, norm, where)
    offset_text = keys.get("offset", "0")
    length_text = keys.get("length")
    offset = parse_decimal(offset_text)
    length = parse_decimal(length_text) if length_text is not None else None
    for key, text, value in (("offset", offset_text, offset), ("length", length_text, length)):
        if text is not None and value is None:
            if parse_decimal(text[1:]) is not None and text[0] == "-":
                raise ExternalDataError(f"negative {key} {text}", **where)
            if text.isascii() and text.isdigit():
                raise ExternalDataError(
                    f"{key} {text[:40]!r}... has {len(text)} digits; at most "
                    f"{MAX_DECIMAL_DIGITS} (2**64) are read", **where,
                )
            raise ExternalDataError(
                f"{key} {text[:40]!r} is not a plain decimal number (ASCII digits only)", **where
            )
    assert offset is not None
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ExternalDataError(f"negative dimension in dims {dims}", **where)
    count = math.prod(dims)
    expected = F.payload_nbytes(tensor.data_type, count)
    if length is None:
        if expected is None:
            raise ExternalDataError("external tensor without a length", **where)
        length = expected
    if expected is not None and expected != length:
        raise ExternalDataError(
            f"length {length} but dims {dims} of {F.DATA_TYPES[tensor.data_type][0]} "
            f"need {expected} bytes",
            **where,
        )
    size = remote_size if remote_size is not None else os.path.getsize(real)
    if offset + length > size:
        raise ExternalDataError(
            f"offset {offset} + length {length} runs past the end of "
            f"{keys['location']!r} ({size} bytes)",
            **where,
        )
    return Payload(
        id=ident, path=path, name=tensor.name, source=real, offset=offset, length=length,
        encoding="raw", number=F.TENSOR_RAW_DATA, data_type=tensor.data_type, count=count,
        nbytes=length, external=True, dims=tuple(dims),
    )


def _make_stub(tensor: onnx.TensorProto, ident: int) -> None:
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key = "location"
    entry.value = f"{MARKER}{ident}"
    tensor.data_location = tensor.EXTERNAL


def _unstub(tensor: onnx.TensorProto, payload: Payload) -> None:
    data = read_payload(payload)
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = data


def build_skeleton(
    buf: Any, size: int, source: str, threshold: int, *, for_conversion: bool = True
) -> Skeleton:
    """Scan the model in ``buf[:size]`` (stored in file *source*) into a skeleton.

    With *for_conversion*, the input's external-data references become stubs
    too and tensors whose values the converter reads are put back inline.

    Raises WireFormatError/LimitError for malformed input and
    ExternalDataError for unusable external-data references.
    """
    data, payloads = scan_payloads(buf, size, source, threshold)
    return analyze_skeleton(data, payloads, source, for_conversion=for_conversion)


def scan_payloads(
    buf: Any, size: int, source: str, threshold: int
) -> tuple[bytes, dict[int, Payload]]:
    """The wire phase: skeleton bytes with every payload over *threshold* stubbed.

    Needs neither onnx nor numpy (for raw and fixed-width payloads), so it can
    run, and payload copying can start, while those load.
    """
    stubber = _Stubber(buf, source, threshold)
    hooks = Hooks(enter=stubber.enter, tensor=stubber.tensor)
    rewritten = rewrite_message(buf, 0, size, "model", (), hooks)
    if rewritten is None:
        data = bytes(buf[0:size])
    else:
        data = b"".join(bytes(p) for p in rewritten.pieces)
    return data, stubber.payloads


def analyze_skeleton(
    data: bytes, payloads: dict[int, Payload], source: str, *, for_conversion: bool = True
) -> Skeleton:
    """The model phase: parse the skeleton bytes; stub external data; keep value reads.

    Raises WireFormatError if the bytes are not an ONNX model and
    ExternalDataError for unusable external-data references.
    """
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        if "depth" in str(e).lower() or "recursion" in str(e).lower():
            raise LimitError(
                "messages nested deeper than protobuf's limit of 100 levels"
            ) from e
        raise WireFormatError(f"not a valid ONNX model ({e})") from e
    if not model.HasField("graph"):
        raise WireFormatError("not an ONNX model: it has no graph")
    skeleton = Skeleton(data=data, model=model, payloads=payloads)
    if for_conversion:
        _restub_external(skeleton, source)
        _keep_value_reads(skeleton, source)
    return skeleton


def _restub_external(skeleton: Skeleton, source: str) -> None:
    """Turn the input's own external-data references into stubs."""
    # Each stub carries one "location" entry; more of them means external data.
    stubs = len(skeleton.payloads)
    if (
        skeleton.data.count(b"location") <= stubs
        and skeleton.data.count(b"\x70\x01") <= stubs
        and skeleton.data.count(MARKER_BYTES) == stubs
    ):
        return
    base = source if _remote(source) else os.path.dirname(os.path.abspath(source))
    ours = set(skeleton.payloads)
    for tensor, _, path in iter_stub_tensors(skeleton.model):
        if tensor.data_location != F.DATA_LOCATION_EXTERNAL:
            _refuse_reserved(tensor, source, path)
            continue
        ident = stub_id(tensor)
        if ident is not None and ident in ours:
            ours.discard(ident)  # each of the stubs made by the scan, once
            continue
        ident = len(skeleton.payloads) + 1
        skeleton.payloads[ident] = _external_payload(tensor, ident, base, source, path)
        _make_stub(tensor, ident)


def _refuse_reserved(tensor: onnx.TensorProto, source: str, path: str) -> None:
    """Refuse an inline tensor whose external_data names a stub location.

    Such a tensor is not external data, but the splicer finds stubs by their
    location; letting it through would hand it another tensor's payload.
    """
    for entry in tensor.external_data:
        value = entry.value
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value.startswith(MARKER):
            raise ExternalDataError(
                f"location {value!r} uses a reserved name (on a tensor whose data_location "
                "is not EXTERNAL)",
                file=source, path=f"{path} '{tensor.name}'" if tensor.name else path,
            )


def resolve_path(model: onnx.ModelProto, path: str) -> tuple[onnx.TensorProto, str]:
    """The tensor at field *path* (as the scanner names it) and the value name it defines.

    The value name is the tensor's name, or a Constant node's output for its
    ``value`` attribute.
    """
    obj: Any = model
    parents: list[Any] = []
    for part in path.split("."):
        name, _, index = part.partition("[")
        obj = getattr(obj, name)
        if index:
            obj = obj[int(index[:-1])]
        parents.append(obj)
    tensor = obj
    if len(parents) >= 3 and path.endswith(".t"):
        node, attr = parents[-3], parents[-2]
        if getattr(node, "op_type", None) == "Constant" and node.output and attr.name == "value":
            return tensor, node.output[0]
    return tensor, tensor.name


def _keep_value_reads(skeleton: Skeleton, source: str) -> None:
    """Put back inline every stubbed tensor whose value conversion reads.

    Raises LimitError for such a tensor over :data:`MAX_VALUE_READ` bytes.
    """
    if not skeleton.payloads:
        return
    readers = value_readers(skeleton.model)
    if not readers:
        return
    for ident, payload in list(skeleton.payloads.items()):
        tensor, value_name = resolve_path(skeleton.model, payload.path)
        reader = readers.get(value_name) if value_name else None
        if reader is None:
            continue
        if payload.nbytes > MAX_VALUE_READ:
            label = f"{payload.path} '{payload.name}'" if payload.name else payload.path
            raise LimitError(
                f"tensor of {payload.nbytes} bytes feeds {reader}, whose value conversion "
                f"reads; streamconv reads such values up to {MAX_VALUE_READ >> 20} MiB",
                file=source, path=label, offset=None if payload.external else payload.offset,
            )
        del skeleton.payloads[ident]
        log.debug("keeping value-read tensor %s inline (%d bytes)", payload.path, payload.nbytes)
        _unstub(tensor, payload)
