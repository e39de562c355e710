"""The Dask executor: one task per model on a Dask cluster (``--scheduler``).

Each task runs the same :func:`~streamconv.batch.job.run_job` as the local pool,
in a child process of the Dask worker, so that an abort or a segfault in onnx's
C++ code fails that model and not the worker; the time limit is enforced on
that child too.  The child dies with its worker (``PR_SET_PDEATHSIG``), and the
staging folder of a child that died is removed (its owner is gone).  A worker
lost mid-task (Dask's ``KilledWorker``) has its model retried once elsewhere,
then reported as failed with the reason.  Workers must share SRC and DST
(a shared file system).

``distributed`` is an optional dependency: ``pip install streamconv[dask]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UsageError
from ..publish import sweep_stale
from .executors import exit_description
from .options import BatchOptions
from .plan import Job
from .report import FAILED, ModelResult

__all__ = ["DaskExecutor", "run_isolated"]

#: Times Dask may rerun a task whose worker was lost, before the model fails.
RETRIES = 1
#: The Dask resource a task claims, in bytes, when every worker declares it
#: (``dask worker --resources MEMORY=8e9``; ``--scheduler local`` declares each
#: worker's share of the machine's memory).
MEMORY = "MEMORY"
#: Memory of a conversion before its model counts: interpreter, onnx, numpy and the
#: copy process (measured about 55 MB each; rounded up).
BASE_MEMORY = 256 << 20
#: Memory per skeleton byte and per node while onnx converts and checks the skeleton
#: (the benchmark measured about 6 KB per node on graph-heavy models; with margin).
PER_SKELETON_BYTE = 16
PER_NODE = 16 << 10
#: How long the batch waits for a cancelled local task's child to end before it
#: removes the child's staging folder.
_SWEEP_SECONDS = 30.0
#: after a batch, how long staging folders still owned (a lost task's child that is
#: still dying) are waited for; another live batch's folders are never removed
_LOST_SWEEP_SECONDS = 5.0

#: What a task's child runs: ``python -c _CHILD_BOOT <sys.path>``, (job, options)
#: pickled on stdin, the ModelResult pickled on stdout.
_CHILD_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from streamconv.batch.dask_executor import _child_main; _child_main()"
)


def _die_with_parent() -> None:
    # Linux: the child gets SIGKILL when the Dask worker process that started it
    # ends, so a killed worker leaves no conversion running behind it.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _child_main() -> None:
    """Body of a task's child process."""
    from .job import run_job

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the batch decides, not a terminal
    job, options = pickle.load(sys.stdin.buffer)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # nothing but the result may reach the pipe
    result = run_job(job, options, lambda done: None)
    pickle.dump(result, out)
    out.flush()


def _failed(job: Job, options: BatchOptions, seconds: float, error: str) -> ModelResult:
    return ModelResult(source=job.rel, destination=job.rel, status=FAILED, action="convert",
                       opset_to=options.opset, bytes_in=job.size, seconds=round(seconds, 4),
                       error=error)


def run_isolated(job: Job, options: BatchOptions) -> ModelResult:
    """Run *job* in a child process; a crash or a time-out fails only this model.

    This is the Dask task: it runs on a worker and never raises for a model.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_BOOT, json.dumps(sys.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(pickle.dumps((job, options)), timeout=options.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        sweep_stale(os.path.dirname(job.dst))
        return _failed(job, options, time.monotonic() - started,
                       f"timed out after {options.timeout:g} s")
    except BaseException:
        proc.kill()  # the task was cancelled: its child goes with it
        proc.wait()
        sweep_stale(os.path.dirname(job.dst))
        raise
    if proc.returncode == 0:
        with contextlib.suppress(Exception):
            result: ModelResult = pickle.loads(out)
            return result
    how = exit_description(proc.returncode)
    lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    sweep_stale(os.path.dirname(job.dst))  # the dead child's staging folder
    return _failed(job, options, time.monotonic() - started,
                   f"conversion process died ({how})"
                   + (f"; last message: {lines[-1][:200]}" if lines else ""))


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


def _sweep(folders: set[str], seconds: float = _SWEEP_SECONDS) -> None:
    """Remove the staging folders that cancelled or lost tasks' children left, once
    they end (waiting at most *seconds* for staging folders still owned)."""
    deadline = time.monotonic() + seconds
    pending = set(folders)
    while pending:
        for folder in list(pending):
            sweep_stale(folder)
            with contextlib.suppress(OSError):
                if not any(n.startswith(".streamconv-") for n in os.listdir(folder)):
                    pending.discard(folder)
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise UsageError("--scheduler needs Dask distributed: pip install 'streamconv[dask]'"
                         ) from e
    return distributed


class DaskExecutor:
    """Runs jobs as Dask tasks; results stream back through *on_result* as they end."""

    def __init__(self, options: BatchOptions,
                 on_result: Callable[[ModelResult, int], None]) -> None:
        self.options = options
        self.on_result = on_result

    def run(self, jobs: Sequence[Job]) -> None:
        distributed = _import_distributed()
        options = self.options
        cluster = None
        if options.scheduler == "local":
            import psutil  # a dependency of distributed

            cluster = distributed.LocalCluster(
                n_workers=options.jobs, threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=None,
                resources={MEMORY: psutil.virtual_memory().total // options.jobs},
            )
            client = distributed.Client(cluster)
        elif options.scheduler_file is not None:
            client = distributed.Client(scheduler_file=options.scheduler_file)
        else:
            client = distributed.Client(options.scheduler)
        futures: dict[Any, Job] = {}
        running: dict[str, Job] = {}
        try:
            # a task claims memory only where every worker declares how much it has,
            # and never more than the smallest has (or it would never run)
            declared = _declared_memory(client)
            for job in jobs:
                extra: dict[str, Any] = {}
                if declared is not None:
                    extra["resources"] = {MEMORY: min(memory_estimate(job, options), declared)}
                # largest first, as the local pool does; retries cover a lost worker
                key = f"streamconv-{job.index}-{os.getpid()}-{time.time_ns()}"
                future = client.submit(run_isolated, job, options, pure=False, key=key,
                                       retries=RETRIES, priority=job.size, **extra)
                futures[future] = job
                running[key] = job
            for future in distributed.as_completed(futures):
                job = futures[future]
                running.pop(future.key, None)
                try:
                    result = future.result()
                except distributed.KilledWorker:
                    result = _failed(job, options, 0.0,
                                     f"the Dask worker running it was lost {RETRIES + 1} times "
                                     "(KilledWorker); nothing of it was published")
                except Exception as e:  # a task error is one model's failure
                    result = _failed(job, options, 0.0, f"Dask task failed: "
                                     f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                self.on_result(result, 0)
            # a worker lost mid-task (retried elsewhere) leaves its child's staging
            # folder until that child has died; remove it once it has
            _sweep({os.path.dirname(j.dst) for j in jobs}, seconds=_LOST_SWEEP_SECONDS)
        except BaseException:
            # Ctrl-C, SIGTERM: nothing more starts.  A running task finishes its
            # atomic publish on a remote cluster; on a LocalCluster its child dies
            # with the worker and its staging folder is removed below.
            with contextlib.suppress(Exception):
                client.cancel(list(futures), force=True)
            raise
        finally:
            with contextlib.suppress(Exception):
                client.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close()
                _sweep({os.path.dirname(j.dst) for j in running.values()})
