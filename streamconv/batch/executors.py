"""Executors: who runs the jobs.

The local pool: worker processes of our own, each converting one model at a time.
A worker that crashes (a C++ abort, a segfault) or runs past the time limit is
killed and replaced, the model is reported as failed and the batch goes on; the
parent removes the staging folder of a worker it killed or that died.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import StreamconvError
from ..publish import (
    sweep_stale,
)
from .job import run_job
from .options import BatchOptions
from .plan import Job
from .report import FAILED, ModelResult

#: How often a worker reports progress on one model, at most.
_PROGRESS_INTERVAL = 0.1
#: A model file smaller than this is expected to convert quickly, so the next job is
#: sent to its worker ahead of time.
_PREFETCH_BELOW = 1 << 20
#: Workers that die before taking a job, in a row, before the batch gives up.
_MAX_START_FAILURES = 3
_JOIN_SECONDS = 5.0

#: What a worker runs: ``python -c _WORKER_BOOT <socket fd> <sys.path>``.
#: It takes the parent's import path, so it imports this very copy of streamconv.
_WORKER_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from streamconv.batch.executors import _worker_main; _worker_main(int(sys.argv[1]))"
)


def _worker_main(fd: int) -> None:
    """Body of a worker process: options, then jobs, from the socket *fd* until None or EOF.

    The parent started us with stdout on /dev/null and stderr on a log file it
    reads when we die, in a session of our own so that a Ctrl-C at the terminal
    reaches only the parent, which decides what happens to us.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    conn = Connection(fd)
    try:
        options = conn.recv()
    except (EOFError, OSError):
        return
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if job is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(2, 0)  # the log holds what this job wrote, nothing older
        last = time.monotonic()  # a model done within the interval sends no progress at all

        def send_progress(done: int, index: int = job.index) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= _PROGRESS_INTERVAL:
                last = now
                conn.send(("progress", index, done))

        conn.send(("done", job.index, run_job(job, options, send_progress)))

