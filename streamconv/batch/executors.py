"""Executors: who runs the jobs.

The local pool: worker processes of our own.  Each imports onnx once and
converts model after model; small models go to it in chunks (one message for
many models), large ones alone.  A worker that crashes (a C++ abort, a
segfault) or runs past the time limit on one model is killed and replaced: that
model is reported as failed, the models of its chunk it had not reached go to
the next worker, and the batch goes on; the parent removes the staging folder
of a worker it killed or that died.

Durability is paid per chunk, not per model: every output file is synced before
its rename as always, but the folder syncs after the renames are collected and
done once per folder when the chunk is through, and only then does the parent
take the chunk's outputs as done (the manifest records nothing that is not
durably in place).  When a worker dies before that, the parent syncs the folders
of the outputs it had published and then takes them as done (an output whose
folder cannot be synced is reported, but not recorded: the next run redoes it).

The same worker processes run the Dask executor's chunks (:class:`LocalPool`
with ``persistent``), one per task running on a Dask worker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import Interrupted, StreamconvError
from ..publish import make_staging, sweep_stale, sync_folders
from .job import run_job
from .options import BatchOptions
from .plan import Job
from .report import FAILED, ModelResult, error_text

__all__ = ["CHUNK_BELOW", "CHUNK_MODELS", "LocalPool", "exit_description", "plan_chunks"]

#: How often a worker reports progress on one model, at most.
_PROGRESS_INTERVAL = 0.1
#: A model file smaller than this is expected to convert quickly: such models go to
#: the workers in chunks, and the next chunk is sent to a worker ahead of time.
CHUNK_BELOW = 1 << 20
#: Most models in one chunk.
CHUNK_MODELS = 32
#: Chunks per worker at least, so that the last ones spread evenly over the workers.
_CHUNKS_PER_WORKER = 4
#: After the parent handled what the workers sent, it lets their next messages gather
#: this long before it looks again (a worker holds its next chunk, so nothing waits):
#: one wake-up for many small models' results instead of one each.
_GATHER_SECONDS = 0.02
#: Workers that die before taking a job, in a row, before the batch gives up.
_MAX_START_FAILURES = 3
_JOIN_SECONDS = 5.0
#: how often a persistent pool's run looks whether it was cancelled
_CANCEL_POLL_SECONDS = 0.2

#: What a worker runs: ``python -c _WORKER_BOOT <socket fd> <sys.path> <parent pid>``.
#: It takes the parent's import path, so it imports this very copy of streamconv.
_WORKER_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from streamconv.batch.executors import _worker_main; "
    "_worker_main(int(sys.argv[1]), int(sys.argv[3]))"
)


def plan_chunks(jobs: Sequence[Job], workers: int) -> list[list[Job]]:
    """Group *jobs* for *workers* processes: largest first, each large model alone,
    small ones (under :data:`CHUNK_BELOW`) together, at most :data:`CHUNK_MODELS` a
    chunk and at least a few chunks per worker."""
    ordered = sorted(jobs, key=lambda j: (-j.size, j.index))
    chunks = [[j] for j in ordered if j.size >= CHUNK_BELOW]
    small = [j for j in ordered if j.size < CHUNK_BELOW]
    size = max(1, min(CHUNK_MODELS, math.ceil(len(small) / (max(1, workers)
                                                          * _CHUNKS_PER_WORKER))))
    chunks += [small[i:i + size] for i in range(0, len(small), size)]
    return chunks


def _folders_of(job: Job) -> set[str]:
    """The folders whose sync a job's publish may have left to its worker: the output's
    own and each above it up to DST (new ones among them)."""
    folders = set()
    path = os.path.dirname(job.dst)
    for _ in range(job.rel.count("/") + 1):
        folders.add(path)
        path = os.path.dirname(path)
    return folders


def _die_with_parent(parent: int) -> None:
    """Linux: get SIGKILL when the thread that started us ends (the Dask worker's
    spawning thread, which lives as long as its process), so a killed Dask worker
    leaves no conversion running behind it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the request took hold
        os._exit(1)


