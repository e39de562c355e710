"""Move bytes into the output: payload copies, and copies that run in the background.

Payload bytes go file-to-file: ``os.copy_file_range`` where source and
destination offsets agree modulo the page size, a read/write loop through one
reused buffer where they do not.  They never become one Python object.

A :class:`Background` write lets payloads move while onnx imports and the
skeleton converts.  It runs in a forked process when the caller is
single-threaded (the command line, batch workers): a thread would have to take
the interpreter lock between every two chunks while the main thread is busy
importing, which measured about 1.7x slower than the copy alone; a forked
process copies at full speed on the other core.  Elsewhere it runs in a thread.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import signal
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import errors
from .errors import ExternalDataError, OutputError, StreamconvError
from .skeleton import Payload, iter_raw_chunks, read_at

__all__ = [
    "BUFFER_SIZE",
    "Background",
    "Gap",
    "PayloadRef",
    "Sources",
    "stream_pieces",
    "write_pieces",
]

#: Size of the read/write loop's buffer.  Not a power of two on purpose: writes
#: that start on 1 MiB boundaries make the page cache allocate large folios,
#: which measured 5-10x slower than the same copy in 1 MiB - 4 KiB steps here
#: (Linux 6.18, ext4) once memory is fragmented.
BUFFER_SIZE = (1 << 20) - (1 << 12)

Progress = Callable[[int], None]

log = logging.getLogger(__name__)

#: Run background writes in a forked process when the caller is single-threaded
#: and there are at least FORK_MIN bytes to write (below that a thread costs
#: less than forking a large caller).
FORK = hasattr(os, "fork") and hasattr(os, "waitpid")
FORK_MIN = 32 << 20


@dataclass(frozen=True)
class PayloadRef:
    """A payload written in place of a stub: ``copy`` as stored, or as ``raw`` bytes."""

    payload: Payload
    mode: str

    @property
    def size(self) -> int:
        return self.payload.length if self.mode == "copy" else self.payload.nbytes


@dataclass(frozen=True)
class Gap:
    """Zero bytes (alignment padding between payloads in a data file)."""

    size: int


class Sources:
    """Open file descriptors of payload sources, by path; remote sources by URL."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> Any:
        """A file descriptor for a local path; for a URL, its opened remote file."""
        if "://" in path and path not in self.fds:
            from . import storage

            if storage.is_url(path):
                return storage.reader(path)
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


def _error_record(error: BaseException) -> dict[str, Any]:
    if isinstance(error, StreamconvError):
        return {"kind": "streamconv", "class": type(error).__name__, "message": error.message,
                "file": error.file, "offset": error.offset, "path": error.path}
    if isinstance(error, OSError):
        return {"kind": "os", "errno": error.errno, "strerror": error.strerror,
                "text": str(error)}
    return {"kind": "other", "text": f"{type(error).__name__}: {error}"}


def _error_from_record(record: dict[str, Any]) -> BaseException:
    if record.get("kind") == "streamconv":
        cls = getattr(errors, str(record.get("class")), StreamconvError)
        if not (isinstance(cls, type) and issubclass(cls, StreamconvError)):
            cls = StreamconvError
        return cls(str(record.get("message")), file=record.get("file"),
                   offset=record.get("offset"), path=record.get("path"))
    if record.get("kind") == "os":
        return OSError(record.get("errno"), record.get("strerror") or record.get("text"))
    return RuntimeError(f"the background copy failed: {record.get('text')}")


@dataclass(frozen=True)
class _Unit:
    """One share of a background write, at a fixed place in the output.

    Either bytes, or a stretch of a payload copied as stored (``whole`` False),
    or a whole payload that must be produced in order (decoded varints, or a
    digest to compute), or a hole of ``length`` bytes left unwritten (it reads
    back as zeros).  Doing a unit twice writes the same bytes twice, so the
    two writers need no lock (see :class:`Background`).
    """

    offset: int
    data: bytes | None = None
    ref: PayloadRef | None = None
    source_offset: int = 0
    length: int = 0
    whole: bool = False


#: Size of the payload stretches the two writers share out.
UNIT = 32 << 20


