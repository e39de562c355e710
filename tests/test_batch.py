"""batch: a folder tree converted by isolated workers, resumable, verified, reported."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

from fixtures.zoo import copy_shipped, semantic_diff, write_node_cases
from streamconv import StreamconvError, batch, convert
from streamconv.batch import (
    AT_TARGET,
    CONVERTED,
    FAILED,
    SKIPPED,
    BatchOptions,
    BatchResult,
    Parity,
    convert_tree,
    find_files,
    verify_parity,
)
from streamconv.batch.manifest import MANIFEST
from streamconv.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


# Loaded as sitecustomize by the batch's worker processes (the test process itself has
# started already): while converting a model whose source path matches FAULT_CRASH
# (FAULT_HANG), the worker aborts (sleeps far past any time limit) with its output
# half written: from the first progress report of the conversion, or just before
# its publish when the model is too small to report progress.  Every conversion
# takes FAULT_SLOW seconds longer (just before its publish).
FAULT_SITE = textwrap.dedent("""
    import fnmatch, os, time
    import streamconv.api

    _real = streamconv.api.convert
    _slow = float(os.environ.get("FAULT_SLOW") or 0)

    def _matches(src, pattern):
        return bool(pattern) and (fnmatch.fnmatch(src, pattern)
                                  or fnmatch.fnmatch(src, "*/" + pattern))

    def _fire(src):
        if _matches(src, os.environ.get("FAULT_CRASH", "")):
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            os.abort()
        if _matches(src, os.environ.get("FAULT_HANG", "")):
            time.sleep(3600)

    def convert(src, dst, **kwargs):
        progress, before = kwargs.get("progress"), kwargs.get("before_publish")

        def on_progress(done, total):
            if progress is not None:
                progress(done, total)
            _fire(os.fspath(src))

        def on_publish(staged):
            time.sleep(_slow)
            _fire(os.fspath(src))
            if before is not None:
                before(staged)

        kwargs.update(progress=on_progress, before_publish=on_publish)
        return _real(src, dst, **kwargs)

    streamconv.api.convert = convert
""")


def inject_faults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, crash: str,
                  hang: str, slow: float = 0.0) -> None:
    """Make the batch's workers crash on models matching *crash*, hang on *hang*, and
    take *slow* seconds longer over every model."""
    site = tmp_path / "fault-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT_SITE)
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{ROOT}")
    monkeypatch.setenv("FAULT_CRASH", crash)
    monkeypatch.setenv("FAULT_HANG", hang)
    monkeypatch.setenv("FAULT_SLOW", str(slow))


def run_batch(argv: list[str]) -> int:
    """``streamconv batch ARGV`` in this process; its exit code."""
    return cli_main(["batch", *argv])

#: Node cases picked for variety: upgrades, downgrades, control flow, sequences, models at
#: opset 13 and 18, models onnx cannot convert, models whose conversion fails onnx.checker,
#: a model with no ai.onnx import, one onnx annotates with inferred shapes at the same opset.
NODE_CASES = [
    "test_abs", "test_adagrad", "test_add", "test_averagepool_2d_dilations",
    "test_bitwise_not_2d", "test_cast_FLOAT_to_FLOAT16", "test_clip_default_int8_min",
    "test_col2im", "test_dropout_default", "test_gelu_default_1", "test_if", "test_if_seq",
    "test_layer_normalization_2d_axis0", "test_loop11",
    "test_reduce_sum_default_axes_keepdims_example", "test_resize_upsample_scales_nearest",
    "test_scan9_sum", "test_sequence_insert_at_back", "test_slice", "test_squeeze",
    "test_top_k", "test_unsqueeze_axis_0", "test_upsample_nearest",
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tree of the models onnx ships: node cases, light, pytorch-converted."""
    root = tmp_path_factory.mktemp("zoo")
    write_node_cases(root, NODE_CASES)
    copy_shipped(root, limit=3)
    return root


def models_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.onnx"))


def leftovers_below(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if ".streamconv-" in p.name)