def _worker_main(fd: int, parent: int = 0) -> None:
    """Body of a worker process: chunks of jobs from the socket *fd* until None or EOF.

    Each message is ``(options, jobs)``; for each job the worker sends
    ``("done", index, result)`` as soon as it is published, then, when the chunk
    is through and the folders its outputs changed are synced, ``("synced",
    indices, error)``.  The parent started us with stdout on /dev/null and stderr
    on a log file it reads when we die, in a session of our own so that a Ctrl-C
    at the terminal reaches only the parent, which decides what happens to us.
    With *parent*, we die with the thread that started us.
    """
    if parent:
        _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    conn = Connection(fd)
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message is None:
            return
        options, chunk = message
        folders: set[str] | None = set() if options.fsync else None
        # one staging folder for the chunk, at the top of DST, rather than one per model
        # beside each output (renames move the outputs from it into their folders)
        staging = None
        with contextlib.suppress(StreamconvError, OSError):
            if chunk:
                staging = make_staging(chunk[0].root)
        for job in chunk:
            with contextlib.suppress(OSError):
                os.ftruncate(2, 0)  # the log holds what this job wrote, nothing older
            last = time.monotonic()  # a model done within the interval sends no progress

            def send_progress(done: int, index: int = job.index) -> None:
                nonlocal last
                now = time.monotonic()
                if now - last >= _PROGRESS_INTERVAL:
                    last = now
                    conn.send(("progress", index, done))

            conn.send(("done", job.index,
                       run_job(job, options, send_progress, folders, staging)))
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        error = None
        try:
            sync_folders(folders or ())
        except OSError as e:
            error = error_text(e)
        conn.send(("synced", [job.index for job in chunk], error))


