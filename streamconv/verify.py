"""Check every external-data reference of a model without loading its weights.

``python -m streamconv verify model.onnx`` reads the model as a stream (inline
models past 2 GiB included), finds every tensor stored as external data, and
checks each reference the way the converter would before reading it: the
location is a relative path to a regular file inside the model's folder (no
absolute paths, ``..``, symlinks or hard links leading out), offset + length
lie within the file, and length equals dims × element size.  Where the tensor
carries a ``checksum`` (the SHA-1 of its bytes, as written by ``--checksum``),
its bytes are hashed in bounded chunks and compared.  Inline tensors are only
counted.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import onnx
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from .api import mapped_input
from .errors import ExternalDataError, StreamconvError, UsageError, one_line
from .skeleton import (
    MARKER,
    Payload,
    _external_payload,
    build_skeleton,
    parse_decimal,
    stub_id,
)

__all__ = [
    "TensorCheck",
    "VerifyReport",
    "iter_tensors",
    "one_line",
    "verify_model",
]

#: Inline payloads above this many bytes stay in the file while the model is read.
SCAN_THRESHOLD = 1024
#: Bytes hashed per read.
HASH_CHUNK = 8 << 20

_SHA1_HEX = re.compile(r"[0-9a-fA-F]{40}")

#: progress(bytes_hashed, bytes_to_hash)
VerifyProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class TensorCheck:
    """What verify found for one external tensor.

    ``problem`` is None when the reference is sound; ``checksum`` is ``ok``,
    ``absent`` (no checksum key), ``skipped`` (hashing switched off, or a
    problem was found first) or ``mismatch``.
    """

    path: str
    name: str
    location: str
    offset: int | None
    length: int | None
    checksum: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        """One line: status, field path, tensor name, where its bytes are, and the verdict."""
        label = f"{self.path} '{self.name}'" if self.name else self.path
        where = f"{self.location!r}"
        if self.offset is not None and self.length is not None:
            where += f" offset {self.offset} length {self.length}"
        if self.problem is None:
            return one_line(f"ok       {label}: {where}, checksum {self.checksum}")
        return one_line(f"PROBLEM  {label}: {where}: {self.problem}")


@dataclass
class VerifyReport:
    """Every external tensor of a model and how its reference fared."""

    model: str
    tensors: list[TensorCheck] = field(default_factory=list)
    inline: int = 0
    bytes_hashed: int = 0

    @property
    def ok(self) -> bool:
        """True when no external tensor has a problem."""
        return all(t.ok for t in self.tensors)

    @property
    def problems(self) -> list[TensorCheck]:
        return [t for t in self.tensors if not t.ok]

    def summary(self) -> str:
        """One line: counts of external tensors, problems, inline tensors, bytes hashed."""
        bad = len(self.problems)
        verdict = "all ok" if bad == 0 else f"{bad} with problems"
        hashed = sum(1 for t in self.tensors if t.checksum == "ok")
        return (
            f"{self.model}: {len(self.tensors)} external tensor(s), {verdict}; "
            f"{hashed} checksum(s) verified ({self.bytes_hashed} bytes hashed); "
            f"{self.inline} inline tensor(s)"
        )


def _tensor_bearing(root: Descriptor) -> set[str]:
    """Full names of the message types reachable from *root* that can contain a TensorProto."""
    tensor = onnx.TensorProto.DESCRIPTOR.full_name
    children: dict[str, set[str]] = {}
    todo = [root]
    while todo:
        d = todo.pop()
        if d.full_name in children:
            continue
        kids = {f.message_type for f in d.fields if f.type == FieldDescriptor.TYPE_MESSAGE}
        children[d.full_name] = {k.full_name for k in kids}
        todo.extend(kids)
    bearing = {tensor}
    changed = True
    while changed:  # a fixed point: message types refer to each other in cycles
        changed = False
        for name, kids in children.items():
            if name not in bearing and kids & bearing:
                bearing.add(name)
                changed = True
    return bearing


def _is_repeated(f: FieldDescriptor) -> bool:
    # ``is_repeated`` replaced ``label`` in newer protobuf releases.
    flag = getattr(f, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(f.label == FieldDescriptor.LABEL_REPEATED)


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto anywhere in *model* with its field path, in field order.

    Walks the message tree with an explicit stack, so depth costs no Python
    stack; every message type that can hold a tensor is entered (initializers,
    attributes, subgraphs, sparse tensors, functions, training graphs).
    """
    bearing = _tensor_bearing(model.DESCRIPTOR)
    cache: dict[str, list[FieldDescriptor]] = {}
    stack: list[tuple[Message, str]] = [(model, "")]
    while stack:
        message, path = stack.pop()
        if isinstance(message, onnx.TensorProto):
            yield message, path or "model"
            continue
        name = message.DESCRIPTOR.full_name
        if name not in cache:
            cache[name] = [
                f for f in message.DESCRIPTOR.fields
                if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name in bearing
            ]
        children: list[tuple[Message, str]] = []
        for f in cache[name]:
            prefix = f"{path}.{f.name}" if path else f.name
            if _is_repeated(f):
                children.extend(
                    (child, f"{prefix}[{i}]") for i, child in enumerate(getattr(message, f.name))
                )
            elif message.HasField(f.name):
                children.append((getattr(message, f.name), prefix))
        stack.extend(reversed(children))


