"""Plan the output: skeleton bytes with every stub turned back into its payload.

The output is planned first (every piece and every enclosing length is known
before a byte is written), then written as a stream by :mod:`.writer`, whose
copies never make payload bytes one Python object.  Inline output can also
be planned weights first (:func:`plan_prefix`, :func:`plan_tail`), so that
payloads are written before conversion ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import fields as F
from .errors import ConversionError, OutputError
from .scan import (
    Hooks,
    Path,
    Rewrite,
    format_path,
    parse_tensor_fields,
    read_packed_varints,
    rewrite_message,
)
from .skeleton import MARKER, MARKER_BYTES, Payload
from .wire import encode_len_header, encode_tag, encode_varint, read_field
from .writer import Background, Gap, PayloadRef, stream_pieces, write_pieces

__all__ = [
    "INLINE_LIMIT",
    "OutputPlan",
    "PayloadRef",
    "Prefix",
    "SidecarWriter",
    "Tail",
    "encode_padded_varint",
    "plan_output",
    "plan_prefix",
    "plan_tail",
    "split_converted",
    "stream_plan",
    "write_plan",
]

#: Largest message protobuf will parse (2 GiB - 1).
INLINE_LIMIT = (1 << 31) - 1

Progress = Callable[[int], None]


@dataclass
class OutputPlan:
    """Everything needed to write the output, sizes known in advance."""

    layout: str
    model: Rewrite
    data_name: str | None = None
    sidecar: list[tuple[int, Payload]] = field(default_factory=list)
    sidecar_size: int = 0
    #: where the planned sidecar entries start (after those written early)
    sidecar_start: int = 0
    reused: int = 0

    @property
    def model_size(self) -> int:
        return self.model.length

    @property
    def has_data(self) -> bool:
        """Whether the output has a data file of its own (written by this plan or earlier)."""
        return bool(self.sidecar or self.sidecar_size)


@dataclass(frozen=True)
class ChecksumSlot:
    """The ``checksum`` entry of a payload, filled in once its bytes are written."""

    payload: Payload

    @property
    def size(self) -> int:
        return len(_entry("checksum", "0" * 40))


def _entry(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    body = encode_len_header(F.ENTRY_KEY, len(k)) + k + encode_len_header(F.ENTRY_VALUE, len(v)) + v
    return encode_len_header(F.TENSOR_EXTERNAL_DATA, len(body)) + body


def _describe(dims: list[int], data_type: int) -> str:
    name = F.DATA_TYPES.get(data_type, (f"data type {data_type}", 0))[0]
    return f"dims {dims} of {name}"


def _entry_location(buf: Any, start: int, end: int) -> str | None:
    key = value = None
    pos = start
    while pos < end:
        number, wire_type, a, b, pos = read_field(buf, pos, end)
        if wire_type == F.WT_LEN and number == F.ENTRY_KEY:
            key = bytes(buf[a:b])
        elif wire_type == F.WT_LEN and number == F.ENTRY_VALUE:
            value = bytes(buf[a:b])
    if key == b"location" and value is not None:
        return value.decode("utf-8", "replace")
    return None


class _Splicer:
    def __init__(
        self,
        payloads: dict[int, Payload],
        layout: str,
        data_name: str | None,
        align: int,
        align_min: int,
        preserve: bool,
        checksum: bool,
        allow_duplicates: bool,
        reuse_dir: str | None,
        preplaced: dict[int, int] | None = None,
        start: int = 0,
    ) -> None:
        self.payloads = payloads
        self.layout = layout
        self.data_name = data_name
        self.align = align
        self.align_min = align_min
        self.preserve = preserve
        self.checksum = checksum
        self.allow_duplicates = allow_duplicates
        self.reuse_dir = reuse_dir
        self.reused = 0
        self.placed: dict[int, int] = dict(preplaced or {})
        self.seen: set[int] = set()
        self.sidecar: list[tuple[int, Payload]] = []
        self.cursor = start

    def enter(self, buf: Any, start: int, end: int) -> bool:
        return bool(buf.find(MARKER_BYTES, start, end) != -1)

    def tensor(self, buf: Any, start: int, end: int, path: Path) -> Rewrite | None:
        fields = parse_tensor_fields(buf, start, end)
        ident = None
        marker = None
        external = False
        dims: list[int] = []
        data_type = 0
        for f in fields:
            if f.number == F.TENSOR_EXTERNAL_DATA and f.wire_type == F.WT_LEN:
                location = _entry_location(buf, f.value, f.end)
                if location is not None and location.startswith(MARKER):
                    marker = location
                    try:
                        ident = int(location[len(MARKER):])
                    except ValueError:
                        ident = None
            elif f.number == F.TENSOR_DATA_LOCATION and f.wire_type == F.WT_VARINT:
                external = f.value == F.DATA_LOCATION_EXTERNAL  # the last one counts
            elif f.number == F.TENSOR_DIMS and f.wire_type == F.WT_VARINT:
                dims.append(f.value)
            elif f.number == F.TENSOR_DIMS and f.wire_type == F.WT_LEN:
                dims.extend(read_packed_varints(buf, f.value, f.end))
            elif f.number == F.TENSOR_DATA_TYPE and f.wire_type == F.WT_VARINT:
                data_type = f.value
        if marker is None:
            return None
        where = format_path(path)
        if not external:
            # neither a stub nor the input's own data (the skeleton refuses those):
            # taking it for one would give it some other tensor's payload
            raise ConversionError(
                f"tensor carries the reserved location {marker!r} but not "
                "data_location EXTERNAL", path=where,
            )
        if ident is None:
            raise ConversionError(f"malformed stub location {marker!r}", path=where)
        payload = self.payloads.get(ident)
        if payload is None:
            raise ConversionError(
                f"stub {ident} has no payload (the converter made it up)", path=where
            )
        if tuple(dims) != payload.dims or data_type != payload.data_type:
            raise ConversionError(
                f"tensor '{payload.name}' ({payload.path}) came back from conversion as "
                f"{_describe(dims, data_type)}, but its payload holds "
                f"{_describe(list(payload.dims), payload.data_type)}",
                path=where,
            )
        if ident in self.seen and not self.allow_duplicates:
            raise ConversionError(
                f"tensor '{payload.name}' ({payload.path}) came back twice from conversion",
                path=format_path(path),
            )
        self.seen.add(ident)
        out = Rewrite()
        placed = False
        for f in fields:
            if f.number in (F.TENSOR_EXTERNAL_DATA, F.TENSOR_DATA_LOCATION):
                if not placed:
                    self._place(out, payload)
                    placed = True
                continue
            out.add(bytes(buf[f.field_start:f.field_end]))
        return out

    def _reusable(self, payload: Payload) -> str | None:
        """The input data file's location relative to the output, if it can be referenced."""
        if self.reuse_dir is None or not payload.external:
            return None
        rel = os.path.relpath(payload.source, self.reuse_dir)
        if rel.startswith("..") or os.path.isabs(rel):
            return None
        return rel.replace(os.sep, "/")

    def _place(self, out: Rewrite, payload: Payload) -> None:
        reuse = self._reusable(payload) if self.layout == "external" else None
        if reuse is not None:
            self.reused += 1
            out.add(_entry("location", reuse))
            out.add(_entry("offset", str(payload.offset)))
            out.add(_entry("length", str(payload.nbytes)))
            out.add(encode_tag(F.TENSOR_DATA_LOCATION, F.WT_VARINT))
            out.add(encode_varint(F.DATA_LOCATION_EXTERNAL))
            return
        if self.layout == "external":
            offset = self.placed.get(payload.id, -1)
            if offset < 0:  # a payload referenced twice (inlined functions) is stored once
                offset = _align(self.cursor, payload, self.align, self.align_min)
                self.sidecar.append((offset, payload))
                self.placed[payload.id] = offset
                self.cursor = offset + payload.nbytes
            assert self.data_name is not None
            out.add(_entry("location", self.data_name))
            out.add(_entry("offset", str(offset)))
            out.add(_entry("length", str(payload.nbytes)))
            if self.checksum:
                out.add(ChecksumSlot(payload))
            out.add(encode_tag(F.TENSOR_DATA_LOCATION, F.WT_VARINT))
            out.add(encode_varint(F.DATA_LOCATION_EXTERNAL))
        elif self.preserve:
            out.add(payload.header)
            out.add(PayloadRef(payload, "copy"))
        else:
            out.add(encode_len_header(F.TENSOR_RAW_DATA, payload.nbytes))
            out.add(PayloadRef(payload, "raw"))