def exit_description(code: int | None) -> str:
    """How a child process ended, from its return code, in words."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


#: Starts the workers that must die with their parent (see :func:`_die_with_parent`):
#: its one thread lives as long as the process, unlike the threads Dask runs tasks on.
_SPAWNER: concurrent.futures.ThreadPoolExecutor | None = None
_SPAWNER_LOCK = threading.Lock()


def _popen(argv: list[str], *, die_with_parent: bool, **kwargs: Any) -> subprocess.Popen[bytes]:
    global _SPAWNER

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, **kwargs)

    if not die_with_parent:
        return start()
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamconv")
    return _SPAWNER.submit(start).result()


class _Slot:
    """One worker process and the chunks it holds."""

    def __init__(self, log_path: str, die_with_parent: bool = False,
                 environ: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        ours, theirs = socket.socketpair()
        try:
            with open(log_path, "ab") as log:
                # A plain subprocess rather than multiprocessing: it imports only streamconv,
                # never the caller's __main__, and works whatever that main module is.
                self.proc = _popen(
                    [sys.executable, "-c", _WORKER_BOOT, str(theirs.fileno()),
                     json.dumps(sys.path), str(os.getpid() if die_with_parent else 0)],
                    die_with_parent=die_with_parent, env=environ,
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                )
        except OSError as e:
            ours.close()
            raise StreamconvError(f"cannot start a worker process: {e.strerror}") from e
        finally:
            theirs.close()  # so that our end reads EOF when the worker dies
        self.conn = Connection(ours.detach())
        self.ready = False
        self.dead = False
        #: chunks sent and not yet synced, each the jobs not yet done: the first job of
        #: the first chunk is running (an empty first chunk: its folders are being synced)
        self.chunks: deque[deque[Job]] = deque()
        #: the first chunk's jobs done, with their results, held until its folders are synced
        self.held: list[tuple[Job, ModelResult]] = []
        #: when the running job started (as far as the parent can tell)
        self.started = 0.0
        #: model-file bytes of the running job done so far
        self.partial = 0
        #: DST of the chunks given, where the worker keeps a staging folder
        self.root: str | None = None

    @property
    def job(self) -> Job | None:
        """The job the worker is on, if any."""
        return self.chunks[0][0] if self.chunks and self.chunks[0] else None

    @property
    def busy(self) -> bool:
        return bool(self.chunks)

    def give(self, options: BatchOptions, chunk: Sequence[Job]) -> bool:
        try:
            self.conn.send((options, list(chunk)))
        except OSError:
            self.dead = True
            return False
        if not self.chunks:
            self.started, self.partial = time.monotonic(), 0
        self.chunks.append(deque(chunk))
        if chunk:
            self.root = chunk[0].root
        return True

    def finish(self, result: ModelResult) -> None:
        """The running job is done; the next one sent, if any, runs from now."""
        self.held.append((self.chunks[0].popleft(), result))
        self.started, self.partial = time.monotonic(), 0

    def synced(self) -> list[tuple[Job, ModelResult]]:
        """The first chunk's folders are synced: its results, no longer held."""
        self.chunks.popleft()
        held, self.held = self.held, []
        self.started, self.partial = time.monotonic(), 0
        return held

    def lost(self) -> tuple[Job | None, list[tuple[Job, ModelResult]], list[list[Job]]]:
        """For a dead worker: (its running job, results done but not synced, the chunks
        of the jobs it had not started)."""
        running = self.job
        if running is not None:
            self.chunks[0].popleft()
        rest = [list(chunk) for chunk in self.chunks if chunk]
        self.chunks.clear()
        held, self.held = self.held, []
        return running, held, rest

    def messages(self) -> Iterator[tuple[Any, ...]]:
        try:
            while not self.dead and self.conn.poll():
                yield self.conn.recv()
        except (EOFError, OSError):
            self.dead = True

    def gone(self) -> bool:
        return self.dead or self.proc.poll() is not None

    def join(self, seconds: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(seconds)

    def kill(self) -> None:
        """End the process and remove the staging folder of its running job, if any."""
        alive = self.proc.poll() is None
        try:
            # the worker leads its own process group: this also ends a copy
            # process it forked, even when the worker itself already died
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (OSError, AttributeError):
            if alive:
                self.proc.kill()
        self.join(_JOIN_SECONDS)
        self.conn.close()
        if self.proc.poll() is not None:
            # the owner is gone now, so its staging folders count as stale: a chunk's
            # at the top of DST, and the one a model may have made beside its output
            if self.root is not None:
                sweep_stale(self.root)
            if self.job is not None:
                sweep_stale(os.path.dirname(self.job.dst))

    def stop(self) -> None:
        """Ask an idle worker to end."""
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def death(self) -> str:
        """Why the process ended, with the last line it wrote to stderr if any."""
        self.join(_JOIN_SECONDS)
        how = exit_description(self.proc.returncode)
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f.read()[-4000:].splitlines() if line.strip()]
        except OSError:
            lines = []
        return how + (f"; last message: {lines[-1][:200]}" if lines else "")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread: nothing to hold
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LocalPool:
    """Worker processes that survive crashes and time-outs of the models they convert.

    ``run`` hands out chunks of jobs and passes every model's result to
    *on_result* once its output is durably in place (with ``inputs`` cleared
    when it is in place but its folder could not be synced, so that nothing
    records it as done).  With *persistent*, the workers idle between runs instead of
    ending (the Dask executor keeps one per task slot); :meth:`close` ends them.
    The workers get *environ* as their environment (default: this process's).
    """

    def __init__(self, workdir: str, on_progress: Callable[[int], None] | None = None, *,
                 persistent: bool = False, environ: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.on_progress = on_progress
        self.persistent = persistent
        self.environ = environ
        self.started = 0
        self.start_failures = 0
        self.slots: list[_Slot] = []
        self.idle: list[_Slot] = []
        self.options: BatchOptions | None = None
        self.on_result: Callable[[ModelResult, int], None] = lambda m, p: None
        #: set from another thread (:meth:`cancel`): ``run`` stops as on Ctrl-C
        self.cancelled = threading.Event()

    def warm(self, workers: int) -> None:
        """Start *workers* processes now, for the next ``run``: they import onnx while
        the caller does other work."""
        while len(self.idle) < workers:
            self.started += 1
            log_path = os.path.join(self.workdir, f"worker-{self.started}.log")
            self.idle.append(_Slot(log_path, die_with_parent=self.persistent,
                                   environ=self.environ))

    def discard(self) -> None:
        """Kill the idle workers at once (started by :meth:`warm` and not needed)."""
        idle, self.idle = self.idle, []
        for slot in idle:
            slot.kill()

    def cancel(self) -> None:
        """Make a ``run`` in another thread stop as on Ctrl-C: its workers are killed,
        their staging folders removed, and it raises Interrupted."""
        self.cancelled.set()

    def _start(self) -> _Slot:
        if self.idle:
            slot = self.idle.pop()
            if not slot.gone():
                return slot
            slot.kill()
        self.started += 1
        log_path = os.path.join(self.workdir, f"worker-{self.started}.log")
        return _Slot(log_path, die_with_parent=self.persistent, environ=self.environ)

    def _failed(self, job: Job, seconds: float, reason: str) -> ModelResult:
        assert self.options is not None
        return ModelResult(source=job.rel, destination=job.rel, status=FAILED,
                           action="convert", opset_to=self.options.opset, bytes_in=job.size,
                           seconds=round(seconds, 4), error=reason)

    def _release(self, done: Sequence[tuple[Job, ModelResult]], error: str | None = None,
                 *, sync: bool = False) -> None:
        """Pass on the results of outputs in place whose folders are synced.

        With *sync* (the worker ended before it synced them), the folders are
        synced here first.  Where a sync failed, the result goes on unrecorded
        (``inputs`` cleared), so that the next run redoes the output.
        """
        assert self.options is not None
        if sync and done and self.options.fsync:
            try:
                sync_folders(set().union(*(_folders_of(job) for job, _ in done)))
            except OSError as e:
                error = error_text(e)
        for _, model in done:
            if error is not None and model.inputs is not None:
                model = dataclasses.replace(model, inputs=None, warnings=[
                    *model.warnings, f"its folder could not be synced ({error}); it is "
                    "redone next time"])
            self.on_result(model, self._partial_bytes())

    def _lost(self, slot: _Slot, reason: str, pending: deque[list[Job]]) -> None:
        """Report the running job of a dead or killed worker as failed.

        Jobs sent to it that had not started go back to the front of *pending*;
        outputs it published whose folders it had not synced are reported, unrecorded.
        """
        running, held, rest = slot.lost()
        pending.extendleft(reversed(rest))
        self._release(held, sync=True)
        if running is not None:
            self.on_result(self._failed(running, time.monotonic() - slot.started, reason),
                           self._partial_bytes())

    def run(self, chunks: Sequence[Sequence[Job]], options: BatchOptions,
            on_result: Callable[[ModelResult, int], None]) -> None:
        """Run every chunk; results arrive through *on_result*.  Cleans up on any exit."""
        self.options, self.on_result = options, on_result
        pending: deque[list[Job]] = deque(list(c) for c in chunks if c)
        self.slots = [self._start() for _ in range(min(options.jobs, len(pending)))]
        retired: list[_Slot] = []
        try:
            while pending or any(s.busy for s in self.slots):
                if self.cancelled.is_set():
                    raise Interrupted(int(signal.SIGINT))
                self._hand_out(pending)
                self._wait()
                handled = 0
                for slot in list(self.slots):
                    for message in slot.messages():
                        self._handle(slot, message)
                        handled += 1
                    if slot.gone():
                        if not slot.busy and not slot.ready:
                            self.start_failures += 1
                            if self.start_failures >= _MAX_START_FAILURES:
                                raise StreamconvError(
                                    f"worker processes die on start-up ({slot.death()})"
                                )
                        slot.kill()
                        self._lost(slot, f"the converter process died ({slot.death()})", pending)
                        self._replace(slot, pending)
                    elif slot.job is not None and self._overdue(slot):
                        slot.kill()
                        self._lost(slot, f"timed out after {options.timeout:g} s", pending)
                        self._replace(slot, pending)
                self._hand_out(pending)
                if not pending:  # nothing left to hand out: let idle workers go
                    for slot in [s for s in self.slots if not s.busy]:
                        self.slots.remove(slot)
                        retired.append(slot)
                        if not self.persistent:
                            slot.stop()
                if handled and any(s.busy for s in self.slots) and (not pending or all(
                        len(s.chunks) >= self._depth(s) for s in self.slots if s.ready)):
                    time.sleep(_GATHER_SECONDS)  # no worker waits for us meanwhile
        finally:
            with _signals_held():
                self._shutdown(self.slots + retired)
                self.slots = []

    def _hand_out(self, pending: deque[list[Job]]) -> None:
        assert self.options is not None
        for slot in self.slots:
            while slot.ready and pending and len(slot.chunks) < self._depth(slot):
                chunk = pending.popleft()
                if not slot.give(self.options, chunk):
                    pending.appendleft(chunk)
                    break

    @staticmethod
    def _depth(slot: _Slot) -> int:
        """How many chunks a worker may hold: one more behind a chunk of small models.

        The extra chunk waits in the worker's socket, so the worker goes on without
        waiting for us; behind a large model it would wait, so none is queued there.
        """
        running = slot.job
        return 2 if running is not None and running.size < CHUNK_BELOW else 1

    def _replace(self, slot: _Slot, pending: Sequence[Sequence[Job]]) -> None:
        """Swap a dead worker for a fresh one, if there is still work for it."""
        self.slots.remove(slot)
        if pending:
            self.slots.append(self._start())

    def _overdue(self, slot: _Slot) -> bool:
        assert self.options is not None
        timeout = self.options.timeout
        return timeout is not None and time.monotonic() - slot.started > timeout

    def _wait(self) -> None:
        assert self.options is not None
        timeout = None
        if self.options.timeout is not None:
            ends = [s.started + self.options.timeout for s in self.slots if s.job is not None]
            if ends:
                timeout = max(0.0, min(ends) - time.monotonic()) + 0.01
        if self.persistent:  # another thread may cancel the run
            timeout = _CANCEL_POLL_SECONDS if timeout is None else \
                min(timeout, _CANCEL_POLL_SECONDS)
        # A worker's socket turns readable on each message and at EOF when it dies.
        handles = [s.conn for s in self.slots if not s.dead]
        if handles:
            wait(handles, timeout)

    def _handle(self, slot: _Slot, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            slot.ready = True
            self.start_failures = 0
        elif kind == "progress" and slot.job is not None and message[1] == slot.job.index:
            slot.partial = int(message[2])
            if self.on_progress is not None:
                self.on_progress(self._partial_bytes())
        elif kind == "done" and slot.job is not None and message[1] == slot.job.index:
            slot.finish(message[2])
        elif kind == "synced" and slot.chunks and not slot.chunks[0]:
            self._release(slot.synced(), message[2])

    def _partial_bytes(self) -> int:
        return sum(s.partial for s in self.slots if s.job is not None)

    def _shutdown(self, slots: Sequence[_Slot]) -> None:
        ending = []
        for slot in slots:
            if slot.busy or not slot.ready:
                # results it sent that were not read yet: those outputs are in place too
                for message in slot.messages():
                    if message[0] in ("done", "synced"):
                        self._handle(slot, message)
                slot.kill()  # interrupted mid-job: the parent, not the worker, cleans up
                self._release(slot.lost()[1], sync=True)
            elif self.persistent and not slot.gone():
                self.idle.append(slot)
            else:
                slot.stop()
                ending.append(slot)
        for slot in ending:
            slot.join(_JOIN_SECONDS)
            slot.kill()

    def close(self) -> None:
        """End the idle workers of a persistent pool."""
        idle, self.idle = self.idle, []
        for slot in idle:
            slot.stop()
        for slot in idle:
            slot.join(_JOIN_SECONDS)
            slot.kill()