class _Hasher:
    """SHA-1 of byte ranges, read in bounded chunks from files opened once."""

    def __init__(self, progress: VerifyProgress | None, total: int) -> None:
        self.fds: dict[str, int] = {}
        self.progress = progress
        self.total = total
        self.done = 0

    def sha1(self, source: str, offset: int, length: int) -> str:
        if source not in self.fds:
            self.fds[source] = os.open(source, os.O_RDONLY)
        fd = self.fds[source]
        digest = hashlib.sha1(usedforsecurity=False)
        pos, end = offset, offset + length
        while pos < end:
            data = os.pread(fd, min(HASH_CHUNK, end - pos), pos)
            if not data:
                raise ExternalDataError(
                    f"file ended at byte {pos}, {end - pos} bytes before the tensor's end"
                )
            digest.update(data)
            pos += len(data)
            self.done += len(data)
            if self.progress is not None:
                self.progress(self.done, self.total)
        return digest.hexdigest()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _keys(tensor: onnx.TensorProto) -> dict[str, str]:
    """The external-data entries as text (protobuf hands invalid UTF-8 over as bytes)."""
    return {_text(entry.key): _text(entry.value) for entry in tensor.external_data}


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _reserved(tensor: onnx.TensorProto) -> str | None:
    """A problem when the location is the one streamconv reserves for its stubs."""
    location = _keys(tensor).get("location", "")
    if location.startswith(MARKER):
        return f"location {location!r} is reserved for streamconv's stubs"
    return None


def _undecodable(tensor: onnx.TensorProto) -> str | None:
    """A problem when a key or value is not valid UTF-8 (protobuf hands those over as bytes).

    As in ONNX and the converter, a later entry replaces an earlier one with the
    same key, so only the entries that take effect are judged.
    """
    entries = {entry.key: entry.value for entry in tensor.external_data}
    for key, value in entries.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return f"external-data entry {_text(key)!r}: {_text(value)!r} is not valid UTF-8"
    return None




