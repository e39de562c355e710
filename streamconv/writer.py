"""Move bytes into the output: payload copies, and copies that run in the background.

Payload bytes go file-to-file: ``os.copy_file_range`` where source and
destination offsets agree modulo the page size, a read/write loop through one
reused buffer where they do not (see :class:`Copier`).  They never become one
Python object.

A :class:`Background` write lets payloads move while onnx imports and the
skeleton converts.  It runs in a forked process when the caller is
single-threaded (the command line, batch workers): a thread would have to take
the interpreter lock between every two chunks while the main thread is busy
importing, which measured about 1.7x slower than the copy alone; a forked
process copies at full speed on the other core.  Elsewhere it runs in a thread.
"""

from __future__ import annotations

import errno
import hashlib
import json
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
from .skeleton import Payload, iter_raw_chunks

__all__ = [
    "BUFFER_SIZE",
    "Background",
    "Copier",
    "Gap",
    "PayloadRef",
    "Sources",
    "write_all",
    "write_pieces",
]

#: Largest single copy_file_range/sendfile request.
COPY_CHUNK = 64 << 20
#: Size of the read/write loop's buffer.  Not a power of two on purpose: writes
#: that start on 1 MiB boundaries make the page cache allocate large folios,
#: which measured 5-10x slower than the same copy in 1 MiB - 4 KiB steps here
#: (Linux 6.18, ext4) once memory is fragmented.
BUFFER_SIZE = (1 << 20) - (1 << 12)
ZEROS = bytes(1 << 16)
_REPORT_AT = 16

Progress = Callable[[int], None]

#: Run background writes in a forked process when the caller is single-threaded.
#: (Tests switch this off to exercise the thread.)
FORK = hasattr(os, "fork") and hasattr(os, "waitpid")


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


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of *data* at *fd*'s position."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Sources:
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


class Copier:
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
        self.buffer = bytearray(BUFFER_SIZE)

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
            write_all(dst, view[:n])
            done += n
        return done


def write_payload(
    ref: PayloadRef, fd: int, sources: Sources, copier: Copier, progress: Progress,
    digest: Any = None,
) -> None:
    """Write one payload at *fd*'s position, as stored or as raw bytes; feed *digest*."""
    payload = ref.payload
    src = sources.fd(payload.source)
    if digest is None and (ref.mode == "copy" or payload.encoding != "varint"):
        try:
            copier.copy(src, fd, payload.offset, payload.length, progress)
        except ExternalDataError as e:
            e.file = e.file or payload.source
            e.path = e.path or payload.path
            raise
        return
    for chunk in iter_raw_chunks(payload, src):
        if digest is not None:
            digest.update(chunk)
        write_all(fd, chunk)
        progress(len(chunk))


def write_gap(fd: int, size: int) -> None:
    """Write *size* zero bytes."""
    while size > 0:
        n = min(len(ZEROS), size)
        write_all(fd, ZEROS[:n])
        size -= n


def write_pieces(
    fd: int,
    pieces: Iterable[Any],
    progress: Progress,
    *,
    digest_ids: frozenset[int] = frozenset(),
    stop: Callable[[], bool] | None = None,
) -> dict[int, str]:
    """Write bytes, :class:`Gap` and :class:`PayloadRef` pieces in order at *fd*'s position.

    Returns the SHA-1 of each payload whose id is in *digest_ids*.  *stop* is
    asked before every piece; when it says so the write ends early.  Raises
    OSError when writing fails and ExternalDataError when a source is short.
    """
    sources = Sources()
    copier = Copier()
    digests: dict[int, str] = {}
    try:
        for piece in pieces:
            if stop is not None and stop():
                break
            if isinstance(piece, PayloadRef):
                wanted = piece.payload.id in digest_ids
                digest = hashlib.sha1(usedforsecurity=False) if wanted else None
                write_payload(piece, fd, sources, copier, progress, digest)
                if digest is not None:
                    digests[piece.payload.id] = digest.hexdigest()
            elif isinstance(piece, Gap):
                write_gap(fd, piece.size)
                progress(piece.size)
            else:
                write_all(fd, piece)
                progress(len(piece))
    finally:
        sources.close()
    return digests


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