def _units(pieces: list[Any], start: int, digest_ids: frozenset[int]) -> tuple[list[_Unit], int]:
    """Cut *pieces*, laid out from *start*, into units; return them and the end offset.

    Gaps become holes.
    """
    units: list[_Unit] = []
    pos = start
    for piece in pieces:
        if isinstance(piece, PayloadRef):
            payload = piece.payload
            if payload.id in digest_ids or (piece.mode == "raw" and payload.encoding == "varint"):
                units.append(_Unit(pos, ref=piece, whole=True))
            else:
                for k in range(0, payload.length, UNIT):
                    n = min(UNIT, payload.length - k)
                    units.append(_Unit(pos + k, ref=piece, source_offset=payload.offset + k,
                                       length=n))
            pos += piece.size
        elif isinstance(piece, Gap):
            units.append(_Unit(pos, length=piece.size))
            pos += piece.size
        else:
            units.append(_Unit(pos, data=bytes(piece)))
            pos += len(piece)
    return units, pos


#: Payload stretches at least this long start their writeback as soon as they are written
#: when the output is to be synced (see :func:`start_writeback`).
WRITEBACK_MIN = 1 << 20
_sync_file_range: Any = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``fd[offset:offset+length]`` to disk now, without waiting.

    For an output that is fsynced at the end: the disk then writes while the
    copy goes on, instead of all at once in the final fsync (a 1.5 GB copy +
    fsync measured 0.58 s with it, 0.84 s without; the copy alone 0.42 s).
    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere or
    when it fails (the final fsync makes the output durable either way).
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.sync_file_range
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            function.restype = ctypes.c_int
            _sync_file_range = function
        except (OSError, AttributeError):
            pass
    if _sync_file_range:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _UnitWriter:
    """Does units: payload stretches at explicit offsets, whole payloads in order."""

    def __init__(
        self, fd: int, progress: Progress, want_digests: frozenset[int],
        take_budget: Callable[[int], bool] | None = None, *, writeback: bool = False,
    ) -> None:
        self.fd = fd
        self.writeback = writeback
        self.progress = progress
        self.want_digests = want_digests
        self.sources = Sources()
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        # set up on first use: most small models copy no payload at all
        self._take_budget = take_budget
        self._buffer: bytearray | None = None
        self.kernel_copy = hasattr(os, "copy_file_range")
        self.digests: dict[int, str] = {}

    def take_budget(self, length: int) -> bool:
        if self._take_budget is None:
            state = bytearray(_REPORT_AT)
            _set(state, _BUDGET, _dirty_budget())
            self._take_budget = _shared_budget(state)
        return self._take_budget(length)

    @property
    def buffer(self) -> bytearray:
        if self._buffer is None:
            self._buffer = bytearray(BUFFER_SIZE)
        return self._buffer

    def do(self, unit: _Unit) -> None:
        if unit.data is not None:
            _pwrite_all(self.fd, unit.data, unit.offset)
            self.progress(len(unit.data))
            return
        if unit.ref is None:  # a hole
            self.progress(unit.length)
            return
        payload = unit.ref.payload
        try:
            src = self.sources.fd(payload.source)
            if unit.whole:
                end = self._whole(unit.ref, src, unit.offset)
            elif not isinstance(src, int):
                self._stream(src, unit.source_offset, unit.offset, unit.length)
                end = unit.offset + unit.length
            else:
                self._stretch(src, unit.source_offset, unit.offset, unit.length)
                end = unit.offset + unit.length
        except ExternalDataError as e:
            e.file = e.file or payload.source
            e.path = e.path or payload.path
            raise
        if self.writeback and end - unit.offset >= WRITEBACK_MIN:
            start_writeback(self.fd, unit.offset, end - unit.offset)

    def _whole(self, ref: PayloadRef, src: int, offset: int) -> int:
        digest = None
        if ref.payload.id in self.want_digests:
            import hashlib

            digest = hashlib.sha1(usedforsecurity=False)
        for chunk in iter_raw_chunks(ref.payload, src):
            if digest is not None:
                digest.update(chunk)
            _pwrite_all(self.fd, chunk, offset)
            offset += len(chunk)
            self.progress(len(chunk))
        if digest is not None:
            self.digests[ref.payload.id] = digest.hexdigest()
        return offset

    def _stream(self, src: Any, src_pos: int, dst_pos: int, length: int) -> None:
        """Copy from a remote source: its reads come from the payload stream."""
        end = src_pos + length
        while src_pos < end:
            data = read_at(src, min(STREAM_PIECE, end - src_pos), src_pos)
            if not data:
                raise ExternalDataError(
                    f"source ended at byte {src_pos}, {end - src_pos} bytes short of the payload"
                )
            _pwrite_all(self.fd, data, dst_pos)
            src_pos += len(data)
            dst_pos += len(data)
            self.progress(len(data))

    def _stretch(self, src: int, src_pos: int, dst_pos: int, length: int) -> None:
        # copy_file_range between offsets that differ modulo the page size is
        # much slower on common file systems (measured 1.5x on ext4) than the
        # loop, as long as the written data stays below the writeback
        # threshold (past it buffered writes are throttled harder)
        looped = not self.kernel_copy
        if not looped and (src_pos - dst_pos) % self.page and self.take_budget(length):
            looped = True
        end = src_pos + length
        view = memoryview(self.buffer)
        while src_pos < end:
            want = end - src_pos
            if not looped:
                try:
                    n = os.copy_file_range(src, self.fd, want, src_pos, dst_pos)
                except OSError as e:
                    if e.errno not in _FALLBACK_ERRNOS:
                        raise
                    self.kernel_copy = False
                    looped = True
                    continue
            else:
                n = os.preadv(src, [view[:min(len(view), want)]], src_pos)
                if n:
                    _pwrite_all(self.fd, view[:n], dst_pos)
            if n == 0:
                raise ExternalDataError(
                    f"source ended at byte {src_pos}, {end - src_pos} bytes short of the payload"
                )
            src_pos += n
            dst_pos += n
            self.progress(n)

    def close(self) -> None:
        self.sources.close()


