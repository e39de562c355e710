"""The local pool's chunks: many small models to a worker in one message, faults inside.

A flat folder of small models goes to one worker (``--jobs 1``) in chunks of three
(:func:`plan_chunks`), so a crash, a hang or a Ctrl-C lands in the middle of a
chunk: the model it hits fails alone, the models of the chunk before it are done
and recorded, the ones after it run on the next worker, and the manifest holds
exactly the outputs in place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import pytest

from streamconv.batch import CONVERTED, FAILED, SKIPPED, BatchOptions, convert_tree
from streamconv.batch.executors import CHUNK_BELOW, CHUNK_MODELS, plan_chunks
from streamconv.batch.manifest import MANIFEST
from streamconv.batch.plan import Job
from tests.conftest import ROOT
from tests.test_batch import (
    by_source,
    inject_faults,
    leftovers_below,
    small_model,
    wait_until_staged,
)

N_MODELS = 12


def flat_tree(folder: Path, n: int = N_MODELS) -> list[str]:
    """*n* small opset-11 models ``m00.onnx``... of one size in *folder*; their names."""
    folder.mkdir(parents=True)
    names = [f"m{i:02d}.onnx" for i in range(n)]
    for i, name in enumerate(names):
        onnx.save(small_model(11, seed=i), str(folder / name))
    assert len({(folder / name).stat().st_size for name in names}) == 1
    return names


def chunks_of(folder: Path, names: list[str], workers: int) -> list[list[str]]:
    """The chunks the batch forms for the models *names* in *folder*."""
    jobs = [Job(i, name, str(folder / name), "", (folder / name).stat().st_size)
            for i, name in enumerate(names)]
    return [[j.rel for j in chunk] for chunk in plan_chunks(jobs, workers)]


def recorded(out: Path) -> set[str]:
    return set(json.loads((out / MANIFEST).read_text())["outputs"])


def test_small_models_go_in_chunks_and_large_ones_alone() -> None:
    large = [Job(i, f"big{i}", "", "", CHUNK_BELOW + i) for i in range(3)]
    small = [Job(3 + i, f"s{i}", "", "", 1000 + i % 7) for i in range(1000)]
    chunks = plan_chunks([*small, *large], 2)
    assert [c for c in chunks[:3]] == [[large[2]], [large[1]], [large[0]]]  # largest first
    rest = chunks[3:]
    assert all(len(c) == CHUNK_MODELS for c in rest[:-1]) and 0 < len(rest[-1]) <= CHUNK_MODELS
    assert sorted(j.index for c in chunks for j in c) == list(range(1003))
    sizes = [j.size for c in rest for j in c]
    assert sizes == sorted(sizes, reverse=True)
    # few models: at least four chunks per worker, so the last ones spread out
    assert [len(c) for c in plan_chunks(small[:20], 2)] == [3, 3, 3, 3, 3, 3, 2]
    assert plan_chunks([], 2) == []


def test_a_crash_inside_a_chunk_fails_only_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    names = flat_tree(src)
    crash = "m04.onnx"
    assert ["m03.onnx", crash, "m05.onnx"] in chunks_of(src, names, 1)
    inject_faults(monkeypatch, tmp_path, crash=crash, hang="")
    models = by_source(convert_tree(src, out, BatchOptions(opset=13, jobs=1)))
    assert models[crash].status == FAILED and "SIGABRT" in (models[crash].error or "")
    assert {rel for rel, m in models.items() if m.status == CONVERTED} == set(names) - {crash}
    assert sorted(os.listdir(out)) == sorted([MANIFEST, *(set(names) - {crash})])
    assert leftovers_below(out) == []
    # the model done before the crash in its chunk is recorded like every other
    assert recorded(out) == set(names) - {crash}

    monkeypatch.delenv("PYTHONPATH")
    rerun = by_source(convert_tree(src, out, BatchOptions(opset=13, jobs=1)))
    assert {rel for rel, m in rerun.items() if m.status != SKIPPED} == {crash}
    assert rerun[crash].status == CONVERTED


def test_the_time_limit_holds_per_model_inside_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    names = flat_tree(src)
    hang = "m07.onnx"
    assert ["m06.onnx", hang, "m08.onnx"] in chunks_of(src, names, 1)
    # every model takes 0.5 s, so a chunk of three takes longer than the limit
    inject_faults(monkeypatch, tmp_path, crash="", hang=hang, slow=0.5)
    models = by_source(convert_tree(src, out, BatchOptions(opset=13, jobs=1, timeout=1.2)))
    assert models[hang].status == FAILED and models[hang].error == "timed out after 1.2 s"
    assert {rel for rel, m in models.items() if m.status == CONVERTED} == set(names) - {hang}
    assert leftovers_below(out) == []
    assert recorded(out) == set(names) - {hang}


def test_ctrl_c_inside_a_chunk_leaves_complete_recorded_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    names = flat_tree(src)
    hang = "m05.onnx"
    assert ["m03.onnx", "m04.onnx", hang] in chunks_of(src, names, 1)
    inject_faults(monkeypatch, tmp_path, crash="", hang=hang)
    env = dict(os.environ)
    monkeypatch.delenv("PYTHONPATH")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamconv", "batch", str(src), str(out), "--opset", "13",
         "--jobs", "1", "-q"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_until_staged(proc, out, f".streamconv-*/{hang}", 60)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed: end the batch, workers and all
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert leftovers_below(out) == []
    before = set(names[:names.index(hang)])
    assert set(os.listdir(out)) == {MANIFEST, *before}
    assert recorded(out) == before
    for name in before:
        onnx.checker.check_model(str(out / name), full_check=True)

    rerun = by_source(convert_tree(src, out, BatchOptions(opset=13, jobs=1)))
    assert {rel for rel, m in rerun.items() if m.status == SKIPPED} == before
    assert {rel for rel, m in rerun.items() if m.status == CONVERTED} == set(names) - before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_folders_are_synced_once_per_chunk_before_the_outputs_count(tmp_path: Path) -> None:
    from tests.test_publish import spied_batch

    src, out = tmp_path / "src", tmp_path / "out"
    names = flat_tree(src / "sub")
    events = spied_batch(tmp_path, [str(src), str(out), "--opset", "13", "--jobs", "1"])
    folder = str(out / "sub")
    folder_syncs = [i for i, e in enumerate(events) if e == ("fsync", folder)]
    parent_syncs = [i for i, e in enumerate(events) if e == ("fsync", str(out))]
    for name in names:
        move = next(i for i, e in enumerate(events)
                    if e[0] == "replace" and e[2] == f"{folder}/{name}")
        assert ("fsync", events[move][1]) in events[:move], name  # the file before its rename
        # the first manifest that records the output comes after its folder's sync
        recorded_at = next(i for i, e in enumerate(events)
                           if e[0] == "manifest" and f"sub/{name}" in e[1:])
        assert any(move < i < recorded_at for i in folder_syncs), name
        assert any(i < recorded_at for i in parent_syncs), name  # and the new folder's entry
    chunks = len(chunks_of(src / "sub", names, 1))
    assert len(folder_syncs) == chunks < len(names)


def _worker_children() -> list[int]:
    """This process's children that run a batch worker."""
    me = os.getpid()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and b"_worker_main" in cmdline:
            found.append(int(pid))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_workers_start_before_planning_and_none_outlives_the_batch(tmp_path: Path) -> None:
    """The workers are started while the batch plans; a rerun that finds everything
    up to date kills them at once, and removes their folder."""
    src, out = tmp_path / "src", tmp_path / "out"
    flat_tree(src, 6)
    options = BatchOptions(opset=13, jobs=2)
    scratch = set(Path(tempfile.gettempdir()).glob("streamconv-batch-*"))
    first = convert_tree(src, out, options)
    assert first.counts()[CONVERTED] == 6, first.models
    assert _worker_children() == []
    again = convert_tree(src, out, options)
    assert again.counts()[SKIPPED] == 6
    assert _worker_children() == []
    assert set(Path(tempfile.gettempdir()).glob("streamconv-batch-*")) <= scratch
