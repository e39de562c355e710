"""The Dask executor: one task per chunk of models on a Dask cluster (``--scheduler``).

Models are grouped as the local pool groups them (:func:`.executors.plan_chunks`:
large models alone, small ones in chunks).  A task runs its chunk on a worker
process of the local pool's kind, started by the Dask worker and kept for the
next tasks (so onnx is imported once per Dask worker, not once per model), with
the local pool's guarantees: an abort or a segfault in onnx's C++ code fails
that model and not the Dask worker, the models of the chunk after it run on a
fresh process, the time limit holds per model, folders are synced once per
chunk.  That process dies with its Dask worker (``PR_SET_PDEATHSIG``), and the
staging folder of a process that died is removed (its owner is gone).  A Dask
worker lost mid-task (Dask's ``KilledWorker``) has its chunk retried once
elsewhere; a chunk lost twice is split, each of its models retried as a task of
its own, and a single model lost twice is reported as failed with the reason.
Workers must share SRC and DST (a shared file system).  ``--scheduler local``
runs its Dask workers as threads of the batch's own process (each still with
its conversion process): a Ctrl-C there kills the conversion processes.

``distributed`` is an optional dependency: ``pip install streamconv[dask]``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UsageError
from ..publish import sweep_stale
from .executors import LocalPool, plan_chunks
from .options import BatchOptions
from .plan import Job
from .report import FAILED, ModelResult

__all__ = ["DaskExecutor", "memory_estimate", "run_chunk"]

#: Times Dask may rerun a task whose worker was lost, before the chunk is split
#: (or, for a single model, before it fails).
RETRIES = 1
#: The Dask resource a task claims, in bytes, when every worker declares it
#: (``dask worker --resources MEMORY=8e9``).  ``--scheduler local`` declares none:
#: its workers run one task at a time each, so a claim could never hold one back,
#: and estimating it reads every model once more in the batch's own process.
MEMORY = "MEMORY"
#: Memory of a conversion before its model counts: interpreter, onnx, numpy and the
#: copy process (measured about 55 MB each; rounded up).
BASE_MEMORY = 256 << 20
#: Memory per skeleton byte and per node while onnx converts and checks the skeleton
#: (the benchmark measured about 6 KB per node on graph-heavy models; with margin).
PER_SKELETON_BYTE = 16
PER_NODE = 16 << 10
#: How long the batch waits for a cancelled local task's worker process to end before
#: it removes the process's staging folders.
_SWEEP_SECONDS = 30.0
#: after a batch, how long staging folders still owned (a lost task's process that is
#: still dying) are waited for; another live batch's folders are never removed
_LOST_SWEEP_SECONDS = 5.0
#: A Dask worker ends its idle conversion processes after this long without a task.
IDLE_SECONDS = 60.0

# -- the task side: runs on a Dask worker ----------------------------------------------------

_IDLE_POOLS: list[LocalPool] = []
#: pools running a task now, in this process (in-process workers: --scheduler local)
_RUNNING: set[LocalPool] = set()
_LAST_USED: dict[int, float] = {}
_LOCK = threading.Lock()


def _close(pool: LocalPool) -> None:
    pool.close()
    shutil.rmtree(pool.workdir, ignore_errors=True)


def _acquire() -> LocalPool:
    """An idle pool of one persistent worker process, or a new one."""
    with _LOCK:
        if _IDLE_POOLS:
            return _IDLE_POOLS.pop()
    return _new_pool()


def _new_pool() -> LocalPool:
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ (64 KiB) for its workers, so that they
    # hand memory back soon; a conversion process frees and takes back the same few
    # MB on every model (onnx's converter copies every operator schema per call), and
    # with it took about a quarter more CPU time.  Its memory is bounded per model.
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    pool = LocalPool(tempfile.mkdtemp(prefix="streamconv-task-"), persistent=True,
                     environ=environ)
    atexit.register(_close, pool)
    return pool


def warm_local(count: int) -> None:
    """Have *count* conversion processes idle in this process for its in-process Dask
    workers' first tasks (``--scheduler local``): they import onnx while the batch
    plans and Dask is imported and started."""
    if importlib.util.find_spec("distributed") is None:
        return  # the run stops with what to install
    while True:
        with _LOCK:
            if len(_IDLE_POOLS) >= count:
                return
        pool = _new_pool()
        pool.warm(1)
        _release(pool)


def discard_idle() -> None:
    """Kill this process's idle conversion processes now (a batch that needed none)."""
    with _LOCK:
        idle = list(_IDLE_POOLS)
        _IDLE_POOLS.clear()
    for pool in idle:
        pool.discard()
        shutil.rmtree(pool.workdir, ignore_errors=True)