def wait_until_staged(proc: subprocess.Popen[str], out: Path, pattern: str,
                      seconds: float) -> None:
    """Wait until a file matching *pattern* below *out* is staged by the running
    batch *proc*; fail if the batch ends first or *seconds* pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:  # staging folders come and go while the batch runs
            if out.exists() and list(out.glob(pattern)):
                return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"nothing matching {pattern} was staged"
        time.sleep(0.05)


def by_source(result: BatchResult) -> dict[str, batch.ModelResult]:
    return {m.source: m for m in result.models}


def single(src: Path, dst: Path, target: int, **kwargs: object) -> tuple[bool, str]:
    """Convert one model with the API: (ok, error message)."""
    try:
        convert(src, dst, opset=target, **kwargs)  # type: ignore[arg-type]
    except StreamconvError as e:
        return False, " ".join(e.message.split())  # the report has it on one line
    return True, ""


def onnx_reference(src: Path, target: int) -> onnx.ModelProto | None:
    """onnx's own converter on the whole model, or None when it refuses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return version_converter.convert_version(onnx.load(str(src)), target)
    except Exception:
        return None


def fails_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:
        return True
    return False


def replaced_steps(src: Path, target: int) -> set[tuple[str, int]]:
    """The steps of *src*'s nodes down to *target* where streamconv replaces onnx's adapter."""
    from streamconv.steps import REPLACES_ONNX
    from streamconv.steps._schema import schema_at

    model = onnx.load(str(src))
    source = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    out = set()
    for op in ops:
        for v in range(target + 1, source + 1):
            schema = schema_at(op, v)
            if schema is not None and schema.since_version == v and (op, v) in REPLACES_ONNX:
                out.add((op, v))
    return out


def small_model(opset: int, seed: int = 0, n: int = 32) -> onnx.ModelProto:
    """Y = ReduceSum(X @ W + B) with axes as attribute (opset < 13) or input; W is 4 KiB."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((n,)).astype(np.float32), "B")
    inits = [w, b]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        reduce_ = helper.make_node("ReduceSum", ["S", "axes"], ["Y"], keepdims=0)
    else:
        reduce_ = helper.make_node("ReduceSum", ["S"], ["Y"], axes=[1], keepdims=0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["M"]), helper.make_node("Add", ["M", "B"], ["S"]),
         reduce_],
        "small",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    (path.parent / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=location,
              size_threshold=1024)


# -- acceptance: same outcome as single-model conversion, same meaning as onnx's converter --


@pytest.mark.parametrize("target", [13, 18])
def test_outcomes_match_single_conversion_and_onnx(zoo: Path, tmp_path: Path,
                                                   target: int) -> None:
    out = tmp_path / "out"
    result = convert_tree(zoo, out, BatchOptions(opset=target, jobs=2))
    models = by_source(result)
    assert sorted(models) == models_below(zoo)
    statuses = {m.status for m in models.values()}
    assert {CONVERTED, AT_TARGET, FAILED} <= statuses
    for rel, m in models.items():
        src, dst = zoo / rel, out / rel
        ok, message = single(src, tmp_path / "single.onnx", target)
        assert (m.status != FAILED) == ok, (rel, m.error, message)
        reference = onnx_reference(src, target)
        if not ok:
            assert m.error is not None and m.error.endswith(message), rel
            assert not dst.exists()
            if reference is not None:  # onnx converts it, but to a model its checker rejects
                assert fails_checker(reference), (rel, m.error)
            continue
        if m.status == AT_TARGET:
            assert m.action == "copy" and dst.read_bytes() == src.read_bytes()
        else:
            # Deterministic output: the batch writes what a single conversion writes.
            assert dst.read_bytes() == (tmp_path / "single.onnx").read_bytes(), rel
        assert m.opset_to == target and m.bytes_out == dst.stat().st_size
        if reference is not None:
            # equal to onnx's result, except where streamconv deliberately replaces
            # onnx's adapter (numbers checked against ONNX Runtime in test_steps and
            # test_downgrades)
            diff = semantic_diff(reference, onnx.load(str(dst)))
            assert diff is None or replaced_steps(src, target), (rel, diff)
    assert leftovers_below(out) == []


def test_force_convert_converts_models_already_at_target(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = BatchOptions(opset=13, jobs=1, force_convert=True,
                           include=("test_abs", "test_slice", "test_squeeze"))
    models = by_source(convert_tree(zoo, out, options))
    assert models["node/test_abs/model.onnx"].status == AT_TARGET
    assert models["node/test_abs/model.onnx"].action == "convert"
    assert models["node/test_squeeze/model.onnx"].status == CONVERTED
    for rel in models:
        assert single(zoo / rel, tmp_path / "single.onnx", 13)[0]
        assert (out / rel).read_bytes() == (tmp_path / "single.onnx").read_bytes()


# -- acceptance: a crash and a time-out fail only their model --------------------------------


def test_crashed_and_hung_workers_fail_only_their_model(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, report = tmp_path / "out", tmp_path / "report.json"
    crash, hang = "node/test_if/model.onnx", "pytorch-converted/test_AvgPool1d/model.onnx"
    inject_faults(monkeypatch, tmp_path, crash="node/test_if/*",
                  hang="pytorch-converted/test_AvgPool1d/*")
    started = time.monotonic()
    code = run_batch([str(zoo), str(out), "--opset", "18", "--jobs", "2", "--timeout", "3",
                      "--report", str(report), "-q"])
    assert time.monotonic() - started < 60
    assert code == 1
    models = {m["source"]: m for m in json.loads(report.read_text())["models"]}
    assert models[crash]["status"] == FAILED
    assert "died" in models[crash]["error"] and "SIGABRT" in models[crash]["error"]
    assert models[hang]["status"] == FAILED
    assert models[hang]["error"] == "timed out after 3 s"
    for rel, m in models.items():
        if rel not in (crash, hang):  # everything else as if nothing had happened
            assert (m["status"] != FAILED) == single(zoo / rel, tmp_path / "s.onnx", 18)[0], rel
            assert (out / rel).exists() == (m["status"] != FAILED), rel
    assert not (out / crash).exists() and not (out / hang).exists()
    assert leftovers_below(out) == []

    # The rerun picks up exactly the two that failed this way.
    monkeypatch.delenv("PYTHONPATH")
    rerun = by_source(convert_tree(zoo, out, BatchOptions(opset=18, jobs=2)))
    assert rerun[crash].status == CONVERTED and rerun[hang].status == CONVERTED
    redone = {rel for rel, m in rerun.items() if m.status in (CONVERTED, AT_TARGET)}
    assert redone == {crash, hang}


def _copy_processes_of(folder: Path) -> list[int]:
    """Processes that still hold a file open below *folder*."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder)) for fd in fds):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_killed_worker_takes_its_copy_process_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that crashes or hangs while a forked process copies its payloads."""
    from fixtures.bigmodel import write_big_model

    src = tmp_path / "src"
    src.mkdir()
    for name in ("crash", "hang", "fine"):  # 48 MiB each: copied by a forked process
        write_big_model(src / f"{name}.onnx", n_tensors=4, tensor_mib=12, opset=11)
    inject_faults(monkeypatch, tmp_path, crash="crash.onnx", hang="hang.onnx")
    out = tmp_path / "out"
    code = run_batch([str(src), str(out), "--opset", "18", "--jobs", "2", "--timeout", "3",
                      "--layout", "external", "-q"])
    assert code == 1
    assert sorted(os.listdir(out)) == [MANIFEST, "fine.onnx", "fine.onnx.data"]
    deadline = time.monotonic() + 5
    while _copy_processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _copy_processes_of(out) == []
    assert leftovers_below(out) == []