class Background:
    """Write *pieces* to *fd* (from its current position) while the caller goes on.

    ``start()`` begins, ``finish()`` waits and returns the payload digests
    asked for (raising what went wrong: OutputError for a failed write,
    ExternalDataError for a short source), ``stop()`` abandons the write.
    *progress* receives byte counts, from the calling thread, while
    ``finish()`` waits (and from the worker thread in thread mode).
    """

    def __init__(
        self,
        fd: int,
        pieces: list[Any],
        *,
        digest_ids: frozenset[int] = frozenset(),
        progress: Progress | None = None,
    ) -> None:
        self.fd = fd
        self.pieces = pieces
        self.digest_ids = digest_ids
        self.progress = progress or (lambda n: None)
        self.digests: dict[int, str] = {}
        self.mode = ""
        self._pid = 0
        self._pipe = -1
        self._counter: mmap.mmap | None = None
        self._reported = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if FORK and threading.active_count() == 1:
            self._start_process()
        else:
            self._start_thread()

    # -- thread mode ---------------------------------------------------------

    def _start_thread(self) -> None:
        self.mode = "thread"
        self._thread = threading.Thread(target=self._run_thread, name="streamconv-copy",
                                        daemon=True)
        self._thread.start()

    def _run_thread(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            # signals belong to the main thread, which cleans up
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.digests = write_pieces(self.fd, self.pieces, self.progress,
                                        digest_ids=self.digest_ids, stop=self._stop.is_set)
        except BaseException as e:  # handed to the caller by finish()
            self._error = e

    # -- process mode --------------------------------------------------------

    def _start_process(self) -> None:
        self.mode = "process"
        # shared with the child: bytes written so far, then the length and text
        # of its report (never through a write that could fail like the copy did)
        refs = sum(isinstance(p, PayloadRef) for p in self.pieces)
        self._counter = mmap.mmap(-1, _REPORT_AT + (1 << 16) + 64 * refs)
        read_end, write_end = os.pipe()
        pid = os.fork()
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
        counter = self._counter
        assert counter is not None
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            struct.pack_into("<q", counter, 0, done)

        def orphaned() -> bool:  # the parent is gone: nobody wants the output
            return os.getppid() != parent

        try:
            digests = write_pieces(self.fd, self.pieces, progress,
                                   digest_ids=self.digest_ids, stop=orphaned)
            record: dict[str, Any] = {"digests": {str(k): v for k, v in digests.items()}}
            status = 0
        except BaseException as e:
            record = {"error": _error_record(e)}
            status = 1
        report = json.dumps(record).encode()
        room = len(counter) - _REPORT_AT
        if len(report) > room:
            report = json.dumps({"error": {"kind": "other", "text": "report too long"}}).encode()
        counter[_REPORT_AT:_REPORT_AT + len(report)] = report
        struct.pack_into("<q", counter, 8, len(report))
        return status

    def _report_progress(self) -> None:
        if self._counter is None:
            return
        (done,) = struct.unpack_from("<q", self._counter, 0)
        if done > self._reported:
            self.progress(done - self._reported)
            self._reported = done

    def _wait_process(self) -> None:
        # the pipe's write end closes when the child exits: that is the signal
        while True:
            ready, _, _ = select.select([self._pipe], [], [], 0.1)
            self._report_progress()
            if ready and not os.read(self._pipe, 1 << 12):
                break
        _, status = os.waitpid(self._pid, 0)
        self._pid = 0
        self._report_progress()
        os.close(self._pipe)
        self._pipe = -1
        assert self._counter is not None
        (length,) = struct.unpack_from("<q", self._counter, 8)
        try:
            record = json.loads(self._counter[_REPORT_AT:_REPORT_AT + length]) if length else {}
        except ValueError:
            record = {}
        if "error" in record:
            self._error = _error_from_record(record["error"])
        elif "digests" in record and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            self.digests = {int(k): v for k, v in record["digests"].items()}
        elif os.WIFSIGNALED(status):
            self._error = OutputError(
                f"the copy process was killed by signal {os.WTERMSIG(status)}"
            )
        else:
            self._error = OutputError("the copy process failed without a report")

    # -- both ----------------------------------------------------------------

    def finish(self) -> dict[int, str]:
        """Wait for every piece to be written; return the digests; raise what went wrong."""
        if self._pid:
            self._wait_process()
        elif self._thread is not None:
            self._thread.join()
            self._thread = None
        if isinstance(self._error, OSError):
            raise OutputError(
                f"writing the output failed: {self._error.strerror or self._error}"
            ) from self._error
        if self._error is not None:
            raise self._error
        return self.digests

    def stop(self) -> None:
        """Abandon the write: stop the worker and wait for it."""
        self._stop.set()
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
