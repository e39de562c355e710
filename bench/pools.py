"""The batch's jobs on a library's process pool instead of streamconv's own.

``python -m bench.pools POOL SRC DST --opset N --jobs J --report R.json`` plans the
tree as ``streamconv batch`` does (the manifest included), then runs each
model's job (:func:`streamconv.batch.job.run_job`: probe, convert, check, the
atomic durable publish) as one task of POOL:

- ``process_pool``: :class:`concurrent.futures.ProcessPoolExecutor`, its default
  start method.  No per-task time limit (``result(timeout)`` stops waiting, not
  the worker), and a worker that dies breaks the pool: every pending model fails.
- ``pebble``: ``pebble.ProcessPool``, ``schedule(..., timeout=)``.  A task past
  its time limit or whose worker dies fails alone; the worker is replaced.

The throughput benchmark (``bench.throughput --pools``) times these beside the
local pool on the same models.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["POOLS", "main"]


def _no_progress(done: int) -> None:
    """Progress of one model; nobody is watching."""


def _on_process_pool(jobs: Sequence[Any], options: Any) -> Iterable[Any]:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from streamconv.batch.job import run_job

    with ProcessPoolExecutor(max_workers=options.jobs) as pool:
        futures = [pool.submit(run_job, job, options, _no_progress) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def _on_pebble(jobs: Sequence[Any], options: Any) -> Iterable[Any]:
    from concurrent.futures import as_completed

    import pebble

    from streamconv.batch.job import run_job

    with pebble.ProcessPool(max_workers=options.jobs) as pool:
        futures = [pool.schedule(run_job, args=(job, options, _no_progress),
                                 timeout=options.timeout) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


POOLS: dict[str, Callable[[Sequence[Any], Any], Iterable[Any]]] = {
    "process_pool": _on_process_pool,
    "pebble": _on_pebble,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``POOL SRC DST --opset N --jobs J --report R.json``; the exit status."""
    from streamconv.batch import BatchOptions, BatchResult, write_report
    from streamconv.batch.manifest import Manifest
    from streamconv.batch.plan import check_folders, plan_work
    from streamconv.batch.report import AT_TARGET, CONVERTED, FAILED

    parser = argparse.ArgumentParser(prog="python -m bench.pools")
    parser.add_argument("pool", choices=sorted(POOLS))
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--opset", type=int, required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    options = BatchOptions(opset=args.opset, jobs=args.jobs, timeout=args.timeout)
    options.validate()
    check_folders(args.src, args.dst)
    result = BatchResult(args.src, args.dst, options)
    manifest = Manifest(args.dst, fsync=options.fsync)
    jobs, _, _ = plan_work(args.src, args.dst, options, result, manifest)
    os.makedirs(args.dst, exist_ok=True)
    manifest.forget([j.rel for j in jobs])
    by_rel = {j.rel: j for j in jobs}
    for model in POOLS[args.pool](sorted(jobs, key=lambda j: -j.size), options):
        result.models.append(model)
        if model.status in (CONVERTED, AT_TARGET):
            manifest.record(model.source, by_rel[model.source].dst, model.inputs, options, {
                "status": model.status, "action": model.action,
                "opset_from": model.opset_from, "opset_to": model.opset_to,
                "tensors_diverted": model.tensors_diverted, "bytes_out": model.bytes_out,
                "data_files": model.data_files,
            })
    manifest.save()
    result.models.sort(key=lambda m: m.source)
    write_report(args.report, result)
    return 1 if any(m.status == FAILED for m in result.models) else 0


if __name__ == "__main__":
    sys.exit(main())