def _release(pool: LocalPool) -> None:
    with _LOCK:
        _IDLE_POOLS.append(pool)
        _LAST_USED[id(pool)] = time.monotonic()
    timer = threading.Timer(IDLE_SECONDS, _close_idle)
    timer.daemon = True
    timer.start()


def _close_idle() -> None:
    """End the pools nobody used for IDLE_SECONDS (their processes hold memory)."""
    now = time.monotonic()
    with _LOCK:
        stale = [p for p in _IDLE_POOLS if now - _LAST_USED.get(id(p), now) >= IDLE_SECONDS - 1]
        for pool in stale:
            _IDLE_POOLS.remove(pool)
            _LAST_USED.pop(id(pool), None)
    for pool in stale:
        _close(pool)


def run_chunk(jobs: Sequence[Job], options: BatchOptions) -> list[ModelResult]:
    """Run *jobs* in order on a persistent worker process of this Dask worker; their results.

    This is the Dask task.  A crash or a time-out fails only its model (the
    rest of the chunk goes on in a fresh process); it never raises for a model.
    A model whose output is in place but whose folder could not be synced comes
    back with ``inputs`` cleared, so that the manifest does not record it.
    """
    results: list[ModelResult] = []
    pool = _acquire()
    with _LOCK:
        _RUNNING.add(pool)
    try:
        pool.run([list(jobs)], dataclasses.replace(options, jobs=1),
                 lambda model, partial: results.append(model))
    except BaseException:
        # the pool killed its process and removed its staging folder; nothing of it stays
        _close(pool)
        if pool.cancelled.is_set():
            return results  # the batch in this process was interrupted: nobody waits
        raise
    finally:
        with _LOCK:
            _RUNNING.discard(pool)
    _release(pool)
    return results


def _cancel_running(seconds: float = _SWEEP_SECONDS) -> None:
    """Stop the tasks running in this process's Dask workers (their conversion
    processes killed, staging folders removed), waiting at most *seconds*."""
    with _LOCK:
        running = list(_RUNNING)
    for pool in running:
        pool.cancel()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with _LOCK:
            if not _RUNNING:
                return
        time.sleep(0.05)


# -- the client side -------------------------------------------------------------------------


def _failed(job: Job, options: BatchOptions, error: str) -> ModelResult:
    return ModelResult(source=job.rel, destination=job.rel, status=FAILED, action="convert",
                       opset_to=options.opset, bytes_in=job.size, error=error)


def memory_estimate(job: Job, options: BatchOptions) -> int:
    """Bytes a conversion of *job* may hold: driven by its skeleton and node count,
    not the file size (payloads are streamed, never held)."""
    from ..skeleton import _all_node_lists
    from .plan import probe_model

    try:
        model = probe_model(job.src, options.size_threshold).model
    except Exception:  # the job itself reports an unreadable model
        return BASE_MEMORY
    nodes = sum(len(container.node) for container in _all_node_lists(model))
    return BASE_MEMORY + PER_SKELETON_BYTE * model.ByteSize() + PER_NODE * nodes


def _declared_memory(client: Any) -> int | None:
    """The smallest MEMORY resource the workers declare, or None if one declares none."""
    workers = client.scheduler_info().get("workers", {}).values()
    amounts = [w.get("resources", {}).get(MEMORY) for w in workers]
    if not amounts or any(a is None for a in amounts):
        return None
    return int(min(amounts))


def _threads(client: Any) -> int:
    workers = client.scheduler_info().get("workers", {}).values()
    return sum(int(w.get("nthreads", 1) or 1) for w in workers) or 1


def _sweep(folders: set[str], seconds: float = _SWEEP_SECONDS) -> None:
    """Remove the staging folders that cancelled or lost tasks' processes left, once
    they end (waiting at most *seconds* for staging folders still owned)."""
    deadline = time.monotonic() + seconds
    pending = set(folders)
    while pending:
        for folder in list(pending):
            sweep_stale(folder)
            try:
                if not any(n.startswith(".streamconv-") for n in os.listdir(folder)):
                    pending.discard(folder)
            except (FileNotFoundError, NotADirectoryError):
                pending.discard(folder)  # not a local folder (a URL) or gone: nothing left
            except OSError:
                pass
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _import_distributed() -> Any:
    logger = logging.getLogger("distributed")
    level = logger.level  # what the caller chose (the command line: WARNING unless -v)
    try:
        import distributed
    except ImportError as e:
        raise UsageError("--scheduler needs Dask distributed: pip install 'streamconv[dask]'"
                         ) from e
    if level:
        # importing distributed applies Dask's own logging configuration (INFO) over it
        logger.setLevel(level)
    return distributed