def _splice_message(data: bytes, kind: str, path: Path, splicer: _Splicer) -> Rewrite:
    """The message of *kind* in *data* with every stub replaced."""
    hooks = Hooks(enter=splicer.enter, tensor=splicer.tensor)
    new = rewrite_message(data, 0, len(data), kind, path, hooks)
    if new is None:
        new = Rewrite()
        new.add(data)
    return new


def _check_all_placed(payloads: dict[int, Payload], seen: set[int]) -> None:
    missing = sorted(set(payloads) - seen)
    if missing:
        lost = payloads[missing[0]]
        raise ConversionError(
            f"{len(missing)} tensor(s) lost in conversion, first '{lost.name}' ({lost.path})"
        )


def plan_output(
    skeleton: bytes,
    payloads: dict[int, Payload],
    layout: str,
    *,
    data_name: str | None = None,
    align: int = 1 << 16,
    align_min: int = 1 << 20,
    preserve: bool = False,
    checksum: bool = False,
    allow_duplicates: bool = False,
    reuse_dir: str | None = None,
    preplaced: dict[int, int] | None = None,
    start: int = 0,
) -> OutputPlan:
    """Plan the output of *skeleton* with every stub replaced, for *layout*.

    ``layout`` is ``inline``, ``external`` or ``auto`` (inline when the result
    stays under 2 GiB).  With *checksum*, external tensors carry their SHA-1.
    Raises ConversionError if a stub is missing from the skeleton or appears
    twice (unless *allow_duplicates*).  With *reuse_dir* (the output's folder),
    payloads already in the input's external-data files below that folder are
    referenced in place instead of copied.  *preplaced* maps payload ids to
    the sidecar offsets a :class:`SidecarWriter` already gave them; further
    payloads go after *start*.
    """
    if layout == "auto":
        plan = plan_output(
            skeleton, payloads, "inline", preserve=preserve, allow_duplicates=allow_duplicates
        )
        if plan.model_size <= INLINE_LIMIT:
            return plan
        layout = "external"
    splicer = _Splicer(
        payloads, layout, data_name, align, align_min, preserve, checksum, allow_duplicates,
        reuse_dir, preplaced, start,
    )
    model = _splice_message(skeleton, "model", (), splicer)
    _check_all_placed(payloads, splicer.seen)
    plan = OutputPlan(layout=layout, model=model, reused=splicer.reused)
    if layout == "external" and (splicer.sidecar or preplaced):
        plan.data_name = data_name
        plan.sidecar = splicer.sidecar
        plan.sidecar_size = splicer.cursor
        plan.sidecar_start = start
    return plan


