"""Write the output: skeleton bytes with every stub turned back into its payload.

The output is planned first (every piece and every enclosing length is known
before a byte is written), then written as a stream.  Payload bytes move
file-to-file with ``os.copy_file_range`` (falling back to ``os.sendfile``,
then to a bounded buffer); they never become one Python object.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import fields as F
from .errors import ConversionError, ExternalDataError, OutputError
from .scan import Hooks, Path, Rewrite, format_path, parse_tensor_fields, rewrite_message
from .skeleton import MARKER, MARKER_BYTES, Payload, iter_raw_chunks
from .wire import encode_len_header, encode_tag, encode_varint, read_field

__all__ = [
    "INLINE_LIMIT",
    "OutputPlan",
    "PayloadRef",
    "SidecarWriter",
    "plan_output",
    "write_plan",
]

#: Largest message protobuf will parse (2 GiB - 1).
INLINE_LIMIT = (1 << 31) - 1
COPY_CHUNK = 64 << 20
ZEROS = bytes(1 << 16)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PayloadRef:
    """A payload written in place of a stub: ``copy`` as stored, or as ``raw`` bytes."""

    payload: Payload
    mode: str

    @property
    def size(self) -> int:
        return self.payload.length if self.mode == "copy" else self.payload.nbytes


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
        for f in fields:
            if f.number == F.TENSOR_EXTERNAL_DATA and f.wire_type == F.WT_LEN:
                location = _entry_location(buf, f.value, f.end)
                if location is not None and location.startswith(MARKER):
                    try:
                        ident = int(location[len(MARKER):])
                    except ValueError:
                        ident = None
        if ident is None:
            return None
        payload = self.payloads.get(ident)
        if payload is None:
            raise ConversionError(
                f"stub {ident} has no payload (the converter made it up)", path=format_path(path)
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
    hooks = Hooks(enter=splicer.enter, tensor=splicer.tensor)
    model = rewrite_message(skeleton, 0, len(skeleton), "model", (), hooks)
    if model is None:
        model = Rewrite()
        model.add(skeleton)
    missing = sorted(set(payloads) - splicer.seen)
    if missing:
        lost = payloads[missing[0]]
        raise ConversionError(
            f"{len(missing)} tensor(s) lost in conversion, first '{lost.name}' ({lost.path})"
        )
    plan = OutputPlan(layout=layout, model=model, reused=splicer.reused)
    if layout == "external" and (splicer.sidecar or preplaced):
        plan.data_name = data_name
        plan.sidecar = splicer.sidecar
        plan.sidecar_size = splicer.cursor
        plan.sidecar_start = start
    return plan


class _Sources:
    """Open file descriptors of payload sources, by path."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self.fds:
            try:
                self.fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ExternalDataError(f"cannot open: {e.strerror}", file=path) from e
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _dirty_budget() -> int:
    """Bytes that can be written before the kernel starts background writeback.

    Buffered writes beyond it are throttled harder than in-kernel copies.
    """
    try:
        with open("/proc/sys/vm/dirty_background_ratio") as f:
            ratio = int(f.read())
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f
                             if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration):
        return 0
    return available * ratio // 100


class _Copier:
    """File-to-file copies: copy_file_range, then sendfile, then a buffer.

    copy_file_range between offsets that differ modulo the page size is much
    slower on common file systems than a read/write loop through one reused
    buffer (measured 1.5x on ext4), as long as the written data stays below
    the writeback threshold; such copies take the loop.
    """

    def __init__(self) -> None:
        self.method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.budget = _dirty_budget()
        self.buffer = bytearray(1 << 20)

    def copy(self, src: int, dst: int, offset: int, length: int, progress: Progress) -> None:
        end = offset + length
        pos = offset
        looped = False
        if self.budget >= length and (offset - os.lseek(dst, 0, os.SEEK_CUR)) % self.page:
            self.budget -= length
            looped = True
        while pos < end:
            want = min(COPY_CHUNK, end - pos)
            n = self._loop_some(src, dst, pos, want) if looped else self._copy_some(
                src, dst, pos, want
            )
            if n == 0:
                raise ExternalDataError(
                    f"source ended at byte {pos}, {end - pos} bytes short of the payload"
                )
            pos += n
            progress(n)

    def _copy_some(self, src: int, dst: int, pos: int, want: int) -> int:
        # Each method falls through to the next where the kernel or file system refuses it.
        for method, call, fallback in (
            ("copy_file_range", lambda: os.copy_file_range(src, dst, want, pos), "sendfile"),
            ("sendfile", lambda: os.sendfile(dst, src, pos, want), "buffer"),
        ):
            if self.method == method:
                try:
                    return call()
                except OSError as e:
                    if e.errno not in _FALLBACK_ERRNOS:
                        raise
                    self.method = fallback
        return self._loop_some(src, dst, pos, want)

    def _loop_some(self, src: int, dst: int, pos: int, want: int) -> int:
        view = memoryview(self.buffer)
        done = 0
        while done < want:
            n = os.preadv(src, [view[: min(len(view), want - done)]], pos + done)
            if n == 0:
                break
            _write_all(dst, view[:n])
            done += n
        return done


