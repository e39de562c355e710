"""What a batch did: per-model results, statuses, the JSON/CSV report and the summary."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import StreamconvError
from ..publish import (
    replace_file,
)
from .options import BatchOptions

CONVERTED = "converted"
AT_TARGET = "at_target"
FAILED = "failed"
SKIPPED = "skipped"
#: Per-model outcomes, in the order the summary lists them.
STATUSES = (CONVERTED, AT_TARGET, FAILED, SKIPPED)

@dataclass
class ModelResult:
    """What the batch did with one model; paths are relative POSIX paths."""

    source: str
    destination: str
    #: one of STATUSES
    status: str
    #: what was (or would be) done: "convert", "copy" or "skip"
    action: str
    opset_from: int | None = None
    opset_to: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    tensors_diverted: int | None = None
    seconds: float = 0.0
    error: str | None = None
    #: outcome of --verify, None when not asked for
    verify: str | None = None
    #: external-data files written beside the output, relative to DST
    data_files: list[str] = field(default_factory=list)
    #: what the conversion warned about (the input already failing the checker, ...)
    warnings: list[str] = field(default_factory=list)
    #: identity of the source and its data files as the job read them (for the
    #: manifest; not part of the report)
    inputs: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        del row["inputs"]
        return row


@dataclass(frozen=True)
class BatchProgress:
    """Where a running batch stands; *result* is set when a model has just finished."""

    models_done: int
    models_total: int
    bytes_done: int
    bytes_total: int
    result: ModelResult | None = None


@dataclass
class BatchResult:
    """Everything a batch did."""

    source_dir: str
    destination_dir: str
    options: BatchOptions
    models: list[ModelResult] = field(default_factory=list)
    others_copied: list[str] = field(default_factory=list)
    others_up_to_date: list[str] = field(default_factory=list)
    others_failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: signal number (or 2 for Ctrl-C) when the batch was interrupted
    interrupted: int | None = None

    def counts(self) -> dict[str, int]:
        """Models per status, every status present."""
        counts = dict.fromkeys(STATUSES, 0)
        for m in self.models:
            counts[m.status] += 1
        return counts

    @property
    def failed(self) -> bool:
        return any(m.status == FAILED for m in self.models) or bool(self.others_failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_dir": self.source_dir,
            "destination_dir": self.destination_dir,
            "opset": self.options.opset,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted is not None,
            "counts": self.counts(),
            "models": [m.to_dict() for m in self.models],
            "other_files": {
                "copied": self.others_copied,
                "up_to_date": self.others_up_to_date,
                "failed": [{"path": p, "error": e} for p, e in self.others_failed],
            },
        }

def error_text(error: BaseException) -> str:
    """The error as one line, without the file name the report already shows."""
    if isinstance(error, StreamconvError):
        error.file = None  # the staging path or the source path; the report names the model
        text = str(error)
    elif isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())

REPORT_FIELDS = tuple(f.name for f in fields(ModelResult) if f.name != "inputs")


def write_report(path: str | os.PathLike[str], result: BatchResult) -> None:
    """Write *result* as JSON, or as CSV (one row per model) when *path* ends in ``.csv``.

    The file appears atomically.  Raises OSError when it cannot be written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".streamconv-report-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            if path.lower().endswith(".csv"):
                writer = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
                writer.writeheader()
                for m in result.models:
                    row = m.to_dict()
                    row["data_files"] = " ".join(m.data_files)
                    writer.writerow({k: "" if v is None else v for k, v in row.items()})
            else:
                json.dump(result.to_dict(), f, indent=1)
                f.write("\n")
        replace_file(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def summary_lines(result: BatchResult) -> list[str]:
    """The table the command line prints at the end of a batch."""
    counts = result.counts()
    copied = sum(1 for m in result.models if m.status == AT_TARGET and m.action == "copy")
    verified = [m for m in result.models if m.verify is not None]
    lines = [
        f"{len(result.models)} models, {result.source_dir} -> {result.destination_dir}, "
        f"opset {result.options.opset}, {result.options.jobs} jobs, {result.seconds:.1f} s"
        + (" (interrupted)" if result.interrupted is not None else ""),
        f"  {'converted':<20}{counts[CONVERTED]:>7}",
        f"  {'already at target':<20}{counts[AT_TARGET]:>7}  "
        f"({copied} copied through, {counts[AT_TARGET] - copied} converted)",
        f"  {'failed':<20}{counts[FAILED]:>7}",
        f"  {'skipped':<20}{counts[SKIPPED]:>7}  (up to date)",
    ]
    if verified:
        matched = sum(1 for m in verified if m.verify and m.verify.startswith("match"))
        mismatched = sum(1 for m in verified if m.error and m.error.startswith("--verify"))
        lines.append(f"  {'verified':<20}{matched:>7}  match ({mismatched} mismatched, "
                     f"{len(verified) - matched - mismatched} not checked)")
    if result.options.copy_other:
        lines.append(f"  {'other files copied':<20}{len(result.others_copied):>7}  "
                     f"({len(result.others_up_to_date)} up to date, "
                     f"{len(result.others_failed)} failed)")
    failed = [m for m in result.models if m.status == FAILED]
    if failed or result.others_failed:
        lines.append("failed:")
        lines += [f"  {m.source}: {m.error}" for m in failed]
        lines += [f"  {rel}: {error}" for rel, error in result.others_failed]
    return lines
