"""Models on object storage and hubs: fsspec URLs as inputs and outputs.

A path with a ``protocol://`` prefix (``s3://``, ``gs://``, ``hf://``,
``http(s)://``, any protocol fsspec knows) is read and written here; local
paths and ``file://`` URLs never reach this module, so fsspec is imported only
for URLs.  Each protocol's package is an optional extra; a missing one is one
error line naming it.  Credentials and endpoints come from where fsspec and the
protocol's package look for them (their config, the environment), and from
``storage_options`` (the CLI's ``--storage-options JSON``), passed to the file
system as they are.

Reading (:class:`RemoteFile`): the scanner walks the model through
:class:`ScanBuffer`, a buffer of small blocks fetched on demand with a
read-ahead that grows while reads stay sequential, so walking field headers
fetches little and skipping a payload fetches nothing.  Payloads are then read
in one sequential stream of large ranged reads (:data:`CHUNK`), one chunk
ahead in a thread, each byte fetched once; memory is a few chunks, whatever
the model's size.

Writing (:class:`RemoteTarget`): every object of one output is uploaded under
its final key by the file system's buffered writer (a multipart upload on S3,
a resumable upload on GCS), which makes the object appear only when it is
completed.  Uploads are completed at the end, data objects before the model
that refers to them; on any failure or interruption the open uploads are
aborted (:meth:`RemoteTarget.abort`) and objects already completed by this
output are deleted, so no partial object remains.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import posixpath
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import ExternalDataError, OutputError, StreamconvError, UsageError

__all__ = [
    "CHUNK",
    "RemoteFile",
    "RemoteTarget",
    "ScanBuffer",
    "Stats",
    "filesystem",
    "is_url",
    "join",
    "local_path",
    "open_remote",
    "opened",
    "parent",
    "parse_storage_options",
    "reader",
]

log = logging.getLogger(__name__)

#: Size of the payload stream's ranged reads (one held, one read ahead).
CHUNK = 8 << 20
#: Payload spans closer than this are read as one stream (the gap between
#: two payloads of an inline model is a tensor header, a few dozen bytes).
GAP = 256 << 10
#: The scanner's block: one read when the walk jumps (past a payload).
BLOCK = 16 << 10
#: Longest read-ahead of the scanner while its reads stay sequential.
MAX_RUN = 1 << 20
#: Blocks the scanner keeps (4 MiB).
KEEP_BLOCKS = 256
#: Smallest part of a multipart upload; larger objects get larger parts, so that
#: none needs more than :data:`MAX_PARTS` (S3 allows 10,000).
PART = 16 << 20
MAX_PARTS = 9000

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: protocol -> (extra, package) for the message when the package is missing
_EXTRAS = {
    "s3": ("s3", "s3fs"), "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
    "hf": ("hf", "huggingface_hub"),
    "http": ("http", "aiohttp"), "https": ("http", "aiohttp"),
}


#: protocols read through ranged GETs that take no uploads
_READ_ONLY = ("http", "https")


def is_url(path: str) -> bool:
    """Whether *path* names a remote object (``proto://...``, any protocol but ``file``)."""
    match = _URL.match(path)
    return match is not None and match.group(1).lower() not in ("file", "local")


def local_path(path: str) -> str:
    """*path* with a ``file://`` prefix removed (other paths unchanged)."""
    match = _URL.match(path)
    if match is not None and match.group(1).lower() in ("file", "local"):
        return path[match.end():] or "/"
    return path


def protocol(url: str) -> str:
    match = _URL.match(url)
    assert match is not None
    return match.group(1).lower()


def parent(url: str) -> str:
    """The folder URL of *url* (no trailing slash)."""
    head, _, _ = url.rstrip("/").rpartition("/")
    return head


def join(folder: str, rel: str) -> str:
    """*rel* (a relative POSIX path) below the folder URL *folder*."""
    return folder.rstrip("/") + "/" + rel


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options JSON`` as a dict; raises UsageError unless it is a JSON object."""
    if text is None:
        return {}
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--storage-options must be a JSON object, got {text!r} ({e})") from e
    if not isinstance(value, dict):
        raise UsageError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def _missing(proto: str, error: BaseException) -> UsageError:
    extra, package = _EXTRAS.get(proto, ("remote", None))
    if package is None:
        name = getattr(error, "name", None) or str(error)
        return UsageError(f"{proto}:// needs a package that is not installed ({name}); "
                          "install the one fsspec names for it")
    return UsageError(f"{proto}:// needs {package}: pip install 'streamconv[{extra}]'")


_FILESYSTEMS: dict[tuple[str, str, int], Any] = {}


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's file system for *url* and the path within it.

    Raises UsageError when fsspec or the protocol's package is missing, or the
    protocol is unknown.
    """
    proto = protocol(url)
    try:
        import fsspec
    except ImportError as e:
        raise UsageError(f"{proto}:// paths need fsspec: pip install 'streamconv[remote]'"
                         ) from e
    import json

    # by process too: a file system's event loop thread does not survive a fork
    key = (proto, json.dumps(options or {}, sort_keys=True, default=str), os.getpid())
    fs = _FILESYSTEMS.get(key)
    try:
        if fs is None:
            fs = fsspec.filesystem(proto, **(options or {}))
            _FILESYSTEMS[key] = fs
        path = fs._strip_protocol(url)
    except ImportError as e:
        raise _missing(proto, e) from e
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise UsageError(f"unknown protocol {proto}:// (fsspec knows no such file system)"
                             ) from e
        raise UsageError(f"{proto}://: {e}") from e
    except TypeError as e:
        raise UsageError(f"--storage-options not accepted for {proto}://: {e}") from e
    return fs, str(path)


def _storage_error(url: str, error: BaseException, what: str) -> StreamconvError:
    if isinstance(error, FileNotFoundError):
        return StreamconvError("no such object", file=url)
    if isinstance(error, PermissionError):
        return StreamconvError(f"cannot {what}: permission denied ({error})", file=url)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return StreamconvError(f"cannot {what}: {text}", file=url)


class Stats:
    """Bytes fetched and requests made, for one remote file."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            self.requests += 1


class RemoteFile:
    """One remote object read through exact ranged reads (see the module's docstring)."""

    def __init__(self, url: str, fs: Any, path: str, info: dict[str, Any]) -> None:
        self.url = url
        self.fs = fs
        self.path = path
        self.info = info
        self.size = int(info.get("size") or 0)
        self.stats = Stats()
        self._chunks: list[tuple[int, int]] = []
        self._starts: list[int] = []
        self._held: OrderedDict[int, bytes] = OrderedDict()
        self._ahead: dict[int, Future[bytes]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- exact reads -----------------------------------------------------------------------

    def fetch(self, start: int, end: int) -> bytes:
        """The bytes ``[start, end)`` in one ranged read; raises ExternalDataError when short."""
        end = min(end, self.size)
        if end <= start:
            return b""
        try:
            data = self.fs.cat_file(self.path, start=start, end=end)
        except (OSError, ValueError, RuntimeError) as e:
            raise _storage_error(self.url, e, "read") from e
        self.stats.add(len(data))
        if len(data) != end - start:
            raise ExternalDataError(
                f"read of bytes {start}-{end} returned {len(data)} bytes (the object changed, "
                "or the server ignores range requests)", file=self.url)
        return bytes(data)

    def scan_buffer(self) -> ScanBuffer:
        return ScanBuffer(self)

    # -- the payload stream ----------------------------------------------------------------

    def expect(self, spans: Iterable[tuple[int, int]]) -> None:
        """Plan the payload stream over *spans* (offset, length) and start reading ahead."""
        runs: list[list[int]] = []
        for offset, length in sorted(spans):
            if length <= 0:
                continue
            end = offset + length
            if runs and offset <= runs[-1][1] + GAP:
                runs[-1][1] = max(runs[-1][1], end)
            else:
                runs.append([offset, end])
        chunks = []
        for start, end in runs:
            for k in range(start, end, CHUNK):
                chunks.append((k, min(end, k + CHUNK)))
        with self._lock:
            self._chunks = chunks
            self._starts = [c[0] for c in chunks]
            self._held.clear()
        if chunks:
            self._read_ahead(0)

    def _read_ahead(self, index: int) -> None:
        if index >= len(self._chunks) or index in self._held or index in self._ahead:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamconv-read")
        start, end = self._chunks[index]
        self._ahead[index] = self._pool.submit(self.fetch, start, end)

    def _chunk(self, index: int) -> bytes:
        with self._lock:
            data = self._held.get(index)
            if data is not None:
                self._held.move_to_end(index)
                return data
            future = self._ahead.pop(index, None)
        if future is not None:
            data = future.result()
        else:
            start, end = self._chunks[index]
            data = self.fetch(start, end)
        with self._lock:
            self._held[index] = data
            # this chunk and the one before (a read may straddle them); the next is read ahead
            while len(self._held) > 2:
                self._held.popitem(last=False)
            self._read_ahead(index + 1)
        return data

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        """Up to *length* bytes at *offset*: from the payload stream where it was planned."""
        length = max(0, min(length, self.size - offset))
        parts: list[bytes | memoryview] = []
        pos, end = offset, offset + length
        while pos < end:
            i = bisect.bisect_right(self._starts, pos) - 1
            if i >= 0 and pos < self._chunks[i][1]:
                c_start, c_end = self._chunks[i]
                data = self._chunk(i)
                stop = min(end, c_end)
                parts.append(memoryview(data)[pos - c_start:stop - c_start])
                pos = stop
            else:
                stop = end if i + 1 >= len(self._starts) else min(end, self._starts[i + 1])
                parts.append(self.fetch(pos, stop))
                pos = stop
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._held.clear()

    def identity(self) -> dict[str, Any]:
        """What identifies this object's content: size and the version, ETag or mtime given."""
        out: dict[str, Any] = {"size": self.size}
        for key in ("VersionId", "version_id", "ETag", "etag", "generation", "md5Hash",
                    "LastModified", "mtime", "last_modified", "updated", "blob_id",
                    "last_commit"):
            value = self.info.get(key)
            if value is not None:
                out[key] = str(value)
        return out


class ScanBuffer:
    """What the scanner reads a remote model through: ``len``, ``buf[i]``, ``buf[a:b]``.

    Blocks of :data:`BLOCK` bytes are fetched on demand and kept (at most
    :data:`KEEP_BLOCKS`); a miss right after the previous one doubles the next
    read (up to :data:`MAX_RUN`), any other miss reads one block.
    """

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.size = remote.size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._next = -1
        self._run = 1

    def __len__(self) -> int:
        return self.size

    def _block(self, k: int) -> bytes:
        data = self._blocks.get(k)
        if data is not None:
            return data
        self._run = min(self._run * 2, MAX_RUN // BLOCK) if k == self._next else 1
        last = (self.size - 1) // BLOCK
        n = min(self._run, last - k + 1)
        data = self.remote.fetch(k * BLOCK, (k + n) * BLOCK)
        for j in range(n):
            self._blocks[k + j] = data[j * BLOCK:(j + 1) * BLOCK]
        while len(self._blocks) > KEEP_BLOCKS:
            self._blocks.popitem(last=False)
        self._next = k + n
        return self._blocks[k]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.size)
            if step != 1:
                raise ValueError("ScanBuffer slices have no step")
            if stop <= start:
                return b""
            first, last = start // BLOCK, (stop - 1) // BLOCK
            if last - first > KEEP_BLOCKS // 4:
                # a large span (a long run of nodes, a big opaque field): read it as is
                return self.remote.fetch(start, stop)
            parts = [self._block(k) for k in range(first, last + 1)]
            joined = parts[0] if len(parts) == 1 else b"".join(parts)
            offset = first * BLOCK
            return joined[start - offset:stop - offset]
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError("ScanBuffer index out of range")
        return self._block(index // BLOCK)[index % BLOCK]


# -- the files a conversion has open, by URL -----------------------------------------------

_OPEN: dict[str, RemoteFile] = {}


def open_remote(url: str, options: dict[str, Any] | None = None) -> RemoteFile:
    """Open the remote object at *url* (its metadata only) and register it for :func:`reader`.

    Raises StreamconvError when it does not exist or cannot be read, UsageError
    for a missing package or unknown protocol.
    """
    fs, path = filesystem(url, options)
    try:
        info = fs.info(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise _storage_error(url, e, "open") from e
    if info.get("type") == "directory":
        raise StreamconvError("is a folder, not a model file", file=url)
    if info.get("size") is None:
        raise StreamconvError("the server does not tell the object's size", file=url)
    remote = RemoteFile(url, fs, path, info)
    _OPEN[url] = remote
    return remote


def reader(url: str) -> RemoteFile:
    """The registered :class:`RemoteFile` for *url* (payload sources are named by URL)."""
    remote = _OPEN.get(url)
    if remote is None:
        raise ExternalDataError("remote payload source was not opened", file=url)
    return remote


@contextlib.contextmanager
def opened() -> Iterator[list[RemoteFile]]:
    """Remote files opened inside the block are closed and unregistered after it."""
    before = set(_OPEN)
    seen: list[RemoteFile] = []
    try:
        yield seen
    finally:
        for url in list(_OPEN):
            if url not in before:
                remote = _OPEN.pop(url)
                seen.append(remote)
                remote.close()


def resolve_location(model_url: str, norm: str, where: dict[str, Any]) -> tuple[str, int]:
    """The URL and size of external data at *norm* (relative, checked) beside *model_url*.

    Read through the model's own file system (same credentials and endpoint).
    Raises ExternalDataError when it does not exist or is not an object.
    """
    url = join(parent(model_url), norm)
    remote = _OPEN.get(url)
    if remote is None:
        model = reader(model_url)
        path = posixpath.join(parent(model.path), norm)
        try:
            info = model.fs.info(path)
        except (OSError, ValueError, RuntimeError) as e:
            error = _storage_error(url, e, "open")
            raise ExternalDataError(
                f"external data file {norm!r} cannot be opened: {error.message}", **where
            ) from e
        if info.get("type") == "directory" or info.get("size") is None:
            raise ExternalDataError(f"external data {norm!r} is not an object", **where)
        remote = RemoteFile(url, model.fs, path, info)
        _OPEN[url] = remote
    return url, remote.size


def check_remote_location(location: str, where: dict[str, Any]) -> None:
    """Refuse a location that is a URL or names anything but a plain key below the folder."""
    if _URL.match(location) or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", location):
        raise ExternalDataError(f"location {location!r} is a URL, not a relative path", **where)
    if "?" in location or "#" in location:
        raise ExternalDataError(f"location {location!r} holds '?' or '#'", **where)


# -- writing ---------------------------------------------------------------------------------


def abort_uploads(urls: Iterable[str], options: dict[str, Any] | None = None) -> int:
    """Abort the open multipart uploads to the objects *urls*; return how many.

    For the uploads of a process that was killed (a batch worker past its
    timeout, or stopped by Ctrl-C), which could not abort them itself.  Only
    file systems that list multipart uploads (S3) have any.  Never raises.
    """
    wanted: dict[tuple[str, str], set[str]] = {}
    fs_of: dict[tuple[str, str], Any] = {}
    for url in urls:
        try:
            fs, path = filesystem(url, options)
        except StreamconvError:
            continue
        if not hasattr(fs, "list_multipart_uploads") or not hasattr(fs, "abort_mpu"):
            continue
        bucket, _, key = path.partition("/")
        wanted.setdefault((protocol(url), bucket), set()).add(key)
        fs_of[(protocol(url), bucket)] = fs
    aborted = 0
    for (proto, bucket), keys in wanted.items():
        fs = fs_of[(proto, bucket)]
        try:
            uploads = fs.list_multipart_uploads(bucket)
        except Exception as e:  # best effort: say so, go on
            log.warning("cannot list the open uploads of %s://%s: %s", proto, bucket, e)
            continue
        for upload in uploads:
            key = upload.get("Key", "")
            if key not in keys:
                continue
            try:
                fs.abort_mpu(bucket, key, upload["UploadId"])
                aborted += 1
            except Exception as e:
                log.warning("cannot abort the upload of %s://%s/%s: %s", proto, bucket, key, e)
    return aborted


class _Cancelled(Exception):
    """The upload was discarded while bytes were still queued for it."""


class Upload:
    """An upload fed from a thread of its own, so that reading the next bytes overlaps
    sending these; at most *limit* bytes wait in between (memory stays flat).

    ``write`` queues (and raises what the sending thread met), ``close``
    sends the rest and completes the upload, ``discard`` aborts it.
    """

    def __init__(self, f: Any, limit: int) -> None:
        self.f = f
        self.limit = limit
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="streamconv-upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            try:
                if self.error is None:
                    self.f.write(data)
            except BaseException as e:  # handed to the writer at its next call
                self.error = e
            finally:
                with self._cond:
                    self._pending -= len(data)
                    self._cond.notify_all()

    def write(self, data: Any) -> int:
        n = len(data)
        with self._cond:
            while self._pending and self._pending + n > self.limit and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            self._pending += n
        self._queue.put(data)
        return n

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Send what is queued and complete the upload."""
        self._join()
        if self.error is not None:
            raise self.error
        self.f.close()

    def discard(self) -> None:
        """Abort the upload (what is queued is dropped)."""
        if self.error is None:
            self.error = _Cancelled()
        self._join()
        try:
            self.f.discard()
        finally:
            # a file object that is dropped unclosed completes its upload when
            # collected: mark it closed
            self.f.closed = True



class RemoteTarget:
    """The objects of one remote output, uploaded under their final keys, completed together.

    :meth:`create` opens an upload; :meth:`commit` completes them, data before
    model; :meth:`abort` (also on any failure of :meth:`commit`) aborts open
    uploads and deletes the objects this output completed.
    """

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        if protocol(url) in _READ_ONLY:
            raise UsageError(f"{protocol(url)}:// is read-only here: an output needs a store "
                             "that takes uploads (s3://, gs://, hf://, ...)", file=url)
        self.fs, self.path = filesystem(url, options)
        self.folder = parent(self.path)
        self.files: list[tuple[str, Any]] = []
        self.completed: list[str] = []

    def key(self, rel: str | None = None) -> str:
        return self.path if rel is None else posixpath.join(self.folder, rel)

    def exists(self, rel: str | None = None) -> bool:
        try:
            return bool(self.fs.exists(self.key(rel)))
        except (OSError, ValueError, RuntimeError) as e:
            raise OutputError(f"cannot look at the destination: {e}") from e

    def check_writable(self) -> None:
        """Refuse early a destination whose bucket (or root) does not exist."""
        root = self.path.split("/", 1)[0]
        try:
            ok = bool(self.fs.exists(root))
        except PermissionError:
            return  # listing may be denied where writing is allowed
        except (OSError, ValueError, RuntimeError) as e:
            raise OutputError(f"cannot reach the destination: {e}") from e
        if not ok:
            raise OutputError(f"bucket or folder {root!r} does not exist")

    def create(self, rel: str | None = None, size: int = 0) -> Any:
        """Open an upload of the object at *rel* below the folder (None: the model)
        that will hold *size* bytes."""
        key = self.key(rel)
        mib = 1 << 20
        part = max(PART, (-(-size // MAX_PARTS) + mib - 1) // mib * mib)
        try:
            f = Upload(self.fs.open(key, "wb", block_size=part), limit=part)
        except (OSError, ValueError, RuntimeError) as e:
            raise OutputError(f"cannot start the upload of {key}: {e}") from e
        self.files.append((key, f))
        return f

    def commit(self, replace_model_first: bool) -> None:
        """Complete every upload in the order created (data first, the model last).

        With *replace_model_first* the model object in place is deleted before the
        first data object completes, so that no model ever refers to data that is
        not its own (see the README's section on object storage).
        """
        from .publish import signals_held

        with signals_held():
            try:
                if replace_model_first and self.exists():
                    self.fs.rm_file(self.path)
                while self.files:
                    key, f = self.files[0]
                    f.close()
                    self.files.pop(0)
                    self.completed.append(key)
                self.completed.clear()  # the output is complete: abort leaves it alone
            except BaseException as e:
                self.abort()
                if isinstance(e, (OSError, ValueError, RuntimeError)):
                    raise OutputError(f"completing the upload failed: {e}") from e
                raise

    def abort(self) -> None:
        """Abort open uploads and delete the objects completed so far; never raises."""
        for key, f in self.files:
            try:
                f.discard()
            except Exception as e:  # best effort: report, go on with the others
                log.warning("could not abort the upload of %s: %s", key, e)
        self.files.clear()
        for key in self.completed:
            try:
                self.fs.rm_file(key)
            except Exception as e:
                log.warning("could not remove %s: %s", key, e)
        self.completed.clear()