def exit_description(code: int | None) -> str:
    """How a child process ended, from its return code, in words."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _Slot:
    """One worker process and the job it is on."""

    def __init__(self, options: BatchOptions, log_path: str) -> None:
        self.log_path = log_path
        ours, theirs = socket.socketpair()
        try:
            with open(log_path, "ab") as log:
                # A plain subprocess rather than multiprocessing: it imports only streamconv,
                # never the caller's __main__, and works whatever that main module is.
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _WORKER_BOOT, str(theirs.fileno()),
                     json.dumps(sys.path)],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                )
        except OSError as e:
            ours.close()
            raise StreamconvError(f"cannot start a worker process: {e.strerror}") from e
        finally:
            theirs.close()  # so that our end reads EOF when the worker dies
        self.conn = Connection(ours.detach())
        self.conn.send(options)
        self.ready = False
        self.dead = False
        #: jobs sent and not yet done: the first is running, the others wait in the socket
        self.jobs: deque[Job] = deque()
        #: when the running job started (as far as the parent can tell)
        self.started = 0.0
        #: model-file bytes of the running job done so far
        self.partial = 0

    @property
    def job(self) -> Job | None:
        """The job the worker is on, if any."""
        return self.jobs[0] if self.jobs else None

    def give(self, job: Job) -> bool:
        try:
            self.conn.send(job)
        except OSError:
            self.dead = True
            return False
        if not self.jobs:
            self.started, self.partial = time.monotonic(), 0
        self.jobs.append(job)
        return True

    def finish(self) -> None:
        """The running job is done; the next one sent, if any, runs from now."""
        self.jobs.popleft()
        self.started, self.partial = time.monotonic(), 0

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
        if self.job is not None and self.proc.poll() is not None:
            # the owner is gone now, so its staging folder counts as stale
            sweep_stale(os.path.dirname(self.job.dst))

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
    """Worker processes that survive crashes and time-outs of the models they convert."""

    def __init__(self, options: BatchOptions, dst_dir: str, workdir: str,
                 on_result: Callable[[ModelResult, int], None],
                 on_progress: Callable[[int], None]) -> None:
        self.options = options
        self.dst_dir = dst_dir
        self.workdir = workdir
        self.on_result = on_result
        self.on_progress = on_progress
        self.started = 0
        self.start_failures = 0
        self.slots: list[_Slot] = []

    def _start(self) -> _Slot:
        self.started += 1
        log_path = os.path.join(self.workdir, f"worker-{self.started}.log")
        return _Slot(self.options, log_path)

    def _lost(self, slot: _Slot, reason: str, pending: deque[Job]) -> None:
        """Report the running job of a dead or killed worker as failed.

        Jobs sent to it that had not started go back to the front of *pending*.
        """
        job = slot.job
        if job is None:
            return
        slot.jobs.popleft()
        pending.extendleft(reversed(slot.jobs))
        slot.jobs.clear()
        self.on_result(ModelResult(
            source=job.rel, destination=job.rel, status=FAILED, action="convert",
            opset_to=self.options.opset, bytes_in=job.size,
            seconds=round(time.monotonic() - slot.started, 4), error=reason,
        ), self._partial_bytes())

    def run(self, jobs: Sequence[Job]) -> None:
        """Run every job; results arrive through on_result.  Cleans up on any exit."""
        # Largest first, so a huge model starts early and runs beside the small ones.
        pending = deque(sorted(jobs, key=lambda j: (-j.size, j.index)))
        self.slots = [self._start() for _ in range(min(self.options.jobs, len(pending)))]
        retired: list[_Slot] = []
        try:
            while pending or any(s.job is not None for s in self.slots):
                self._wait()
                for slot in list(self.slots):
                    for message in slot.messages():
                        self._handle(slot, message)
                    if slot.gone():
                        if slot.job is None and not slot.ready:
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
                        self._lost(slot, f"timed out after {self.options.timeout:g} s", pending)
                        self._replace(slot, pending)
                for slot in self.slots:
                    while slot.ready and pending and len(slot.jobs) < self._depth(slot):
                        job = pending.popleft()
                        if not slot.give(job):
                            pending.appendleft(job)
                            break
                if not pending:  # nothing left to hand out: let idle workers go
                    for slot in [s for s in self.slots if s.job is None]:
                        self.slots.remove(slot)
                        retired.append(slot)
                        with contextlib.suppress(OSError):
                            slot.conn.send(None)
        finally:
            with _signals_held():
                self._shutdown(self.slots + retired)

    @staticmethod
    def _depth(slot: _Slot) -> int:
        """How many jobs a worker may hold: one more behind a small running job.

        The extra job waits in the worker's socket, so the worker goes on without
        waiting for us; behind a large model it would wait, so none is queued there.
        """
        running = slot.job
        return 2 if running is not None and running.size < _PREFETCH_BELOW else 1

    def _replace(self, slot: _Slot, pending: Sequence[Job]) -> None:
        """Swap a dead worker for a fresh one, if there is still work for it."""
        self.slots.remove(slot)
        if pending:
            self.slots.append(self._start())

    def _overdue(self, slot: _Slot) -> bool:
        timeout = self.options.timeout
        return timeout is not None and time.monotonic() - slot.started > timeout

    def _wait(self) -> None:
        timeout = None
        if self.options.timeout is not None:
            ends = [s.started + self.options.timeout for s in self.slots if s.job is not None]
            if ends:
                timeout = max(0.0, min(ends) - time.monotonic()) + 0.01
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
            self.on_progress(self._partial_bytes())
        elif kind == "done" and slot.job is not None and message[1] == slot.job.index:
            slot.finish()
            self.on_result(message[2], self._partial_bytes())

    def _partial_bytes(self) -> int:
        return sum(s.partial for s in self.slots if s.job is not None)

    def _shutdown(self, slots: Sequence[_Slot]) -> None:
        for slot in slots:
            if slot.job is not None or not slot.ready:
                slot.kill()  # interrupted mid-job: the parent, not the worker, cleans up
            else:
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
        for slot in slots:
            slot.join(_JOIN_SECONDS)
            slot.kill()