def _align(offset: int, payload: Payload, align: int, align_min: int) -> int:
    if payload.nbytes >= align_min and align > 1:
        return -(-offset // align) * align
    return offset


def _sidecar_pieces(placed: list[tuple[int, Payload]], start: int) -> list[Any]:
    """Gaps and payloads that put each payload at its offset in a data file, from *start*."""
    pieces: list[Any] = []
    cursor = start
    for offset, payload in placed:
        if offset > cursor:
            pieces.append(Gap(offset - cursor))
        pieces.append(PayloadRef(payload, "raw"))
        cursor = offset + payload.nbytes
    return pieces


class SidecarWriter:
    """Copies payloads into the data file in the background, in id order.

    Offsets are assigned up front (``offsets``, ``end``), so the skeleton can
    be converted and planned while the bytes move.  ``finish()`` waits and
    re-raises any error; ``digests`` then holds the SHA-1 of each payload
    when *checksum* was asked for.
    """

    def __init__(
        self,
        payloads: list[Payload],
        fd: int,
        *,
        align: int,
        align_min: int,
        checksum: bool,
        progress: Progress | None,
        writeback: bool = False,
    ) -> None:
        self.offsets: dict[int, int] = {}
        self.digests: dict[int, str] = {}
        placed = []
        cursor = 0
        for payload in sorted(payloads, key=lambda p: p.id):
            cursor = _align(cursor, payload, align, align_min)
            self.offsets[payload.id] = cursor
            placed.append((cursor, payload))
            cursor += payload.nbytes
        self.end = cursor
        ids = frozenset(self.offsets) if checksum else frozenset()
        self._background = Background(fd, _sidecar_pieces(placed, 0), digest_ids=ids,
                                      progress=progress, writeback=writeback)

    @property
    def mode(self) -> str:
        """``process`` or ``thread``: where the copy runs."""
        return self._background.mode

    def start(self) -> None:
        self._background.start()

    def finish(self) -> None:
        """Wait for every payload to be written; raise what went wrong."""
        self.digests = self._background.finish()

    def stop(self) -> None:
        """Abandon the copy; wait for the worker to end."""
        self._background.stop()


def _resolve_checksums(pieces: list[Any], digests: dict[int, str]) -> list[Any]:
    return [_entry("checksum", digests[p.payload.id]) if isinstance(p, ChecksumSlot) else p
            for p in pieces]


def write_plan(
    plan: OutputPlan,
    model_fd: int,
    data_fd: int | None,
    progress: Progress | None = None,
    digests: dict[int, str] | None = None,
    *,
    writeback: bool = False,
) -> None:
    """Write the planned model to *model_fd* and its sidecar to *data_fd*.

    *data_fd* is positioned at ``plan.sidecar_start``; *digests* holds the
    checksums of payloads a SidecarWriter already wrote; *writeback*: the
    files will be fsynced (see :func:`streamconv.writer.start_writeback`).  Raises OutputError
    when writing fails (no space, I/O error) and ExternalDataError when a
    payload source is shorter than recorded.
    """
    report = progress or (lambda n: None)
    wants_digest = any(isinstance(piece, ChecksumSlot) for piece in plan.model.pieces)
    digests = dict(digests or {})
    try:
        if plan.sidecar:
            assert data_fd is not None
            ids = frozenset(p.id for _, p in plan.sidecar) if wants_digest else frozenset()
            digests.update(write_pieces(
                data_fd, _sidecar_pieces(plan.sidecar, plan.sidecar_start), report,
                digest_ids=ids, writeback=writeback,
            ))
        write_pieces(model_fd, _resolve_checksums(plan.model.pieces, digests), report,
                     writeback=writeback)
    except OSError as e:
        raise OutputError(f"writing the output failed: {e.strerror or e}") from e


def stream_plan(
    plan: OutputPlan,
    create: Callable[[str | None, int], Any],
    progress: Progress | None = None,
) -> None:
    """Write the planned output in order to uploads: the sidecar first, then the model.

    ``create(name, size)`` opens the object of *size* bytes for the sidecar
    *name*, or the model for None, and returns something with ``write``.
    Every byte is written once, in order (see
    :func:`streamconv.writer.stream_pieces`).  Raises OutputError
    when reading a local source fails and ExternalDataError when a source is short.
    """
    report = progress or (lambda n: None)
    wants_digest = any(isinstance(piece, ChecksumSlot) for piece in plan.model.pieces)
    digests: dict[int, str] = {}
    try:
        if plan.sidecar:
            assert plan.data_name is not None
            ids = frozenset(p.id for _, p in plan.sidecar) if wants_digest else frozenset()
            digests = stream_pieces(create(plan.data_name, plan.sidecar_size),
                                    _sidecar_pieces(plan.sidecar, plan.sidecar_start), report,
                                    digest_ids=ids)
        stream_pieces(create(None, plan.model_size),
                      _resolve_checksums(plan.model.pieces, digests), report)
    except OSError as e:
        raise OutputError(f"writing the output failed: {e.strerror or e}") from e


# -- inline output, weights first ---------------------------------------------
#
# An inline model is normally written in one pass after conversion, because
# the converted skeleton decides where every payload lands.  Fields of a
# protobuf message may come in any order, though, so the output can start
# with the graph field holding the graph's initializers, whose bytes are known
# as soon as the input is scanned.  Their payloads are copied while onnx
# loads and converts; the rest of the graph and the model's other fields
# follow, and the graph's length, reserved as a varint padded to a fixed
# width, is written last.  If conversion changed any of those initializers
# the output is written the usual way instead.


def encode_padded_varint(value: int, width: int) -> bytes:
    """*value* as a varint of exactly *width* bytes (continuation bits as padding).

    Raises ValueError if it does not fit.
    """
    if value < 0 or width < 1 or width > 10 or value >= 1 << (7 * width):
        raise ValueError(f"{value} does not fit in a {width}-byte varint")
    out = bytearray()
    for i in range(width):
        byte = (value >> (7 * i)) & 0x7F
        out.append(byte | (0x80 if i < width - 1 else 0))
    return bytes(out)


@dataclass
class Prefix:
    """The graph's initializers, payloads included, as the inline output's first bytes.

    The output starts with the graph field's tag and a length padded to
    ``width`` bytes (``header_size`` in all), then ``pieces``: the graph's
    ``count`` initializers, ``length`` bytes in all.
    """

    pieces: list[Any]
    length: int
    count: int
    ids: frozenset[int]
    payload_bytes: int
    width: int

    @property
    def header_size(self) -> int:
        return 1 + self.width

    def header(self, graph_length: int) -> bytes:
        """The graph field's tag and padded length, once the length is known."""
        return encode_tag(F.MODEL_GRAPH, F.WT_LEN) + encode_padded_varint(graph_length, self.width)


def _find_field(buf: Any, start: int, end: int, number: int) -> tuple[int, int] | None:
    pos = start
    while pos < end:
        num, wire_type, a, b, pos = read_field(buf, pos, end)
        if num == number and wire_type == F.WT_LEN:
            return a, b
    return None


def _is_external(fields: list[Any]) -> bool:
    return any(f.number == F.TENSOR_EXTERNAL_DATA or (
        f.number == F.TENSOR_DATA_LOCATION and f.wire_type == F.WT_VARINT
        and f.value == F.DATA_LOCATION_EXTERNAL) for f in fields)


def plan_prefix(data: bytes, payloads: dict[int, Payload]) -> Prefix | None:
    """Plan the inline output's first bytes from the scanned skeleton *data*.

    Returns None when there is nothing worth writing early (no payload among
    the graph's initializers) or when an initializer refers to the input's
    own external data (those are only resolved after onnx loads).
    """
    graph = _find_field(data, 0, len(data), F.MODEL_GRAPH)
    if graph is None:
        return None
    splicer = _Splicer(payloads, "inline", None, 1, 1, False, False, False, None)
    pieces = Rewrite()
    count = 0
    pos, end = graph
    try:
        while pos < end:
            number, wire_type, a, b, pos = read_field(data, pos, end)
            if number != F.GRAPH_INITIALIZER or wire_type != F.WT_LEN:
                continue
            new = splicer.tensor(data, a, b, ("graph", f"initializer[{count}]"))
            if new is None:
                if _is_external(parse_tensor_fields(data, a, b)):
                    return None
                new = Rewrite()
                new.add(data[a:b])
            pieces.add(encode_len_header(F.GRAPH_INITIALIZER, new.length))
            pieces.extend(new)
            count += 1
    except ConversionError:  # a stub seen twice: left to the usual path to report
        return None
    payload_bytes = sum(payloads[i].nbytes for i in splicer.seen)
    if not payload_bytes:
        return None
    # 5 bytes hold lengths up to 32 GiB, and are what protobuf's C++ parser
    # reads for a length; beyond that the full 10.
    width = 5 if pieces.length < 1 << 34 else 10
    return Prefix(pieces.pieces, pieces.length, count, frozenset(splicer.seen),
                  payload_bytes, width)


def split_converted(model: bytes, count: int) -> tuple[bytes, bytes] | None:
    """A serialized model's graph without its first *count* initializers, and the
    model's other fields.

    Returns None when the model has no graph or fewer initializers.
    """
    graph: tuple[int, int] | None = None
    rest = bytearray()
    pos = 0
    while pos < len(model):
        field_start = pos
        number, wire_type, a, b, pos = read_field(model, pos, len(model))
        if number == F.MODEL_GRAPH and wire_type == F.WT_LEN and graph is None:
            graph = (a, b)
        else:
            rest += model[field_start:pos]
    if graph is None:
        return None
    skipped = 0
    graph_rest = bytearray()
    pos, end = graph
    while pos < end:
        field_start = pos
        number, wire_type, a, b, pos = read_field(model, pos, end)
        if number == F.GRAPH_INITIALIZER and wire_type == F.WT_LEN and skipped < count:
            skipped += 1
        else:
            graph_rest += model[field_start:pos]
    if skipped < count:
        return None
    return bytes(graph_rest), bytes(rest)


@dataclass
class Tail:
    """What follows the prefix: the rest of the graph, then the model's other fields."""

    graph: Rewrite
    model: Rewrite


def plan_tail(
    graph_rest: bytes,
    model_rest: bytes,
    payloads: dict[int, Payload],
    prefix: Prefix,
    *,
    allow_duplicates: bool = False,
) -> Tail:
    """Plan the inline output after *prefix*, every other stub replaced by its payload.

    Raises ConversionError if a stub is lost or appears twice (unless
    *allow_duplicates*).
    """
    splicer = _Splicer(payloads, "inline", None, 1, 1, False, False, allow_duplicates, None)
    splicer.seen.update(prefix.ids)
    graph = _splice_message(graph_rest, "graph", ("graph",), splicer)
    model = _splice_message(model_rest, "model", (), splicer)
    _check_all_placed(payloads, splicer.seen)
    return Tail(graph=graph, model=model)
