"""publish: outputs appear as matching pairs, durably, and crashed runs' folders go away."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from streamconv import convert
from streamconv.batch import BatchOptions, convert_tree
from tests.conftest import ROOT, leftovers
from tests.models import reduce_chain

# Loaded as sitecustomize by a child (and by a batch's workers, which import site
# too): the process sends itself STEP_SIGNAL right after its STEP_AT-th rename, or
# removal of a file outside a staging folder; a crash, kill -9 by a time limit, or
# Ctrl-C between two steps of the publish.
STEP_HOOK = textwrap.dedent("""
    import os, sys
    _at, _signal, _calls = int(os.environ["STEP_AT"]), int(os.environ["STEP_SIGNAL"]), [0]
    _workers_only = os.environ.get("STEP_WORKERS_ONLY") == "1"

    def _counted(real):
        def call(path, *args, **kwargs):
            result = real(path, *args, **kwargs)
            if _workers_only and sys.argv[:1] != ["-c"]:  # a batch's workers run with -c
                return result
            outside = [p for p in (path, *args) if ".streamconv-" not in os.fspath(p)]
            if kwargs.get("dir_fd") is None and outside:
                _calls[0] += 1
                if _calls[0] == _at:
                    os.kill(os.getpid(), _signal)
            return result
        return call

    os.replace, os.rename, os.unlink = (
        _counted(os.replace), _counted(os.rename), _counted(os.unlink))
""")


def _run_with_hook(tmp_path: Path, at: int, sig: int, *argv: str,
                   workers_only: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m streamconv *argv`` with STEP_HOOK armed (only in batch workers, or all)."""
    site = tmp_path / "hook-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(STEP_HOOK)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "STEP_AT": str(at),
           "STEP_SIGNAL": str(int(sig)), "STEP_WORKERS_ONLY": "1" if workers_only else "0"}
    return subprocess.run([sys.executable, "-m", "streamconv", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _model(tag: str, seed: int) -> onnx.ModelProto:
    """The reduce chain with weights of its own, named by its doc string."""
    model = reduce_chain(opset=11)
    model.doc_string = tag
    rng = np.random.default_rng(seed)
    for i, init in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            new = rng.standard_normal(array.shape).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, init.name))
    return model


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _check_pair(model_path: Path, models: dict[str, onnx.ModelProto], what: str) -> None:
    """The model at *model_path*, if any, loads with the weights of the model it is."""
    if not model_path.exists():
        return  # for the moment a data file is replaced, there is no model at all
    result = onnx.load(str(model_path))
    expected = _weights(models[result.doc_string])
    for name, array in _weights(result).items():
        if name in expected:
            np.testing.assert_array_equal(array, expected[name], err_msg=f"{what} {name}")


def test_a_kill_between_any_two_publish_steps_leaves_a_matching_pair(tmp_path: Path) -> None:
    models = {"A": _model("A", 1), "B": _model("B", 2)}
    sources = {}
    for tag, model in models.items():
        sources[tag] = tmp_path / f"{tag}.onnx"
        onnx.save(model, str(sources[tag]))
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "m.onnx"
    args = ["--opset", "13", "--layout", "external", "--size-threshold", "0", "-q"]
    convert(sources["A"], dst, opset=13, layout="external", size_threshold=0)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)

    killed = 0
    for k in range(1, 12):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        code = _run_with_hook(tmp_path, k, signal.SIGKILL, str(sources["B"]), str(dst),
                              *args).returncode
        if code == 0:
            break
        assert code == -signal.SIGKILL, code
        killed += 1
        # whatever the moment of the kill, a model in place and its data match
        _check_pair(dst, models, f"killed after step {k}:")
        # and the next conversion into the folder cleans up after the crash
        convert(sources["B"], dst, opset=13, layout="external", size_threshold=0)
        assert sorted(os.listdir(out)) == ["m.onnx", "m.onnx.data"], (k, os.listdir(out))
        assert onnx.load(str(dst)).doc_string == "B"
    assert killed >= 2  # the publish has steps to be killed between