#: Largest write of a remote copy or of a stream (a slice of the payload stream's chunk).
STREAM_PIECE = 4 << 20


def stream_pieces(
    out: Any,
    pieces: Iterable[Any],
    progress: Progress,
    *,
    digest_ids: frozenset[int] = frozenset(),
) -> dict[int, str]:
    """Write bytes, :class:`Gap` and :class:`PayloadRef` pieces in order to *out*.

    *out* needs only ``write`` (an upload of a remote object): every byte is
    written once, in order, gaps as zeros.  Returns the SHA-1 of each payload
    whose id is in *digest_ids*.  Raises OSError when reading a local source
    fails and ExternalDataError when a source is short.
    """
    sources = Sources()
    digests: dict[int, str] = {}
    try:
        for piece in pieces:
            if isinstance(piece, Gap):
                for k in range(0, piece.size, BUFFER_SIZE):
                    out.write(bytes(min(BUFFER_SIZE, piece.size - k)))
                progress(piece.size)
                continue
            if not isinstance(piece, PayloadRef):
                out.write(bytes(piece))
                progress(len(piece))
                continue
            payload = piece.payload
            try:
                src = sources.fd(payload.source)
                digest = None
                if payload.id in digest_ids:
                    import hashlib

                    digest = hashlib.sha1(usedforsecurity=False)
                if piece.mode == "raw" and payload.encoding == "varint":
                    chunks: Iterable[Any] = iter_raw_chunks(payload, src)
                else:
                    chunks = _stored_chunks(src, payload)
                for chunk in chunks:
                    if digest is not None:
                        digest.update(chunk)
                    out.write(chunk)
                    progress(len(chunk))
                if digest is not None:
                    digests[payload.id] = digest.hexdigest()
            except ExternalDataError as e:
                e.file = e.file or payload.source
                e.path = e.path or payload.path
                raise
    finally:
        sources.close()
    return digests


def _stored_chunks(src: Any, payload: Payload) -> Iterable[Any]:
    pos, end = payload.offset, payload.offset + payload.length
    while pos < end:
        data = read_at(src, min(STREAM_PIECE, end - pos), pos)
        if not data:
            raise ExternalDataError(
                f"source ended at byte {pos}, {end - pos} bytes short of the payload")
        yield data
        pos += len(data)


def _end_at(fd: int, end: int) -> None:
    """Make the file at least *end* bytes long (a trailing hole) and position *fd* there."""
    if os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)
    os.lseek(fd, end, os.SEEK_SET)


