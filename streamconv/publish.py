"""Put finished outputs in place: staging folders, durable renames, the model last.

Every output (a converted model, a model copied through by batch, the files
batch copies beside them) is written into a private staging folder in the
destination's own folder and moved into place by :func:`publish`, the one
place where outputs become visible.

What a reader can see
---------------------
A model and its data file are two names, and no file system renames two names
at once.  The danger is a moment, or after a crash a lasting state, where the
model in place refers to a data file that belongs to another model: offsets
into the wrong bytes, a silently wrong model.  :func:`publish` never lets that
happen:

* Data files are moved into place first, the model last, so a new model never
  appears before its data.
* When a data file would replace one that exists while a model is in place
  (a rerun into the same output), that model is removed first: for the moment
  of the switch, a reader finds no model, never an old model over new data.
  A crash in that moment leaves no model at all (the old one was being
  replaced anyway; a batch rerun redoes it, the output being missing), and
  never a mismatched pair.
* A model without data files (inline) replaces the old model in one rename.

Why not a run-unique data file name, which would need no such moment: the
data file then gets a new name on every run, so the same input no longer gives
the same bytes (the name is inside the model), and ``--data-name`` could not
mean the name the user gave.  onnx refuses data files with more than one hard
link, which rules out bridging through a second name for the same bytes.  The
moment without a model is a few renames and folder syncs long.

Data files that the previous model referred to and the new one does not are
removed only after the new model is in place, and only names streamconv itself
gives (``<model>.data``), never a file of the input.

Durability: every file is fsynced before its rename, and each folder whose
entries changed is fsynced before the next step, so that after a power loss
the model in place is complete and its data file is too (``fsync=False``
skips this, for scratch outputs).  A batch may take over the last folder sync
of each publish (``deferred``) and sync each folder once for a chunk of
models, before it records any of them as done; the files are synced before
their renames all the same.  SIGINT and SIGTERM are held during the
publish and delivered when it is done.

Staging folders
---------------
A staging folder's name says who owns it:
``.streamconv-<host>-<boot>-<pid>-<start>-<tag>`` (hashes of the host name and
of the kernel's boot id, the process id, the process's start time in clock
ticks since boot, and a tag).  An abort in onnx's C++ code or an OOM kill
leaves the folder behind; :func:`sweep_stale`, run whenever a staging folder
is created, removes those whose owner is gone: same host, and an earlier boot,
or no process with that pid, or one that started at another time (the pid was
reused).  Folders of live processes and of other hosts (shared file systems)
are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence

from .errors import OutputError

__all__ = [
    "Staging",
    "check_destination",
    "data_location",
    "make_folders",
    "make_staging",
    "previous_data_files",
    "publish",
    "replace_file",
    "signals_held",
    "sweep_stale",
    "sync_folders",
]

log = logging.getLogger(__name__)

PREFIX = ".streamconv-"
_STAGING_RE = re.compile(
    r"^\.streamconv-([0-9a-f]{8})-([0-9a-f]{8})-(\d+)-(\d+)-[0-9A-Za-z]+$"
)
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_UNKNOWN = "00000000"


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Block SIGINT/SIGTERM in the calling (main) thread; deliver them on exit.

    A no-op outside the main thread or where the platform cannot block signals.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- who owns a staging folder ---------------------------------------------------------------


def _tag(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()[:8]


# Who this process is does not change while it runs (the pid aside, which a fork
# changes): asked once per process, not once per staging folder.
_IDENTITY: dict[str, str] = {}


def _host() -> str:
    if "host" not in _IDENTITY:
        _IDENTITY["host"] = _tag(socket.gethostname())
    return _IDENTITY["host"]


def _boot() -> str:
    """A tag of this boot of the kernel; unknown where the kernel does not tell."""
    if "boot" not in _IDENTITY:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _IDENTITY["boot"] = _tag(f.read().strip())
        except OSError:
            _IDENTITY["boot"] = _UNKNOWN
    return _IDENTITY["boot"]


def _start_time(pid: int) -> int | None:
    """When process *pid* started (clock ticks since boot), or None if there is no such process.

    Raises OSError other than "no such process" (no /proc: the caller falls back).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except ProcessLookupError:
        return None
    # the command name in parentheses may hold spaces and ')': split after the last one
    rest = stat[stat.rindex(b")") + 2:].split()
    return int(rest[19])