class DaskExecutor:
    """Runs jobs as Dask tasks, a chunk each; results come back through *on_result*
    model by model as each chunk ends."""

    def __init__(self, options: BatchOptions,
                 on_result: Callable[[ModelResult, int], None]) -> None:
        self.options = options
        self.on_result = on_result

    def run(self, jobs: Sequence[Job]) -> None:
        options = self.options
        if options.scheduler == "local":
            warm_local(min(options.jobs, len(jobs)))
        distributed = _import_distributed()
        cluster = None
        if options.scheduler == "local":
            # Workers in this process: each task already runs on a conversion process
            # of the worker's own (crash isolation, time limits), so worker processes
            # would only relay to it; they cost a second of start-up on 2 cores
            # (importing distributed twice per worker) and CPU all along.
            cluster = distributed.LocalCluster(
                n_workers=options.jobs, threads_per_worker=1, processes=False,
                dashboard_address=None,
            )
            client = distributed.Client(cluster)
        elif options.scheduler_file is not None:
            client = distributed.Client(scheduler_file=options.scheduler_file)
        else:
            client = distributed.Client(options.scheduler)
        futures: dict[Any, list[Job]] = {}
        try:
            # a task claims memory only where every worker declares how much it has,
            # and never more than the smallest has (or it would never run)
            declared = _declared_memory(client)

            def submit(chunk: list[Job]) -> Any:
                extra: dict[str, Any] = {}
                if declared is not None:
                    # the models of a chunk run one after the other
                    need = max(memory_estimate(job, options) for job in chunk)
                    extra["resources"] = {MEMORY: min(need, declared)}
                # largest first, as the local pool does; retries cover a lost worker
                key = f"streamconv-{chunk[0].index}-{os.getpid()}-{time.time_ns()}"
                future = client.submit(run_chunk, chunk, options, pure=False, key=key,
                                       retries=RETRIES, priority=max(j.size for j in chunk),
                                       **extra)
                futures[future] = chunk
                return future

            for chunk in plan_chunks(jobs, _threads(client)):
                submit(chunk)
            finished = distributed.as_completed(list(futures))
            for future in finished:
                chunk = futures.pop(future)
                try:
                    results = future.result()
                except distributed.KilledWorker:
                    if len(chunk) > 1:  # lost twice: which model did it? each alone finds out
                        for job in chunk:
                            finished.add(submit([job]))
                        continue
                    results = [_failed(chunk[0], options,
                                       f"the Dask worker running it was lost {RETRIES + 1} "
                                       "times (KilledWorker); nothing of it was published")]
                except Exception as e:  # a task error is its models' failure
                    reason = f"Dask task failed: {type(e).__name__}: " \
                        f"{' '.join(str(e).split())[:300]}"
                    results = [_failed(job, options, reason) for job in chunk]
                for model in results:
                    self.on_result(model, 0)
            # a worker lost mid-task (retried elsewhere) leaves its process's staging
            # folder until that process has died; remove it once it has
            _sweep({os.path.dirname(j.dst) for j in jobs} | {j.root for j in jobs[:1]},
                   seconds=_LOST_SWEEP_SECONDS)
        except BaseException:
            # Ctrl-C, SIGTERM: nothing more starts.  A running task finishes its
            # atomic publish on a remote cluster; on a LocalCluster its process dies
            # with the worker and its staging folder is removed below.
            with contextlib.suppress(Exception):
                client.cancel(list(futures), force=True)
            if cluster is not None:
                quiet = logging.getLogger("distributed")
                if not quiet.isEnabledFor(logging.DEBUG):
                    quiet.setLevel(logging.CRITICAL)  # its words on each cancelled task
                _cancel_running()
            raise
        finally:
            with contextlib.suppress(Exception):
                client.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close()
                unfinished = [j for chunk in futures.values() for j in chunk]
                _sweep({os.path.dirname(j.dst) for j in unfinished}
                       | {j.root for j in unfinished[:1]})