# -- acceptance: resumable -------------------------------------------------------------------


def test_rerun_converts_nothing_and_a_touched_source_is_redone(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = BatchOptions(opset=13, jobs=2, include=("pytorch-converted/*", "light/*",
                                                      "test_if", "test_abs",
                                                      "test_bitwise_not_2d"))
    first = convert_tree(zoo, out, options)
    done = {m.source for m in first.models if m.status in (CONVERTED, AT_TARGET)}
    # BitwiseNot has no equivalent below 18
    assert len(done) >= 7 and first.counts()[FAILED] == 1

    again = convert_tree(zoo, out, options)
    assert {m.source for m in again.models if m.status == SKIPPED} == done
    assert again.counts()[CONVERTED] == again.counts()[AT_TARGET] == 0
    assert [m.source for m in again.models if m.status == FAILED] == [
        "node/test_bitwise_not_2d/model.onnx"]

    touched = "pytorch-converted/test_AvgPool1d/model.onnx"
    time.sleep(0.05)  # past the file system's timestamp granularity
    os.utime(zoo / touched)
    third = by_source(convert_tree(zoo, out, options))
    assert [rel for rel, m in third.items() if m.status == CONVERTED] == [touched]
    fourth = convert_tree(zoo, out, options)
    assert fourth.counts()[CONVERTED] == 0

    forced = convert_tree(zoo, out, dataclasses.replace(options, force=True)).counts()
    assert forced[SKIPPED] == 0 and forced[CONVERTED] + forced[AT_TARGET] == len(done)


def test_missing_data_file_makes_an_output_stale(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    save_external(small_model(11), src / "m.onnx", "m.bin")
    options = BatchOptions(opset=17, jobs=1)
    assert convert_tree(src, out, options).models[0].data_files == ["m.onnx.data"]
    assert convert_tree(src, out, options).models[0].status == SKIPPED
    (out / "m.onnx.data").unlink()
    assert convert_tree(src, out, options).models[0].status == CONVERTED
    assert (out / "m.onnx.data").exists()


def test_interrupt_leaves_no_partial_output(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, report = tmp_path / "out", tmp_path / "report.json"
    inject_faults(monkeypatch, tmp_path, crash="", hang="light/*")
    env = dict(os.environ)
    monkeypatch.delenv("PYTHONPATH")  # the rerun below runs without the fault
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamconv", "batch", str(zoo), str(out), "--opset", "13",
         "--jobs", "2", "--include", "light/*", "--report", str(report), "-q"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Wait until both workers sit on a half-written output.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:  # staging folders come and go while the tree is walked
            staged = [p for p in out.glob("**/.streamconv-*/*")] if out.exists() else []
        except FileNotFoundError:
            staged = []
        if len(staged) >= 2:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the workers never started writing")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert json.loads(report.read_text())["interrupted"] is True
    assert leftovers_below(out) == []
    assert models_below(out) == []

    result = convert_tree(zoo, out, BatchOptions(opset=13, jobs=2, include=("light/*",)))
    assert result.counts()[CONVERTED] == len(models_below(zoo / "light"))


# -- external data, other files, --verify ----------------------------------------------------


def test_external_data_is_copied_or_rewritten(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    save_external(small_model(17, seed=1), src / "at" / "a.onnx", "weights/a.bin")
    save_external(small_model(11, seed=2), src / "old" / "b.onnx", "b.bin")
    onnx.save(small_model(11, seed=3), str(src / "old" / "c.onnx"))
    (src / "old" / "README.txt").write_text("notes\n")
    save_external(small_model(17, seed=4), src / "bad.onnx", "bad.bin")
    bad = onnx.load(str(src / "bad.onnx"), load_external_data=False)
    w = next(t for t in bad.graph.initializer if t.name == "W")
    next(e for e in w.external_data if e.key == "location").value = "../escape.bin"
    (src / "bad.onnx").write_bytes(bad.SerializeToString())

    options = BatchOptions(opset=17, jobs=2, verify=True, copy_other=True)
    result = convert_tree(src, out, options)
    models = by_source(result)
    assert models["at/a.onnx"].status == AT_TARGET and models["at/a.onnx"].action == "copy"
    assert models["at/a.onnx"].data_files == ["weights/a.bin"]
    assert (out / "at/weights/a.bin").read_bytes() == (src / "at/weights/a.bin").read_bytes()
    assert models["old/b.onnx"].status == CONVERTED
    assert models["old/b.onnx"].data_files == ["b.onnx.data"]  # external stays external
    assert not (out / "old/b.bin").exists()  # the source's data file is not "other"
    assert models["old/c.onnx"].data_files == []  # inline stays inline
    assert (out / "old/README.txt").read_text() == "notes\n"
    assert result.others_copied == ["bad.bin", "old/README.txt"]  # bad.bin: no longer used
    for rel in ("old/b.onnx", "old/c.onnx"):
        assert models[rel].verify == "match on seeded random inputs (0)"
        assert models[rel].bytes_in is not None and models[rel].bytes_in > 4096
    assert models["at/a.onnx"].verify == "not run: copied unchanged"
    ok, message = single(src / "bad.onnx", tmp_path / "bad-single.onnx", 17)
    assert not ok and "escapes the model's folder" in message
    assert models["bad.onnx"].status == FAILED and models["bad.onnx"].error.endswith(message)
    assert leftovers_below(out) == []

    again = convert_tree(src, out, options)
    assert again.counts()[SKIPPED] == 3 and again.others_copied == []


def test_verify_parity_compares_runtime_outputs(zoo: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(small_model(13, seed=1), str(a))
    onnx.save(small_model(13, seed=2), str(b))
    assert verify_parity(str(a), str(a)) == Parity(True, "match on seeded random inputs (0)")
    parity = verify_parity(str(a), str(b))
    assert parity.ok is False and "output 'Y': values differ" in parity.detail
    case = zoo / "node" / "test_squeeze" / "model.onnx"
    assert verify_parity(str(case), str(case)) == Parity(True, "match on test_data_set_0")
    old = zoo / "pytorch-converted" / "test_AvgPool1d" / "model.onnx"  # ORT has no AveragePool-1
    parity = verify_parity(str(old), str(old))
    assert parity.ok is None and parity.detail.startswith("not checked: ONNX Runtime")


def test_verify_mismatch_fails_the_model_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out"
    onnx.save(small_model(11), str(src))
    out.mkdir()
    monkeypatch.setattr(batch.job, "verify_parity",
                        lambda a, b: Parity(False, "output 'Y' differs"))
    job = batch.plan.Job(0, "m.onnx", str(src), str(out / "m.onnx"), src.stat().st_size)
    result = batch.job.run_job(job, BatchOptions(opset=17, verify=True), lambda n: None)
    assert result.status == FAILED and result.error == "--verify: output 'Y' differs"
    assert list(out.iterdir()) == []


# -- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be > 0 seconds, got 0"),
        (["--opset", "999"], "--opset must be between"),
        (["--size-threshold", "-3"], "--size-threshold must be >= 0, got -3"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             args: list[str], message: str) -> None:
    (tmp_path / "src").mkdir()
    assert run_batch([str(tmp_path / "src"), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_folders_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    assert run_batch([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert run_batch([str(tmp_path / "src"), str(tmp_path / "src")]) == 2
    assert run_batch([str(tmp_path / "src" / "sub"), str(tmp_path / "src")]) == 2
    assert "lies inside DST_DIR" in capsys.readouterr().err


def test_output_inside_source_is_not_walked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(small_model(11), str(src / "m.onnx"))
    result = convert_tree(src, src / "out", BatchOptions(opset=13, jobs=1))
    assert [m.source for m in result.models] == ["m.onnx"]
    assert find_files(str(src), str(src / "out")) == (["m.onnx"], [])


def test_dry_run_lists_and_writes_nothing(zoo: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = run_batch([str(zoo), str(out), "--opset", "13", "--dry-run",
                      "--include", "node/*", "--exclude", "test_s*"])
    assert code == 0 and not out.exists()
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line.split()[0] for line in lines[:-1]}
    assert rows["node/test_abs/model.onnx"] == "copy"
    assert rows["node/test_if/model.onnx"] == "convert"
    assert "node/test_adagrad/model.onnx" in rows
    assert not any("/test_s" in rel for rel in rows)
    assert not any(rel.startswith(("light/", "pytorch")) for rel in rows)
    assert lines[-1].startswith("dry run: ")


def test_summary_and_csv_report(zoo: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "out", tmp_path / "report.csv"
    code = run_batch([str(zoo), str(out), "--opset", "13", "--jobs", "1", "--report",
                      str(report), "--include", "test_abs", "--include", "test_bitwise_not_2d",
                      "--include", "test_if"])
    assert code == 1
    text = capsys.readouterr().out
    assert "  converted                 1" in text
    assert "  already at target         1  (1 copied through, 0 converted)" in text
    assert "  failed                    1" in text
    assert "failed:\n  node/test_bitwise_not_2d/model.onnx: cannot convert the main graph to " \
        "opset 13" in text
    with open(report, newline="") as f:
        rows = {r["source"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["node/test_abs/model.onnx", "node/test_bitwise_not_2d/model.onnx",
                          "node/test_if/model.onnx"]
    assert rows["node/test_if/model.onnx"]["opset_from"] == "11"
    assert rows["node/test_if/model.onnx"]["status"] == CONVERTED
    assert rows["node/test_bitwise_not_2d/model.onnx"]["error"]
    assert set(rows["node/test_abs/model.onnx"]) >= {
        "source", "opset_from", "opset_to", "bytes_in", "bytes_out", "tensors_diverted",
        "seconds", "status", "error"}


def test_report_named_without_a_folder(zoo: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``--report r.json`` (no folder part) lands in the current folder; it once
    looped forever looking for the folder of "" while the output was complete."""
    monkeypatch.chdir(tmp_path)
    code = run_batch([str(zoo), "out", "--opset", "13", "--jobs", "1", "--include",
                      "test_abs", "--report", "r.json", "-q"])
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["at_target"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_glob_matching() -> None:
    assert batch.plan._matches("node/test_abs/model.onnx", "test_abs")
    assert batch.plan._matches("node/test_abs/model.onnx", "node/*")
    assert not batch.plan._matches("node/test_abs/model.onnx", "test_ab")
    assert not batch.plan._matches("node/test_abs/model.onnx", "light/*")
    assert batch.plan._selected("a/b.onnx", (), ())
    assert not batch.plan._selected("a/b.onnx", ("c*",), ())
    assert not batch.plan._selected("a/b.onnx", (), ("a",))