def _write_payload(
    ref_payload: Payload,
    mode: str,
    fd: int,
    sources: _Sources,
    copier: _Copier,
    progress: Progress,
    digest: Any = None,
) -> None:
    src = sources.fd(ref_payload.source)
    if digest is None and (mode == "copy" or ref_payload.encoding != "varint"):
        try:
            copier.copy(src, fd, ref_payload.offset, ref_payload.length, progress)
        except ExternalDataError as e:
            e.file = e.file or ref_payload.source
            e.path = e.path or ref_payload.path
            raise
        return
    for chunk in iter_raw_chunks(ref_payload, src):
        if digest is not None:
            digest.update(chunk)
        _write_all(fd, chunk)
        progress(len(chunk))


def _align(offset: int, payload: Payload, align: int, align_min: int) -> int:
    if payload.nbytes >= align_min and align > 1:
        return -(-offset // align) * align
    return offset


class SidecarWriter(threading.Thread):
    """Copies payloads into the data file in the background, in id order.

    Offsets are assigned up front (``offsets``, ``end``), so the skeleton can
    be converted and planned while the bytes move; the copy runs in the
    kernel and releases the GIL.  ``finish()`` waits and re-raises any error.
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
    ) -> None:
        super().__init__(name="streamconv-sidecar", daemon=True)
        self.payloads = sorted(payloads, key=lambda p: p.id)
        self.fd = fd
        self.checksum = checksum
        self.progress = progress or (lambda n: None)
        self.offsets: dict[int, int] = {}
        self.digests: dict[int, str] = {}
        cursor = 0
        for payload in self.payloads:
            cursor = _align(cursor, payload, align, align_min)
            self.offsets[payload.id] = cursor
            cursor += payload.nbytes
        self.end = cursor
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            # signals belong to the main thread, which cleans up
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        sources = _Sources()
        copier = _Copier()
        cursor = 0
        try:
            for payload in self.payloads:
                if self._stop_event.is_set():
                    return
                cursor = _pad(self.fd, cursor, self.offsets[payload.id])
                digest = hashlib.sha1(usedforsecurity=False) if self.checksum else None
                _write_payload(payload, "raw", self.fd, sources, copier, self.progress, digest)
                if digest is not None:
                    self.digests[payload.id] = digest.hexdigest()
                cursor += payload.nbytes
        except BaseException as e:  # handed to the main thread by finish()
            self.error = e
        finally:
            sources.close()

    def stop(self) -> None:
        """Ask the copy to stop after the current chunk; wait for it."""
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def finish(self) -> None:
        """Wait for every payload to be written; raise what went wrong."""
        self.join()
        if isinstance(self.error, OSError):
            raise OutputError(f"writing the output failed: {self.error.strerror or self.error}") \
                from self.error
        if self.error is not None:
            raise self.error


def _pad(fd: int, cursor: int, offset: int) -> int:
    while cursor < offset:
        gap = min(len(ZEROS), offset - cursor)
        _write_all(fd, ZEROS[:gap])
        cursor += gap
    return cursor


def write_plan(
    plan: OutputPlan,
    model_fd: int,
    data_fd: int | None,
    progress: Progress | None = None,
    digests: dict[int, str] | None = None,
) -> None:
    """Write the planned model to *model_fd* and its sidecar to *data_fd*.

    *data_fd* is positioned at ``plan.sidecar_start``; *digests* holds the
    checksums of payloads a SidecarWriter already wrote.  Raises OutputError
    when writing fails (no space, I/O error) and ExternalDataError when a
    payload source is shorter than recorded.
    """
    report = progress or (lambda n: None)
    sources = _Sources()
    copier = _Copier()
    wants_digest = any(isinstance(piece, ChecksumSlot) for piece in plan.model.pieces)
    digests = dict(digests or {})
    try:
        if plan.sidecar:
            assert data_fd is not None
            cursor = plan.sidecar_start
            for offset, payload in plan.sidecar:
                cursor = _pad(data_fd, cursor, offset)
                digest = hashlib.sha1(usedforsecurity=False) if wants_digest else None
                _write_payload(payload, "raw", data_fd, sources, copier, report, digest)
                if digest is not None:
                    digests[payload.id] = digest.hexdigest()
                cursor += payload.nbytes
        for piece in plan.model.pieces:
            if isinstance(piece, PayloadRef):
                _write_payload(piece.payload, piece.mode, model_fd, sources, copier, report)
            elif isinstance(piece, ChecksumSlot):
                data = _entry("checksum", digests[piece.payload.id])
                _write_all(model_fd, data)
                report(len(data))
            else:
                _write_all(model_fd, piece)
                report(len(piece))
    except OSError as e:
        raise OutputError(f"writing the output failed: {e.strerror or e}") from e
    finally:
        sources.close()