def verify_model(
    path: str | os.PathLike[str],
    *,
    checksums: bool = True,
    progress: VerifyProgress | None = None,
) -> VerifyReport:
    """Check every external-data reference of the model at *path*.

    Each external tensor gets a :class:`TensorCheck`; every check but the
    checksum is made before any byte of the data file is read, and checksums
    are computed in chunks of :data:`HASH_CHUNK` bytes, so memory stays bounded
    whatever the size of the weights.  With ``checksums=False`` no data byte is
    read at all.  ``progress(done, total)`` follows the bytes hashed.

    Raises StreamconvError (WireFormatError, LimitError, …) when the model
    itself cannot be read; problems with references are reported, not raised.
    """
    model_path = os.fspath(path)
    if "://" in model_path:
        from .storage import is_url

        if is_url(model_path):
            raise UsageError("verify takes local model files only (a remote model's "
                             "references are checked when it converts)", file=model_path)
    with mapped_input(model_path) as (buf, size):
        try:
            skeleton = build_skeleton(buf, size, model_path, SCAN_THRESHOLD, for_conversion=False)
        except StreamconvError as e:
            raise e.with_file(model_path) from e.__cause__

    report = VerifyReport(model=model_path)
    base = os.path.dirname(os.path.abspath(model_path))
    external: list[tuple[onnx.TensorProto, str]] = []
    for tensor, tensor_path in iter_tensors(skeleton.model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.append((tensor, tensor_path))
        else:
            report.inline += 1
    # Stubs stand for inline payloads set aside while reading the model.  An input
    # may itself carry the reserved stub location; each stub id therefore counts
    # once, for the tensor at the payload's own path when there is one.
    owner: dict[int, int] = {}
    for index, (tensor, tensor_path) in enumerate(external):
        if _undecodable(tensor) is not None:
            continue
        ident = stub_id(tensor)
        if ident is None or ident not in skeleton.payloads:
            continue
        if ident not in owner or tensor_path == skeleton.payloads[ident].path:
            owner[ident] = index
    stubs = set(owner.values())
    report.inline += len(stubs)
    pending: list[tuple[onnx.TensorProto, str, Payload | None, str | None]] = []
    for index, (tensor, tensor_path) in enumerate(external):
        if index in stubs:
            continue
        payload: Payload | None = None
        problem = _undecodable(tensor) or _reserved(tensor)
        if problem is None:
            try:  # the converter's own checks: verify accepts exactly what convert reads
                payload = _external_payload(tensor, 0, base, model_path, tensor_path)
            except ExternalDataError as e:
                problem = e.message
        pending.append((tensor, tensor_path, payload, problem))

    to_hash = sum(
        p.length for t, _, p, _ in pending
        if checksums and p is not None and "checksum" in _keys(t)
    )
    hasher = _Hasher(progress, to_hash)
    try:
        for tensor, tensor_path, payload, problem in pending:
            report.tensors.append(
                _check_one(tensor, tensor_path, payload, problem, checksums, hasher)
            )
    finally:
        hasher.close()
    report.bytes_hashed = hasher.done
    return report


def _check_one(
    tensor: onnx.TensorProto,
    path: str,
    payload: Payload | None,
    problem: str | None,
    checksums: bool,
    hasher: _Hasher,
) -> TensorCheck:
    keys = _keys(tensor)
    location = keys.get("location", "")
    offset = payload.offset if payload is not None else parse_decimal(keys.get("offset", "0"))
    length = payload.length if payload is not None else parse_decimal(keys.get("length"))
    expected = keys.get("checksum")

    def result(checksum: str, why: str | None) -> TensorCheck:
        return TensorCheck(path, _text(tensor.name), location, offset, length, checksum, why)

    if payload is None:
        return result("skipped", problem)
    if expected is None:
        return result("absent", None)
    if not _SHA1_HEX.fullmatch(expected):
        return result("skipped", f"checksum {expected[:64]!r} is not a SHA-1 hex digest")
    if not checksums:
        return result("skipped", None)
    try:
        actual = hasher.sha1(payload.source, payload.offset, payload.length)
    except ExternalDataError as e:
        return result("skipped", e.message)
    except OSError as e:
        return result("skipped", f"reading {location!r} failed: {e.strerror or e}")
    if actual != expected.lower():
        return result("mismatch", f"checksum mismatch: recorded {expected}, data has {actual}")
    return result("ok", None)