def write_pieces(
    fd: int,
    pieces: Iterable[Any],
    progress: Progress,
    *,
    digest_ids: frozenset[int] = frozenset(),
    writeback: bool = False,
) -> dict[int, str]:
    """Write bytes, :class:`Gap` and :class:`PayloadRef` pieces in order from *fd*'s position.

    Leaves *fd* after the last piece; returns the SHA-1 of each payload whose
    id is in *digest_ids*.  *writeback*: the file will be fsynced, so large
    payloads start their writeback as they are written.  Raises OSError when
    writing fails and ExternalDataError when a source is short.
    """
    units, end = _units(list(pieces), os.lseek(fd, 0, os.SEEK_CUR), digest_ids)
    writer = _UnitWriter(fd, progress, digest_ids, writeback=writeback)
    try:
        for unit in units:
            writer.do(unit)
    finally:
        writer.close()
    _end_at(fd, end)
    return writer.digests


# Shared state of a background write (an anonymous shared mapping in process
# mode): the next unit the worker takes (front), the lowest unit the caller
# took (back), bytes the worker wrote, the writeback budget both writers draw
# on (buffered writes past it are throttled; two writers with a budget each
# measured up to 2x slower at 3 GB), then the worker's report.
_FRONT, _BACK, _DONE, _BUDGET, _REPORT_LEN, _REPORT_AT = 0, 8, 16, 24, 32, 40


def _get(state: Any, at: int) -> int:
    return int(struct.unpack_from("<q", state, at)[0])


def _set(state: Any, at: int, value: int) -> None:
    struct.pack_into("<q", state, at, value)


def _shared_budget(state: Any) -> Callable[[int], bool]:
    """Draw on the budget in *state*.  Two writers may both draw on the last of it
    at once; the overdraft is one unit at most."""

    def take(n: int) -> bool:
        left = _get(state, _BUDGET)
        if left < n:
            return False
        _set(state, _BUDGET, left - n)
        return True

    return take