def test_a_signal_during_the_publish_waits_for_it_to_finish(tmp_path: Path) -> None:
    models = {"A": _model("A", 1), "B": _model("B", 2)}
    for tag, model in models.items():
        onnx.save(model, str(tmp_path / f"{tag}.onnx"))
    dst = tmp_path / "out" / "m.onnx"
    dst.parent.mkdir()
    convert(tmp_path / "A.onnx", dst, opset=13, layout="external", size_threshold=0)
    proc = _run_with_hook(tmp_path, 1, signal.SIGTERM, str(tmp_path / "B.onnx"), str(dst),
                          "--opset", "13", "--layout", "external", "--size-threshold", "0")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    # the signal came at the first step of the publish, which then ran to its end
    assert onnx.load(str(dst)).doc_string == "B"
    _check_pair(dst, models, "after SIGTERM:")
    assert sorted(os.listdir(dst.parent)) == ["m.onnx", "m.onnx.data"]


def test_a_batch_worker_killed_between_publish_steps_leaves_a_matching_pair(
    tmp_path: Path
) -> None:
    """A model copied through (at the target already), with its external data."""
    models = {"A": _model("A", 1), "B": _model("B", 2)}
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()

    def write_source(tag: str) -> None:
        (src / "m.bin").unlink(missing_ok=True)  # onnx appends to an existing data file
        at_target = onnx.version_converter.convert_version(models[tag], 13)
        onnx.save(at_target, str(src / "m.onnx"), save_as_external_data=True,
                  location="m.bin", size_threshold=0)

    write_source("A")
    assert convert_tree(src, out, BatchOptions(opset=13)).models[0].status == "at_target"
    write_source("B")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    killed = 0
    for k in range(1, 12):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        proc = _run_with_hook(tmp_path, k, signal.SIGKILL, "batch", str(src), str(out),
                              "--opset", "13", "--force", "--jobs", "1", "-q",
                              workers_only=True)
        if proc.returncode == 0:
            break
        assert proc.returncode == 1, proc.stderr  # the model failed: its worker died
        killed += 1
        _check_pair(out / "m.onnx", models, f"worker killed after step {k}:")
        assert leftovers(out) == []  # the parent removed the dead worker's staging folder
    assert killed >= 2


def test_a_folder_at_the_model_path_is_refused_before_anything_moves(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(_model("A", 1), str(src))
    (tmp_path / "out.onnx").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "streamconv", str(src), str(tmp_path / "out.onnx"), "--opset",
         "13", "--layout", "external", "--size-threshold", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a folder" in lines[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]
    assert os.listdir(tmp_path / "out.onnx") == []


def test_an_inline_result_removes_the_previous_data_file_after_it_is_in_place(
    tmp_path: Path
) -> None:
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_model("A", 1), str(src))
    convert(src, dst, opset=13, layout="external", size_threshold=0)
    mine = tmp_path / "mine.data"
    mine.write_bytes(b"not streamconv's")
    convert(src, dst, opset=13, layout="inline")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "mine.data", "out.onnx"]


