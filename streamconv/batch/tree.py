"""The batch: plan the work, run the jobs on an executor, copy the other files."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable

from ..errors import Interrupted, OutputError, UsageError
from ..publish import (
    sweep_stale,
)
from .executors import LocalPool, plan_chunks
from .job import copy_others
from .manifest import Manifest
from .options import BatchOptions
from .plan import Job, check_folders, plan_work, posix_join
from .report import AT_TARGET, CONVERTED, BatchProgress, BatchResult, ModelResult

log = logging.getLogger(__name__)


#: progress(event) — the library reports; the command line draws the bar.
ProgressCallback = Callable[["BatchProgress"], None]

def convert_tree(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    options: BatchOptions,
    *,
    progress: ProgressCallback | None = None,
) -> BatchResult:
    """Convert every ``*.onnx`` below *src_dir* into the same place below *dst_dir*.

    Runs ``options.jobs`` worker processes.  A model that fails, crashes its
    worker or times out is reported as failed; the rest go on.  On Ctrl-C
    (KeyboardInterrupt) the workers are stopped, no half-written output is
    left, and the result so far is returned with ``interrupted`` set.
    *progress* is called from this thread whenever a model advances or ends.

    Raises UsageError for bad options or folders, OutputError when DST cannot
    be written, StreamconvError when worker processes cannot start.
    """
    started = time.perf_counter()
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    if "://" in src_dir or "://" in dst_dir:
        from .remote import convert_remote_tree, is_remote

        if is_remote(src_dir, dst_dir):
            options.validate()
            return convert_remote_tree(src_dir, dst_dir, options, progress)
    if os.name != "posix":
        raise UsageError("batch conversion needs a POSIX system (its workers share a socket)")
    options.validate()
    check_folders(src_dir, dst_dir)
    result = BatchResult(src_dir, dst_dir, options)
    manifest: Manifest | None = None
    early: LocalPool | None = None
    try:
        early = _start_workers(options)
        manifest = Manifest(dst_dir, fsync=options.fsync)
        jobs, others, produced = plan_work(src_dir, dst_dir, options, result, manifest)
        try:
            os.makedirs(dst_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create DST_DIR {dst_dir}: {e.strerror}") from e
        sweep_stale(dst_dir)
        # before any output is redone its entry leaves the file on disk: a batch
        # killed from here on cannot leave an entry describing bytes no longer there
        manifest.forget([j.rel for j in jobs])
        by_rel = {j.rel: j for j in jobs}

        def done(model: ModelResult) -> None:
            produced.update(posix_join(os.path.dirname(model.source), f)
                            for f in model.data_files)
            log.debug("%s: %s %s", model.source, model.status, model.error or "")
            if model.status in (CONVERTED, AT_TARGET) and manifest is not None:
                manifest.record(model.source, by_rel[model.source].dst, model.inputs, options, {
                    "status": model.status, "action": model.action,
                    "opset_from": model.opset_from, "opset_to": model.opset_to,
                    "tensors_diverted": model.tensors_diverted, "bytes_out": model.bytes_out,
                    "data_files": model.data_files,
                })

        run_jobs(jobs, options, result, progress, done, pool=early)
        early = None
        if others:
            copy_others(src_dir, dst_dir, others, produced, options, result)
    except Interrupted as e:
        result.interrupted = int(e.args[0]) if e.args else signal.SIGINT
    except KeyboardInterrupt:
        result.interrupted = int(signal.SIGINT)
    finally:
        if early is not None:  # it never ran
            early.discard()
            shutil.rmtree(early.workdir, ignore_errors=True)
        if options.scheduler == "local":
            from .dask_executor import discard_idle

            discard_idle()
        if manifest is not None and os.path.isdir(dst_dir):
            try:
                manifest.save()
            except OSError as e:  # only costs the next run a redo of these models
                log.warning("cannot write %s: %s", manifest.path, e.strerror)
        result.models.sort(key=lambda m: m.source)
        result.seconds = time.perf_counter() - started
    return result


def _start_workers(options: BatchOptions) -> LocalPool | None:
    """Start the worker processes before the batch plans, so that they import onnx
    meanwhile: the local pool's (returned, for :func:`run_jobs`), or the
    conversion processes of ``--scheduler local``'s in-process workers."""
    if options.scheduler == "local":
        from .dask_executor import warm_local

        warm_local(options.jobs)
        return None
    if options.scheduler is not None or options.scheduler_file is not None:
        return None
    pool = LocalPool(tempfile.mkdtemp(prefix="streamconv-batch-"))
    try:
        pool.warm(options.jobs)
    except BaseException:
        pool.discard()
        shutil.rmtree(pool.workdir, ignore_errors=True)
        raise
    return pool


def run_jobs(jobs: list[Job], options: BatchOptions, result: BatchResult,
             progress: Callable[[BatchProgress], None] | None,
             done: Callable[[ModelResult], None], pool: LocalPool | None = None) -> None:
    """Run *jobs* on the executor *options* name (Dask, else the local pool).

    Each model's result goes into *result* as it comes, then to *done*;
    *progress* hears of every step, counted in models and source bytes.  *pool*
    is a local pool whose workers were started already (it is used and ended).
    """
    sizes = {j.rel: j.size for j in jobs}
    total = sum(sizes.values())
    finished = {"models": 0, "bytes": 0}

    def on_progress(partial: int, model: ModelResult | None = None) -> None:
        if progress is not None:
            progress(BatchProgress(finished["models"], len(jobs),
                                   finished["bytes"] + partial, total, model))

    def on_result(model: ModelResult, partial: int) -> None:
        result.models.append(model)
        finished["models"] += 1
        finished["bytes"] += sizes.get(model.source, 0)
        done(model)
        on_progress(partial, model)

    try:
        on_progress(0)
        if not jobs:
            return
        if options.scheduler is not None or options.scheduler_file is not None:
            from .dask_executor import DaskExecutor

            DaskExecutor(options, on_result).run(jobs)
            return
        if pool is None:
            pool = LocalPool(tempfile.mkdtemp(prefix="streamconv-batch-"))
        pool.on_progress = on_progress
        pool.run(plan_chunks(jobs, options.jobs), options, on_result)
    finally:
        if pool is not None:
            pool.discard()  # workers started for more jobs than there were
            shutil.rmtree(pool.workdir, ignore_errors=True)
