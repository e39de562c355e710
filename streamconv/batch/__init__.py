"""Batch conversion of a folder tree: ``streamconv batch SRC DST --opset N``.

Every ``*.onnx`` below SRC lands at the same relative path below DST, converted
with :func:`streamconv.convert`, or copied through unchanged (with the
external-data files it references) when it already is at the target opset.

The package reads like the design:

- :mod:`.options` — how a batch runs, validated in one place;
- :mod:`.plan` — finding the models and other files, what is up to date, the dry run;
- :mod:`.job` — one job: convert or copy one model, publish it, return a record;
- :mod:`.manifest` — what a batch wrote, so that a rerun redoes exactly what is out of date;
- :mod:`.executors` — who runs the jobs: the local pool of worker processes;
- :mod:`.dask_executor` — or a Dask cluster (``--scheduler``), one task per model;
- :mod:`.parity` — ``--verify``, the ORT check of original against result;
- :mod:`.report` — per-model results, JSON/CSV report, the summary;
- :mod:`.tree` — the batch itself: plan, run the jobs, copy the other files.

Outputs go through the one publish of :mod:`streamconv.publish`, exactly as a
single conversion's do: staged beside their destination, moved into place data
first and model last, synced.  So an interrupted or killed worker never leaves a
half-written output.  The command line lives in :mod:`streamconv.cli`.
"""

from .options import BatchOptions
from .parity import VERIFY_TOLERANCE, Parity, verify_parity
from .plan import check_folders, dry_run, find_files
from .report import (
    AT_TARGET,
    CONVERTED,
    FAILED,
    REPORT_FIELDS,
    SKIPPED,
    STATUSES,
    BatchProgress,
    BatchResult,
    ModelResult,
    summary_lines,
    write_report,
)
from .tree import ProgressCallback, convert_tree

__all__ = [
    "AT_TARGET",
    "CONVERTED",
    "FAILED",
    "REPORT_FIELDS",
    "SKIPPED",
    "STATUSES",
    "VERIFY_TOLERANCE",
    "BatchOptions",
    "BatchProgress",
    "BatchResult",
    "ModelResult",
    "Parity",
    "ProgressCallback",
    "check_folders",
    "convert_tree",
    "dry_run",
    "find_files",
    "summary_lines",
    "verify_parity",
    "write_report",
]