_OWN_START: dict[int, int] = {}


def _own_start() -> int:
    pid = os.getpid()
    if pid not in _OWN_START:
        try:
            start = _start_time(pid)
        except (OSError, ValueError, IndexError):
            start = None
        _OWN_START[pid] = 0 if start is None else start
    return _OWN_START[pid]


def staging_name(tag: str | None = None) -> str:
    """A new staging folder name that identifies this process on this host."""
    tag = tag or os.urandom(6).hex()
    return f"{PREFIX}{_host()}-{_boot()}-{os.getpid()}-{_own_start()}-{tag}"


def _owner_gone(name: str) -> bool:
    """Whether *name* is a staging folder whose owner has certainly ended on this host."""
    match = _STAGING_RE.match(name)
    if match is None:
        return False  # not ours, or from another version: nobody can tell its owner
    host, boot = match.group(1), match.group(2)
    pid, start = int(match.group(3)), int(match.group(4))
    if host != _host():
        return False  # another machine on a shared file system: it may well be running
    here = _boot()
    if boot != here:
        return boot != _UNKNOWN and here != _UNKNOWN  # an earlier boot: every owner is gone
    if pid == os.getpid() and start == _own_start():
        return False
    try:
        now = _start_time(pid)
    except (OSError, ValueError, IndexError):
        now = -1  # no /proc: liveness only, which errs towards keeping the folder
    if now is None:
        return True
    if now >= 0:
        return start != 0 and now != start  # another process now has that pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _same_file_system(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def make_staging(folder: str) -> str:
    """Make a new staging folder of this process in *folder*; its path.  Raises OutputError.

    For a caller that stages many outputs in one place (:class:`Staging` with
    *path*) and removes it itself; the next conversion into *folder* removes it
    once this process is gone.
    """
    sweep_stale(folder)
    path = os.path.join(os.path.abspath(folder), staging_name())
    try:
        os.mkdir(path, 0o700)
    except OSError as e:
        raise OutputError(f"cannot write in {folder}: {e.strerror}") from e
    return path


