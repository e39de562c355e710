"""The benchmark's bookkeeping: versions next to every result, the tiny model's floor."""

from __future__ import annotations

from pathlib import Path

import onnx

from bench.models import write_tiny_model
from bench.report import Run, check_goals, format_pivot, read_results, summarize, write_csv
from bench.tools import TOOLS
from bench.versions import PACKAGES, versions


def _run(tool: str, rep: int, wall: float, measured_with: str) -> Run:
    return Run("tiny", 0.0, 1, 100, tool, rep, wall, 30.0, 0.1, 0.01, 1.0, 0.5, "abc1234",
               measured_with)


def test_versions_name_every_package() -> None:
    text = versions()
    assert text.startswith("python ")
    for name in PACKAGES:
        assert f"; {name} " in text


def test_tiny_model_converts(tmp_path: Path) -> None:
    from streamconv import convert

    model = write_tiny_model(tmp_path / "tiny.onnx")
    assert model.nodes == 1 and model.file_size == model.path.stat().st_size
    report = convert(model.path, tmp_path / "out.onnx", opset=18)
    assert (report.opset_from, report.opset_to) == (11, 18)


def test_tiny_rows_are_ratios_to_import_numpy_and_keep_their_versions(tmp_path: Path) -> None:
    v = versions()
    runs = [
        _run("import_numpy", 0, 0.10, v), _run("streamconv_inline", 0, 0.30, v),
        _run("import_numpy", 1, 0.20, v), _run("streamconv_inline", 1, 0.40, v),
        _run("import_numpy", 2, 0.10, v), _run("streamconv_inline", 2, 0.25, v),
    ]
    tools = [t for t in TOOLS if t.name in ("import_numpy", "streamconv_inline")]
    rows = summarize("tiny", 0.0, 1, 100, runs, {}, tools)
    by_tool = {r.tool: r for r in rows}
    assert by_tool["import_numpy"].x_numpy == 1.0
    assert by_tool["streamconv_inline"].x_numpy == 2.5  # median of 3.0, 2.0, 2.5
    assert all(r.versions == v for r in rows)
    assert "PASS  start  streamconv_inline" in "\n".join(check_goals([], [], rows))
    assert "(2.50x numpy)" in format_pivot(rows)

    write_csv(tmp_path / "tiny.csv", rows)
    write_csv(tmp_path / "runs.csv", runs)
    results = read_results(tmp_path)
    assert results is not None
    sizes, nodes, tiny = results
    assert (sizes, nodes) == ([], [])
    assert tiny == rows
    assert "ml_dtypes" in (tmp_path / "runs.csv").read_text().splitlines()[1]


def test_throughput_row_runs_and_keeps_its_figures(tmp_path: Path) -> None:
    """A smoke run of bench.throughput: the serial loop and the local pool on four node
    models, one repetition, into a scratch results folder (no timing asserted)."""
    from bench import throughput as tp

    paths = tp.write_node_models(tmp_path / "tree", 3, 17)
    assert len(paths) == 3 and all(p.name == "model.onnx" for p in paths)
    for path in paths:  # none is at the target already
        model = onnx.load(str(path))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) != 17
    tools = [t for t in tp.TOOLS if t.name in ("serial", "pool")]
    rows = tp.run_throughput(4, 17, 2, 1, tools, tmp_path / "results", tmp_path)
    by_tool = {r.tool: r for r in rows}
    assert by_tool["serial"].x_serial == 1.0 and by_tool["serial"].converted == 4
    pool = by_tool["pool"]
    assert pool.runs == 1 and pool.converted is not None and pool.failed is not None
    assert pool.converted + pool.failed == 4 and pool.x_serial is not None
    assert pool.peak_worker_mb is not None and pool.peak_worker_mb > 20
    assert pool.versions == versions()
    assert "streamconv batch --jobs 2" in tp.format_table(rows)
    assert tp.check_goals(rows)[0].split()[1] == "throughput"
    lines = (tmp_path / "results" / "throughput.csv").read_text().splitlines()
    assert lines[0].startswith("models,opset,jobs,tool") and len(lines) == 3
    assert len((tmp_path / "results" / "throughput-runs.csv").read_text().splitlines()) == 3
    assert not list(tmp_path.glob("streamconv-throughput-*"))  # the tree is removed