# -- durability --------------------------------------------------------------------------------


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record fsync (by path) and rename calls, in order."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a: Any, b: Any, **kwargs: Any) -> None:
        events.append(("replace", os.fspath(a), os.fspath(b)))
        real_replace(a, b, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _check_durable_order(events: list[tuple[str, ...]], folder: Path,
                         names: list[str]) -> None:
    """Each file synced before its rename, the folder synced after it, data before the model."""
    folder_syncs = [i for i, e in enumerate(events) if e == ("fsync", str(folder))]
    last = -1
    for name in names:
        final = str(folder / name)
        moves = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final]
        assert moves, (name, events)
        move = moves[-1]
        staged = events[move][1]
        assert ("fsync", staged) in events[:move], (name, events)
        assert any(i > move for i in folder_syncs), (name, events)
        assert move > last  # in order: data files first, the model last
        last = move


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("layout", ["external", "inline"])
def test_files_and_folder_are_synced_around_the_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_model("A", 1), str(src))
    for replacing in (False, True):
        events = _spy(monkeypatch)
        convert(src, dst, opset=13, layout=layout, size_threshold=0)
        monkeypatch.undo()
        names = ["out.onnx.data", "out.onnx"] if layout == "external" else ["out.onnx"]
        _check_durable_order(events, tmp_path, names)
        assert replacing or len([e for e in events if e[0] == "replace"]) == len(names)
    onnx.checker.check_model(str(dst), full_check=True)


def _big_weights_model() -> onnx.ModelProto:
    """Two 3 MiB weights and a small one: payloads past WRITEBACK_MIN, less than FORK_MIN."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    weights = [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"w{i}")
               for i, n in enumerate((3 << 18, 3 << 18, 16))]
    nodes = [helper.make_node("Add", ["x", "w0"], ["a"]),
             helper.make_node("Add", ["a", "w1"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3 << 18])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3 << 18])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("layout", ["external", "inline"])
def test_synced_outputs_start_writeback_of_their_payloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """A durable output asks for early writeback of every large payload it writes, only then."""
    import streamconv.writer as writer

    src = tmp_path / "in.onnx"
    onnx.save(_big_weights_model(), str(src))
    outputs = {}
    for fsync in (True, False):
        calls: list[tuple[str, int, int]] = []
        real = writer.start_writeback

        def spy(fd: int, offset: int, length: int, calls: list[Any] = calls,
                real: Any = real) -> None:
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
            real(fd, offset, length)

        monkeypatch.setattr(writer, "start_writeback", spy)
        dst = tmp_path / f"out-{fsync}.onnx"
        convert(src, dst, opset=13, layout=layout, fsync=fsync)
        monkeypatch.undo()
        name = dst.name + ".data" if layout == "external" else dst.name
        outputs[fsync] = [(dst / ".." / name).resolve().read_bytes(), dst.read_bytes()]
        if not fsync:
            assert calls == []
            continue
        # both 3 MiB payloads, in the staged file that became the output, nowhere else
        assert len(calls) == 2, calls
        assert {os.path.basename(path) for path, _, _ in calls} == {name}
        assert all(length == 3 << 20 for _, _, length in calls)
        size = os.path.getsize(tmp_path / name)
        assert all(offset + length <= size for _, offset, length in calls)
    # the only difference between the two is the data file's name recorded in the model
    a, b = outputs[True], outputs[False]
    assert a[0] == b[0] if layout == "external" else a[1] == b[1]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_fsync_syncs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(_model("A", 1), str(src))
    events = _spy(monkeypatch)
    convert(src, tmp_path / "out.onnx", opset=13, layout="external", size_threshold=0,
            fsync=False)
    monkeypatch.undo()
    assert [e for e in events if e[0] == "fsync"] == []
    assert (tmp_path / "out.onnx.data").exists()


# Logs every fsync and rename of a process (and of the batch's worker processes, which
# import site too) to a file: the durability of batch outputs, observed from outside.
SPY_SITE = textwrap.dedent("""
    import os
    _log = os.environ["SPY_LOG"]
    _fsync, _replace = os.fsync, os.replace

    def _note(*fields):
        with open(_log, "a") as f:
            f.write("\\t".join(fields) + "\\n")

    def fsync(fd):
        _note("fsync", os.readlink("/proc/self/fd/%d" % fd))
        _fsync(fd)

    def replace(a, b, **kwargs):
        _note("replace", os.fspath(a), os.fspath(b))
        if os.fspath(b).endswith(".streamconv.batch.json"):  # what the manifest records
            import json
            with open(a) as f:
                _note("manifest", *sorted(json.load(f)["outputs"]))
        _replace(a, b, **kwargs)

    os.fsync, os.replace = fsync, replace