class Background:
    """Write *pieces* to *fd*, laid out from offset *start*, while the caller goes on.

    ``start()`` begins; ``finish()`` joins in, taking units from the end while
    the worker takes them from the front, waits, leaves *fd* positioned at
    the end of the pieces and returns the payload digests asked for (raising
    what went wrong: OutputError for a failed write, ExternalDataError for a
    short source); ``stop()`` abandons the write.  *progress* receives byte
    counts, from the calling thread while ``finish()`` runs (and from the
    worker thread in thread mode).

    The worker and the caller each publish their own position only; when both
    take the same last unit they write the same bytes, which is harmless.
    """

    def __init__(
        self,
        fd: int,
        pieces: list[Any],
        *,
        start: int = 0,
        digest_ids: frozenset[int] = frozenset(),
        progress: Progress | None = None,
        writeback: bool = False,
    ) -> None:
        self.fd = fd
        self.writeback = writeback
        self.units, self.end = _units(pieces, start, digest_ids)
        self.total = self.end - start
        self.digest_ids = digest_ids
        self.progress = progress or (lambda n: None)
        self.digests: dict[int, str] = {}
        self.mode = ""
        self._pid = 0
        self._pipe = -1
        self._state: Any = None
        self._reported = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopped = False

    def start(self) -> None:
        refs = sum(u.whole for u in self.units)
        size = _REPORT_AT + (1 << 16) + 64 * refs
        fork = FORK and self.total >= FORK_MIN and threading.active_count() == 1
        # shared with a forked process, or private to this one
        self._state = mmap.mmap(-1, size) if fork else bytearray(size)
        _set(self._state, _BACK, len(self.units))
        _set(self._state, _BUDGET, _dirty_budget())
        if fork:
            try:
                self._start_process()
                self.mode = "process"
                return
            except OSError as e:  # no memory or processes to spare: a thread does it
                log.debug("cannot fork a copy process (%s); copying in a thread", e)
        self.mode = "thread"
        self._thread = threading.Thread(target=self._run_thread, name="streamconv-copy",
                                        daemon=True)
        self._thread.start()

    # -- the worker: units from the front ------------------------------------

    def _work(self, progress: Progress, stop: Callable[[], bool]) -> dict[int, str]:
        state = self._state
        writer = _UnitWriter(self.fd, progress, self.digest_ids, _shared_budget(state),
                             writeback=self.writeback)
        try:
            i = 0
            while i < _get(state, _BACK) and not stop():
                _set(state, _FRONT, i + 1)
                writer.do(self.units[i])
                i += 1
        finally:
            writer.close()
        return writer.digests

    def _run_thread(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            # signals belong to the main thread, which cleans up
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

        def progress(n: int) -> None:
            _set(self._state, _DONE, _get(self._state, _DONE) + n)

        try:
            self.digests.update(self._work(progress, lambda: self._stopped))
        except BaseException as e:  # handed to the caller by finish()
            self._error = e

    def _start_process(self) -> None:
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:  # the child: copy, report, exit without running any clean-up
            status = 1
            try:
                os.close(read_end)
                status = self._child()
            finally:
                os._exit(status)
        os.close(write_end)
        self._pid = pid
        self._pipe = read_end

    def _child(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        parent = os.getppid()
        state = self._state
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            _set(state, _DONE, done)

        def orphaned() -> bool:  # the parent is gone: nobody wants the output
            return os.getppid() != parent

        try:
            digests = self._work(progress, orphaned)
            record: dict[str, Any] = {"digests": {str(k): v for k, v in digests.items()}}
            status = 0
        except BaseException as e:
            record = {"error": _error_record(e)}
            status = 1
        # the report goes through shared memory, never through a write that
        # could fail the way the copy did
        import json

        report = json.dumps(record).encode()
        if len(report) > len(state) - _REPORT_AT:
            report = json.dumps({"error": {"kind": "other", "text": "report too long"}}).encode()
        state[_REPORT_AT:_REPORT_AT + len(report)] = report
        _set(state, _REPORT_LEN, len(report))
        return status

    # -- the caller: units from the back, then wait ---------------------------

    def _report_progress(self, own: int) -> None:
        done = min(self.total, _get(self._state, _DONE) + own)
        if done > self._reported:
            self.progress(done - self._reported)
            self._reported = done

    def _help(self) -> None:
        """Take units from the end until meeting the worker."""
        state = self._state
        own = 0

        def progress(n: int) -> None:
            nonlocal own
            own += n
            self._report_progress(own)

        writer = _UnitWriter(self.fd, progress, self.digest_ids, _shared_budget(state),
                             writeback=self.writeback)
        try:
            j = len(self.units) - 1
            while j >= _get(state, _FRONT):
                _set(state, _BACK, j)
                if _get(state, _FRONT) > j:
                    break  # the worker took it
                writer.do(self.units[j])
                j -= 1
        finally:
            writer.close()
        self.digests.update(writer.digests)
        self._own = own

    _own = 0

    def _wait_process(self) -> None:
        # the pipe's write end closes when the child exits: that is the signal
        while True:
            ready, _, _ = select.select([self._pipe], [], [], 0.1)
            self._report_progress(self._own)
            if ready and not os.read(self._pipe, 1 << 12):
                break
        _, status = os.waitpid(self._pid, 0)
        self._pid = 0
        os.close(self._pipe)
        self._pipe = -1
        import json

        length = _get(self._state, _REPORT_LEN)
        try:
            record = json.loads(self._state[_REPORT_AT:_REPORT_AT + length]) if length else {}
        except ValueError:
            record = {}
        if "error" in record:
            self._error = _error_from_record(record["error"])
        elif "digests" in record and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            self.digests.update({int(k): v for k, v in record["digests"].items()})
        elif os.WIFSIGNALED(status):
            self._error = OutputError(
                f"the copy process was killed by signal {os.WTERMSIG(status)}"
            )
        else:
            self._error = OutputError("the copy process failed without a report")

    def finish(self) -> dict[int, str]:
        """Help, wait for every piece to be written; return the digests; raise what went wrong."""
        try:
            self._help()
        except OSError as e:
            self.stop()
            raise OutputError(f"writing the output failed: {e.strerror or e}") from e
        except BaseException:
            self.stop()
            raise
        if self._pid:
            self._wait_process()
        elif self._thread is not None:
            self._thread.join()
            self._thread = None
        self._report_progress(self._own)
        if isinstance(self._error, OSError):
            raise OutputError(
                f"writing the output failed: {self._error.strerror or self._error}"
            ) from self._error
        if self._error is not None:
            raise self._error
        _end_at(self.fd, self.end)
        return self.digests

    def stop(self) -> None:
        """Abandon the write: stop the worker and wait for it."""
        self._stopped = True
        if self._pid:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass
            self._pid = 0
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        if self._thread is not None:
            self._thread.join()
            self._thread = None
