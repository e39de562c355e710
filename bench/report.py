"""Summaries of the measured runs: CSV files, the printed table, the goal checks.

``python -m bench.report [--markdown]`` prints the table again from the CSV
files of the last run, without measuring anything.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .tools import TOOLS, Tool

__all__ = [
    "RESULTS",
    "Run",
    "Summary",
    "check_goals",
    "format_pivot",
    "format_table",
    "format_versions",
    "read_results",
    "read_summaries",
    "summarize",
    "write_csv",
]

RESULTS = Path(__file__).resolve().parent / "results"
MB = 10**6
GB = 10**9
STREAMCONV = ("streamconv_external", "streamconv_inline")


@dataclass(frozen=True)
class Run:
    """One timed run of one tool on one model (a row of ``runs.csv``)."""

    case: str  # "size" or "nodes"
    size_gb: float  # nominal size asked for (weight-heavy), 0 for graph-heavy
    nodes: int
    file_bytes: int
    tool: str
    rep: int
    wall_s: float
    peak_rss_mb: float
    user_s: float
    sys_s: float
    input_cached: float | None
    load_1min: float  # the machine's load average when the run began
    commit: str  # the streamconv source measured (git describe)
    versions: str = ""  # python, onnx, numpy, ml_dtypes, protobuf, onnxruntime


@dataclass(frozen=True)
class Summary:
    """Every run of one tool on one model, reduced to medians (a row of the result CSVs).

    ``x_cp``, ``x_copy_file_range``, ``x_copy_fsync`` and ``x_numpy`` are
    medians of per-repetition ratios to the reference timed in the same
    repetition, so slow drift of the machine cancels.  ``peak_rss_mb`` is the
    largest peak over the runs.  ``note``
    says why a tool has no numbers.
    """

    case: str
    size_gb: float
    nodes: int
    file_bytes: int
    tool: str
    runs: int
    wall_median_s: float | None
    wall_min_s: float | None
    wall_max_s: float | None
    x_cp: float | None
    x_copy_file_range: float | None
    peak_rss_mb: float | None
    user_s: float | None
    sys_s: float | None
    input_cached: float | None
    load_1min: float | None
    commit: str = ""
    note: str = ""
    #: median per-repetition ratio to the copy that also fsyncs (the durable reference)
    x_copy_fsync: float | None = None
    #: median per-repetition ratio to ``python -c "import numpy"`` (the tiny model's floor)
    x_numpy: float | None = None
    #: the versions the runs were measured with (see bench.versions)
    versions: str = ""

    @property
    def file_gb(self) -> float:
        return self.file_bytes / GB

    @classmethod
    def empty(
        cls, case: str, size_gb: float, nodes: int, file_bytes: int, tool: str, note: str
    ) -> Summary:
        """A row for a tool that has no runs, saying why in *note*."""
        return cls(case, size_gb, nodes, file_bytes, tool, 0, None, None, None, None, None,
                   None, None, None, None, None, note=note)


def _paired_ratio(runs: Sequence[Run], refs: Sequence[Run]) -> float | None:
    by_rep = {r.rep: r.wall_s for r in refs}
    ratios = [r.wall_s / by_rep[r.rep] for r in runs if by_rep.get(r.rep)]
    return statistics.median(ratios) if ratios else None


def summarize(
    case: str, size_gb: float, nodes: int, file_bytes: int, runs: Sequence[Run],
    notes: dict[str, str], tools: Sequence[Tool] = TOOLS,
) -> list[Summary]:
    """One Summary per tool in *tools*, in order, from the runs on one model."""
    out = []
    for tool in tools:
        mine = [r for r in runs if r.tool == tool.name]
        if not mine:
            out.append(Summary.empty(case, size_gb, nodes, file_bytes, tool.name,
                                     notes.get(tool.name, "not run")))
            continue
        walls = [r.wall_s for r in mine]
        cached = [r.input_cached for r in mine if r.input_cached is not None]
        out.append(Summary(
            case, size_gb, nodes, file_bytes, tool.name, len(mine),
            wall_median_s=statistics.median(walls),
            wall_min_s=min(walls),
            wall_max_s=max(walls),
            x_cp=_paired_ratio(mine, [r for r in runs if r.tool == "cp"]),
            x_copy_file_range=_paired_ratio(mine, [r for r in runs if r.tool == "copy_file_range"]),
            peak_rss_mb=max(r.peak_rss_mb for r in mine),
            user_s=statistics.median(r.user_s for r in mine),
            sys_s=statistics.median(r.sys_s for r in mine),
            input_cached=min(cached) if cached else None,
            load_1min=statistics.median(r.load_1min for r in mine),
            commit=",".join(sorted({r.commit for r in mine})),
            note=notes.get(tool.name, ""),
            x_copy_fsync=_paired_ratio(mine, [r for r in runs
                                              if r.tool == "copy_file_range_fsync"]),
            x_numpy=_paired_ratio(mine, [r for r in runs if r.tool == "import_numpy"]),
            versions=" | ".join(sorted({r.versions for r in mine})),
        ))
    return out


def write_csv(path: Path, rows: Iterable[Any]) -> None:
    """Write dataclass rows (of one class) to *path* (floats rounded, None as empty)."""
    rows = list(rows)
    if not rows:
        return
    names = [f.name for f in fields(rows[0])]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            values = asdict(row)
            writer.writerow([_cell(values[n]) for n in names])


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def read_summaries(path: Path) -> list[Summary]:
    """Read a result CSV written by :func:`write_csv`; an absent file gives no rows."""
    if not path.exists():
        return []
    types = {f.name: f.type for f in fields(Summary)}
    rows = []
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            values: dict[str, object] = {}
            for name, text in record.items():
                kind = str(types[name])
                if kind == "str":
                    values[name] = text
                elif text == "":
                    values[name] = None
                elif kind == "int":
                    values[name] = int(text)
                else:
                    values[name] = float(text)
            rows.append(Summary(**values))  # type: ignore[arg-type]
    return rows


def read_results(
    folder: Path,
) -> tuple[list[Summary], list[Summary], list[Summary]] | None:
    """The size, node and tiny-model summaries of the last run in *folder*.

    None (said on stderr) if there are none.
    """
    sizes = read_summaries(folder / "bench.csv")
    nodes = read_summaries(folder / "nodes.csv")
    tiny = read_summaries(folder / "tiny.csv")
    if not sizes and not nodes and not tiny:
        print(f"no results in {folder}; run python -m bench.run first", file=sys.stderr)
        return None
    return sizes, nodes, tiny


def format_versions(rows: Iterable[Summary]) -> str:
    """The versions the rows were measured with, one line each (normally one line)."""
    return "\n".join(sorted({r.versions for r in rows if r.versions})) or "versions unknown"


def _fmt(value: float | None, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _model_label(row: Summary) -> str:
    if row.case == "nodes":
        return f"{row.nodes / 1000:g}k nodes ({row.file_gb:.2f} GB)"
    if row.case == "tiny":
        return f"tiny ({row.nodes} node, {row.file_bytes} bytes)"
    return f"{row.file_gb:.2f} GB"


def format_table(rows: Sequence[Summary], markdown: bool = False) -> str:
    """The result table: wall time, ratios to cp and to copy_file_range, peak RSS."""
    labels = {t.name: t.label for t in TOOLS}
    head = ["model", "tool", "wall s", "x cp", "x copy_file_range", "x copy+fsync",
            "x numpy", "peak RSS MB", "cached", "load", "note"]
    body = []
    for r in rows:
        if r.runs == 0:
            body.append([_model_label(r), labels[r.tool], "", "", "", "", "", "", "", "",
                         r.note])
            continue
        spread = f"{r.wall_median_s:.2f}"
        if r.runs > 1 and not markdown:
            spread += f" ({r.wall_min_s:.2f}-{r.wall_max_s:.2f})"
        body.append([
            _model_label(r), labels[r.tool], spread, _fmt(r.x_cp, ".2f"),
            _fmt(r.x_copy_file_range, ".2f"), _fmt(r.x_copy_fsync, ".2f"),
            _fmt(r.x_numpy, ".2f"), _fmt(r.peak_rss_mb, ".0f"),
            _fmt(r.input_cached, ".0%", "?"), _fmt(r.load_1min, ".1f"), r.note,
        ])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    previous = None
    for row in body:
        if previous is not None and row[0] != previous:
            lines.append("")
        previous = row[0]
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def format_pivot(rows: Sequence[Summary]) -> str:
    """A compact Markdown table: one row per model, one column per tool.

    Each cell reads ``wall s (x copy_file_range), peak RSS MB``; on the tiny
    model the ratio is to ``import numpy``.
    """
    labels = {t.name: t.label for t in TOOLS}
    tools = [t.name for t in TOOLS if any(r.tool == t.name for r in rows)]
    models: dict[str, dict[str, Summary]] = {}
    for r in rows:
        models.setdefault(_model_label(r), {})[r.tool] = r
    lines = ["| model | " + " | ".join(labels[t] for t in tools) + " |",
             "|---|" + "---|" * len(tools)]
    for model, by_tool in models.items():
        cells = []
        for t in tools:
            cell = by_tool.get(t)
            if cell is None:
                cells.append("")
            elif not cell.runs or cell.wall_median_s is None or cell.peak_rss_mb is None:
                cells.append(cell.note)
            elif cell.case == "tiny":
                ratio = _fmt(cell.x_numpy, ".2f")
                cells.append(
                    f"{cell.wall_median_s:.2f} s ({ratio}x numpy), {cell.peak_rss_mb:.0f} MB"
                )
            else:
                ratio = _fmt(cell.x_copy_file_range, ".2f")
                cells.append(
                    f"{cell.wall_median_s:.2f} s ({ratio}x), {cell.peak_rss_mb:.0f} MB"
                )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def check_goals(
    sizes: Sequence[Summary], nodes: Sequence[Summary], tiny: Sequence[Summary] = (),
) -> list[str]:
    """One line per goal: PASS/MISS with the figures it was judged on."""
    lines = []
    for r in tiny:
        if r.tool in STREAMCONV and r.runs and r.x_numpy is not None:
            lines.append(
                f"{_verdict(r.x_numpy <= 4)}  start  {r.tool} on the tiny model: "
                f"{r.x_numpy:.2f}x python -c 'import numpy' (goal <= 4x)"
            )
    sc = [r for r in sizes if r.tool in STREAMCONV and r.runs]
    for r in sc:
        if r.x_copy_file_range is None or r.file_gb < 0.45:
            continue
        limit = 1.15 if r.file_gb >= 1.4 else 1.5
        lines.append(
            f"{_verdict(r.x_copy_file_range <= limit)}  time   {r.tool} at {r.file_gb:.2f} GB: "
            f"{r.x_copy_file_range:.2f}x copy_file_range (goal <= {limit}x)"
        )
    for tool in STREAMCONV:
        peaks = [r.peak_rss_mb for r in sc if r.tool == tool and r.peak_rss_mb is not None]
        if peaks:
            lines.append(
                f"{_verdict(max(peaks) <= 150)}  memory {tool}: peak RSS {min(peaks):.0f}-"
                f"{max(peaks):.0f} MB over {len(peaks)} sizes (goal <= 150 MB, flat)"
            )
    for r in sc:
        if not 1.3 <= r.file_gb <= 1.9:
            continue
        for ref in (x for x in sizes if x.tool == "onnx" and x.size_gb == r.size_gb and x.runs):
            assert ref.wall_median_s and r.wall_median_s and ref.peak_rss_mb and r.peak_rss_mb
            speed = ref.wall_median_s / r.wall_median_s
            mem = ref.peak_rss_mb / r.peak_rss_mb
            lines.append(
                f"{_verdict(speed >= 20 and mem >= 30)}  vs onnx {r.tool} at {r.file_gb:.2f} GB: "
                f"{speed:.1f}x faster (goal >= 20x), {mem:.0f}x less memory (goal >= 30x)"
            )
    for tool in STREAMCONV:
        pts = sorted(
            (r.nodes, r.wall_median_s) for r in nodes
            if r.tool == tool and r.runs and r.wall_median_s
        )
        if len(pts) >= 2:
            (n0, t0), (n1, t1) = pts[0], pts[-1]
            growth = t1 / t0
            lines.append(
                f"{_verdict(growth <= 1.25 * n1 / n0)}  nodes  {tool}: {n0} -> {n1} nodes "
                f"({n1 / n0:.1f}x) takes {t0:.2f} -> {t1:.2f} s ({growth:.2f}x; "
                f"{(t1 - t0) / (n1 - n0) * 1e6:.0f} us per added node)"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and goal checks from the result CSVs."""
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV files")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--pivot", action="store_true",
                        help="print a compact Markdown table, one column per tool")
    args = parser.parse_args(argv)
    results = read_results(args.results)
    if results is None:
        return 1
    sizes, nodes, tiny = results
    if args.pivot:
        print(format_pivot([*tiny, *sizes, *nodes]))
    else:
        print(format_table([*tiny, *sizes, *nodes], markdown=args.markdown))
    print()
    print(format_versions([*tiny, *sizes, *nodes]))
    print()
    print("\n".join(check_goals(sizes, nodes, tiny)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