""")


def spied_batch(tmp_path: Path, argv: list[str]) -> list[tuple[str, ...]]:
    """Run ``streamconv batch ARGV -q`` with :data:`SPY_SITE` loaded in every process;
    the fsyncs, renames and manifest writes it logged, in order."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SPY_SITE)
    log = tmp_path / "spy.log"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "SPY_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", "streamconv", "batch", *argv, "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [tuple(line.split("\t")) for line in log.read_text().splitlines()]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_batch_outputs_are_synced_around_their_renames(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    onnx.save(_model("A", 1), str(src / "sub" / "a.onnx"))  # converted
    at_target = _model("B", 2)
    onnx.save(onnx.version_converter.convert_version(at_target, 13), str(src / "b.onnx"),
              save_as_external_data=True, location="b.bin", size_threshold=0)  # copied
    events = spied_batch(tmp_path, [str(src), str(out), "--opset", "13", "--layout",
                                    "external", "--size-threshold", "0", "--jobs", "1"])
    _check_durable_order(events, out / "sub", ["a.onnx.data", "a.onnx"])
    _check_durable_order(events, out, ["b.bin", "b.onnx"])


# -- staging folders left by a crash ---------------------------------------------------------


CRASH_MID_WRITE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    real = os.replace

    def crash(*args, **kwargs):
        os.abort()  # an abort in C++ code: no Python clean-up runs

    os.replace = crash
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from streamconv.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_the_next_conversion_removes_folders_of_crashed_runs(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.onnx", tmp_path / "out" / "m.onnx"
    dst.parent.mkdir()
    onnx.save(_model("A", 1), str(src))
    script = tmp_path / "crash.py"
    script.write_text(CRASH_MID_WRITE.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(src), str(dst), "--opset", "13",
                           "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGABRT
    assert len(leftovers(dst.parent)) == 1
    convert(src, dst, opset=13)
    assert leftovers(dst.parent) == []
    assert os.listdir(dst.parent) == ["m.onnx"]


OWNER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from streamconv.publish import staging_name
    print(staging_name("t"), flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_folders_of_live_processes_and_other_hosts_stay(tmp_path: Path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out"
    out.mkdir()
    onnx.save(_model("A", 1), str(src))
    script = tmp_path / "owner.py"
    script.write_text(OWNER.format(root=str(ROOT)))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        live = owner.stdout.readline().strip()
        prefix, host, boot, pid, start, tag = live.split("-")
        reused = "-".join([prefix, host, boot, pid, str(int(start) + 1), tag])  # pid reused
        other_host = "-".join([prefix, "0badc0de", boot, pid, "1", tag])
        old_boot = "-".join([prefix, host, "0badc0de", pid, start, tag])
        for name in (live, reused, other_host, old_boot):
            (out / name).mkdir()
            (out / name / "m.onnx").write_bytes(b"half")
        convert(src, out / "m.onnx", opset=13)
        assert leftovers(out) == sorted([live, other_host])
    finally:
        owner.kill()
        owner.wait()
    time.sleep(0.05)
    convert(src, out / "m.onnx", opset=13)
    assert leftovers(out) == [other_host]


def test_batch_removes_folders_of_crashed_single_runs(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    onnx.save(_model("A", 1), str(src / "sub" / "m.onnx"))
    script = tmp_path / "crash.py"
    script.write_text(CRASH_MID_WRITE.format(root=str(ROOT)))
    (out / "sub").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(script), str(src / "sub" / "m.onnx"),
                           str(out / "sub" / "m.onnx"), "--opset", "13", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGABRT and len(leftovers(out / "sub")) == 1
    result = convert_tree(src, out, BatchOptions(opset=13))
    assert [m.status for m in result.models] == ["converted"]
    assert leftovers(out / "sub") == []
