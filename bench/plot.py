"""The benchmark figure: time and peak memory against model size and node count.

``python -m bench.plot`` redraws ``bench/results/bench.png`` from the CSV files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .report import GB, RESULTS, Summary, format_versions, read_results
from .tools import PROTOBUF_LIMIT, TOOLS

__all__ = ["main", "plot"]

_STYLE = {
    "cp": ("tab:gray", "o", ":"),
    "copy_file_range": ("black", "s", "--"),
    "streamconv_external": ("tab:blue", "D", "-"),
    "streamconv_inline": ("tab:cyan", "v", "-"),
    "onnx": ("tab:red", "^", "-"),
    "onnx_ir": ("tab:orange", "x", "-"),
}


def _series(rows: Sequence[Summary], tool: str, x: str, y: str) -> tuple[list[float], list[float]]:
    pts = sorted(
        (r.file_gb if x == "size" else r.nodes / 1000, getattr(r, y))
        for r in rows
        if r.tool == tool and r.runs and getattr(r, y) is not None
    )
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(sizes: Sequence[Summary], nodes: Sequence[Summary], out: Path,
         versions: str = "") -> None:
    """Draw wall time and peak RSS against model size (and node count) into *out*.

    *versions* (see bench.versions) is printed under the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = 2 if nodes else 1
    fig, axes = plt.subplots(n_rows, 2, figsize=(11, 4.4 * n_rows), squeeze=False)
    ax = list(axes.flat)
    specs = [
        (ax[0], sizes, "size", "wall_median_s", "wall time (s)", "model size (GB)"),
        (ax[1], sizes, "size", "peak_rss_mb", "peak RSS (MB)", "model size (GB)"),
    ]
    if nodes:
        specs += [
            (ax[2], nodes, "nodes", "wall_median_s", "wall time (s)", "nodes (thousands)"),
            (ax[3], nodes, "nodes", "peak_rss_mb", "peak RSS (MB)", "nodes (thousands)"),
        ]
    labels = {t.name: t.label for t in TOOLS}
    for axis, rows, x, y, ylabel, xlabel in specs:
        for tool in labels:
            xs, ys = _series(rows, tool, x, y)
            if not xs:
                continue
            color, marker, line = _style(tool)
            axis.plot(xs, ys, line, color=color, marker=marker, label=labels[tool])
        if x == "size":
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.axvline(PROTOBUF_LIMIT / GB, color="tab:red", lw=0.8, alpha=0.5)
            axis.annotate("2 GiB: onnx and onnx_ir\ncannot parse past here",
                          (PROTOBUF_LIMIT / GB, 0.97), xycoords=("data", "axes fraction"),
                          fontsize=7, color="tab:red", xytext=(3, 0), textcoords="offset points",
                          va="top")
        else:
            axis.set_xlim(left=0)
            axis.set_ylim(bottom=0)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    ax[0].set_title("weight-heavy models: time")
    ax[1].set_title("weight-heavy models: peak memory")
    if nodes:
        ax[2].set_title("graph-heavy models: time")
        ax[3].set_title("graph-heavy models: peak memory")
    ax[0].legend(fontsize=8, loc="lower right")
    title = "ONNX opset 11 -> 18 conversion of inline models (median of runs)"
    fig.suptitle(f"{title}\n{versions}" if versions else title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _style(tool: str) -> tuple[str, str, str]:
    return _STYLE.get(tool, ("tab:purple", ".", "-"))


def main(argv: Sequence[str] | None = None) -> int:
    """Redraw the figure from the CSV files of the last run."""
    parser = argparse.ArgumentParser(prog="python -m bench.plot")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV files")
    args = parser.parse_args(argv)
    results = read_results(args.results)
    if results is None:
        return 1
    sizes, nodes, tiny = results
    plot(sizes, nodes, args.results / "bench.png", format_versions([*tiny, *sizes, *nodes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