def sweep_stale(folder: str) -> list[str]:
    """Remove staging folders in *folder* whose owning process is gone; return their names."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if name.startswith(PREFIX) and _owner_gone(name):
            path = os.path.join(folder, name)
            log.info("removing %s, left by a process that ended", path)
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(name)
    return removed


class Staging:
    """A private staging folder for outputs going to *folder*; files leave it only by
    :func:`publish`.

    By default the staging folder is made beside the outputs.  *path* names a
    staging folder of this process that exists already (a batch worker keeps one
    at the top of DST for a chunk of models, which saves making and removing a
    folder per model): where it is on *folder*'s file system, so that a rename
    moves files from it into place, the outputs are staged there, and
    :meth:`cleanup` empties it but leaves it for the caller to remove.
    """

    def __init__(self, folder: str, path: str | None = None) -> None:
        folder = os.path.abspath(folder)
        if not os.path.isdir(folder):
            raise OutputError(f"output folder {folder} does not exist")
        if path is not None and not _same_file_system(path, folder):
            path = None
        self.folder = folder
        self.borrowed = path is not None
        # the name is known before the folder exists, so an interruption at any
        # point leaves nothing the clean-up does not know about
        self.path = path if path is not None else os.path.join(folder, staging_name())
        self.created = self.borrowed

    def create(self) -> None:
        sweep_stale(self.folder)
        if self.borrowed:
            return
        try:
            os.mkdir(self.path, 0o700)
        except OSError as e:
            raise OutputError(f"cannot write in {self.folder}: {e.strerror}") from e
        self.created = True

    def file(self, name: str) -> str:
        """The staged path of *name* (relative POSIX path), its folders created."""
        if "/" not in name:
            return os.path.join(self.path, name)
        full = os.path.join(self.path, *name.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def cleanup(self) -> None:
        if self.borrowed:
            try:
                names = os.listdir(self.path)  # empty after a publish
            except OSError:
                return
            for name in names:
                entry = os.path.join(self.path, name)
                if os.path.isdir(entry) and not os.path.islink(entry):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry)
            return
        try:
            os.rmdir(self.path)  # empty after a publish: no need to walk it
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)


# -- checks and durable steps ----------------------------------------------------------------


def data_location(location: str) -> str | None:
    """An external-data location normalized to a relative POSIX path, or None if unusable."""
    if not location or "\0" in location or location.startswith(("/", "\\")):
        return None
    if len(location) > 1 and location[1] == ":":
        return None
    norm = os.path.normpath(location.replace("\\", "/")).replace(os.sep, "/")
    if norm in (".", "..") or norm.startswith("../"):
        return None
    return norm


def previous_data_files(folder: str, model: str) -> list[str]:
    """Data files that the model now at *model* (in *folder*) refers to and streamconv named.

    That is ``<model>.data``, the default name; a file under any other name
    may belong to someone else and is never listed.  An unreadable or
    malformed model lists nothing.
    """
    from .scan import map_file
    from .skeleton import build_skeleton, iter_stub_tensors, stub_id

    path = os.path.join(folder, *model.split("/"))
    ours = {f"{model}.data"}
    found: list[str] = []
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return []
    buf = None
    try:
        info = os.fstat(fd)
        if not os.path.isfile(path) or info.st_size == 0:
            return []
        buf = map_file(fd, info.st_size)
        skeleton = build_skeleton(buf, info.st_size, path, 1024, for_conversion=False)
        for tensor, _, _ in iter_stub_tensors(skeleton.model):
            if stub_id(tensor) is not None:
                continue
            for entry in tensor.external_data:
                if entry.key != "location" or not isinstance(entry.value, str):
                    continue
                location = data_location(entry.value)
                if location is None or location in found:
                    continue
                if location in ours:
                    found.append(location)
    except Exception:  # the previous output is not ours to judge: leave it all alone
        log.debug("cannot read the previous output %s", path, exc_info=True)
        return []
    finally:
        if buf is not None and hasattr(buf, "close"):
            buf.close()
        os.close(fd)
    return found


def check_destination(folder: str, names: Iterable[str]) -> None:
    """Refuse to publish *names* (relative POSIX paths) into *folder* if one cannot be a file.

    Raises OutputError naming the path: a folder (or something else that is not
    a regular file) where a file would go, or a file where a folder would be.
    """
    for name in names:
        parts = name.split("/")
        path = folder
        for part in parts[:-1]:
            path = os.path.join(path, part)
            if os.path.lexists(path) and not os.path.isdir(path):
                raise OutputError("exists and is not a folder", file=path)
        final = os.path.join(folder, *parts)
        if os.path.isdir(final):
            raise OutputError("is a folder; refusing to replace it with a file", file=final)
        if os.path.lexists(final) and not os.path.isfile(final):
            raise OutputError("exists and is not a regular file", file=final)


def _fsync_path(path: str, directory: bool = False) -> None:
    if directory and os.name != "posix":
        return  # a folder cannot be opened for syncing there; renames are durable by then
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # some file systems cannot sync a folder; the data itself was synced
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _makedirs(path: str, durable: bool, deferred: set[str] | None = None) -> None:
    """Create *path* and missing parents; with *durable*, sync each new entry's parent
    (or add the parent to *deferred*, for the caller to sync)."""
    missing = []
    path = os.path.abspath(path)  # dirname("") is "": a bare file name's folder is "."
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for new in reversed(missing):
        try:
            os.mkdir(new)
        except FileExistsError:  # another worker made it meanwhile; its parent is synced
            if not os.path.isdir(new):
                raise
        if durable:
            _sync_folder(os.path.dirname(new), deferred)


def make_folders(path: str, *, fsync: bool = True, deferred: set[str] | None = None) -> None:
    """Create the folder *path* and its missing parents, each new entry synced with *fsync*.

    With *deferred*, the folders to sync are added to it instead: the caller
    syncs them (:func:`sync_folders`) before it relies on the new entries.
    Raises OSError.
    """
    _makedirs(os.path.abspath(path), fsync, deferred)


def sync_folders(folders: Iterable[str]) -> None:
    """Sync each of *folders* (the entries changed in it reach the disk).  Raises OSError.

    Folders that no longer exist are skipped: nothing in them can be relied on.
    """
    for folder in sorted(set(folders)):
        try:
            _fsync_path(folder, directory=True)
        except FileNotFoundError:
            continue


def _sync_folder(folder: str, deferred: set[str] | None) -> None:
    if deferred is None:
        _fsync_path(folder, directory=True)
    else:
        deferred.add(folder)


def replace_file(staged: str, final: str, *, fsync: bool = True, synced: bool = False,
                 deferred: set[str] | None = None) -> None:
    """Move the complete file *staged* to *final* by rename, durably with *fsync*.

    *synced* says the caller already synced *staged* itself.  With *deferred*,
    the folder sync after the rename is left to the caller: the folder is added
    to it (the file itself is synced before the rename all the same, so the
    name never reaches the disk ahead of the bytes).
    """
    folder = os.path.dirname(os.path.abspath(final))
    _makedirs(folder, fsync, deferred)
    if fsync and not synced:
        _fsync_path(staged)
    os.replace(staged, final)
    if fsync:
        _sync_folder(folder, deferred)


def _remove_superseded(folder: str, names: Iterable[str], keep: set[str],
                       protect: Sequence[str], fsync: bool,
                       deferred: set[str] | None = None) -> None:
    for name in names:
        if name in keep:
            continue
        path = os.path.join(folder, *name.split("/"))
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        if any(_same(path, p) for p in protect):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            log.info("removed %s: the previous output's data file", path)
            if fsync:
                _sync_folder(os.path.dirname(path), deferred)


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def publish(
    staging: Staging,
    model: str,
    data: Sequence[str] = (),
    *,
    superseded: Iterable[str] = (),
    protect: Sequence[str] = (),
    fsync: bool = True,
    deferred: set[str] | None = None,
) -> None:
    """Move the staged *model* and its *data* files into place (names relative to the folder).

    Data files first, the model last; a model in place is removed first when a
    data file it may refer to is about to be replaced (see the module
    docstring).  Files named in *superseded* are removed after the new model
    is in place, unless they are part of the new output or the same file as
    one in *protect*.  Signals are held throughout.  Raises OutputError when the
    destination cannot take the files; nothing is moved then.

    With *fsync* and a *deferred* set, every file is still synced before its
    rename and every step that orders two renames (the old model's removal,
    the data files before the model) is still synced before the next, but the
    folder syncs after the model's own rename (and after superseded files are
    removed) are left to the caller: the folders are added to *deferred*.  A
    batch syncs them once per chunk of models, before it records the outputs.
    """
    folder = staging.folder
    check_destination(folder, [model, *data])

    def final(name: str) -> str:
        return os.path.join(folder, *name.split("/"))

    def staged(name: str) -> str:
        return os.path.join(staging.path, *name.split("/"))

    with signals_held():
        try:
            if fsync:
                # the slow part first, so that any moment without a model stays short
                for name in (*data, model):
                    _fsync_path(staged(name))
            if os.path.lexists(final(model)) and any(os.path.lexists(final(d)) for d in data):
                # the model in place may refer to a data file about to be replaced:
                # no model for a moment rather than a model with the wrong data
                os.unlink(final(model))
                if fsync:
                    _fsync_path(folder, directory=True)
            for name in data:
                replace_file(staged(name), final(name), fsync=fsync, synced=True)
            replace_file(staged(model), final(model), fsync=fsync, synced=True,
                         deferred=deferred)
            _remove_superseded(folder, superseded, {model, *data}, protect, fsync, deferred)
        except OSError as e:
            raise OutputError(f"cannot move the output into place: {e.strerror or e}") from e
