"""The Dask executor on a real cluster: a scheduler and two worker processes on 127.0.0.1.

A mixed tree goes through a LocalCluster with processes and through the local
pool; outputs and report agree model by model.  A conversion that aborts fails
its model only (the task's child process dies, not the Dask worker), a worker
killed mid-batch loses no model and leaves no partial output, and a rerun
converts nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

import fixtures.small_models as sm
from fixtures.zoo import write_node_cases
from streamconv.batch import AT_TARGET, CONVERTED, FAILED, SKIPPED, BatchOptions, convert_tree
from tests.conftest import ROOT
from tests.models import reduce_chain, save
from tests.test_batch import inject_faults, leftovers_below, wait_until_staged

distributed = pytest.importorskip("distributed")

@pytest.fixture(autouse=True)
def no_resource_tracker_left() -> Iterator[None]:
    """A LocalCluster's worker processes leave multiprocessing's resource tracker
    running as a child of this process; stop it, as other tests check that this
    process has no children left."""
    yield
    import multiprocessing.resource_tracker as tracker

    stop = getattr(tracker._resource_tracker, "_stop", None)
    if stop is not None:
        stop()


NODE_CASES = ["test_abs", "test_if", "test_squeeze", "test_slice", "test_top_k"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Node models, a model with external data, one above 256 MB, one that will crash."""
    root = tmp_path_factory.mktemp("dask-src")
    write_node_cases(root, NODE_CASES)
    sm.external_data_model(root / "ext")
    from fixtures.bigmodel import write_big_model

    (root / "big").mkdir()
    write_big_model(root / "big" / "big.onnx", n_tensors=2, tensor_mib=130, opset=11)
    for name in ("crash", "hang"):
        (root / name).mkdir()
        save(reduce_chain(), root / name / f"{name}.onnx")
    yield root
    (root / "big" / "big.onnx").unlink()


def cluster() -> distributed.LocalCluster:
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None)


def by_source(result: object) -> dict[str, object]:
    return {m.source: m for m in result.models}  # type: ignore[attr-defined]


def test_same_as_the_local_pool_crash_isolated_and_rerun_converts_nothing(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject_faults(monkeypatch, tmp_path, crash="crash/crash.onnx", hang="hang/hang.onnx")
    local = convert_tree(tree, tmp_path / "local", BatchOptions(opset=13, jobs=2, timeout=8))
    with cluster() as c, distributed.Client(c) as client:
        options = BatchOptions(opset=13, jobs=2, scheduler=c.scheduler_address, timeout=8)
        workers_before = set(client.scheduler_info()["workers"])
        dask = convert_tree(tree, tmp_path / "dask", options)
        # the crash killed the task's child, not a worker: the same two are there
        assert set(client.scheduler_info()["workers"]) == workers_before
        rerun = convert_tree(tree, tmp_path / "dask", options)
    local_models, dask_models = by_source(local), by_source(dask)
    assert set(local_models) == set(dask_models)
    assert len(dask_models) == len(NODE_CASES) + 4
    for rel, m in dask_models.items():
        lm = local_models[rel]
        assert (m.status, m.action, m.opset_from, m.opset_to, m.tensors_diverted,  # type: ignore[attr-defined]
                m.bytes_out, m.data_files) == (  # type: ignore[attr-defined]
            lm.status, lm.action, lm.opset_from, lm.opset_to, lm.tensors_diverted,  # type: ignore[attr-defined]
            lm.bytes_out, lm.data_files), rel  # type: ignore[attr-defined]
        if m.status != FAILED:  # type: ignore[attr-defined]
            for name in [rel, *(str(Path(rel).parent / f) for f in m.data_files)]:  # type: ignore[attr-defined]
                assert (tmp_path / "dask" / name).read_bytes() == \
                    (tmp_path / "local" / name).read_bytes(), name
    crash = dask_models["crash/crash.onnx"]
    assert crash.status == FAILED and "SIGABRT" in crash.error  # type: ignore[attr-defined]
    assert sum(1 for m in dask_models.values() if m.status == FAILED) == sum(  # type: ignore[attr-defined]
        1 for m in local_models.values() if m.status == FAILED)  # type: ignore[attr-defined]
    assert dask_models["big/big.onnx"].status == CONVERTED  # type: ignore[attr-defined]
    assert len(workers_before) == 2
    hang = dask_models["hang/hang.onnx"]
    assert hang.status == FAILED and hang.error == "timed out after 8 s"  # type: ignore[attr-defined]
    assert {m.status for rel, m in by_source(rerun).items()  # type: ignore[attr-defined]
            if rel not in ("crash/crash.onnx", "hang/hang.onnx")} == {SKIPPED}
    assert leftovers_below(tmp_path / "dask") == []


# The first conversion of a model matching HANG_ONCE sleeps (marker file written);
# later ones go through: the model is retried after its worker is killed.
HANG_ONCE_SITE = textwrap.dedent("""
    import fnmatch, os, time
    import streamconv.api

    _real = streamconv.api.convert

    def convert(src, dst, **kwargs):
        marker = os.environ["HANG_MARKER"]
        if fnmatch.fnmatch(os.fspath(src), "*/" + os.environ["HANG_ONCE"]) \\
                and not os.path.exists(marker):
            before = kwargs.get("before_publish")

            def hang(staged):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(3600)

            kwargs["before_publish"] = hang
        return _real(src, dst, **kwargs)

    streamconv.api.convert = convert
""")


def test_a_worker_killed_mid_batch_loses_no_model(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HANG_ONCE_SITE)
    marker = tmp_path / "hanging"
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{ROOT}")
    monkeypatch.setenv("HANG_ONCE", "node/test_if/model.onnx")
    monkeypatch.setenv("HANG_MARKER", str(marker))
    out = tmp_path / "out"
    with cluster() as c:
        options = BatchOptions(opset=13, jobs=2, scheduler=c.scheduler_address,
                               exclude=("crash",))
        script = (
            "import sys, pickle; from streamconv.batch import convert_tree; "
            "opts = pickle.loads(bytes.fromhex(sys.argv[3])); "
            "r = convert_tree(sys.argv[1], sys.argv[2], opts); "
            "print(pickle.dumps(r).hex())"
        )
        import pickle

        proc = subprocess.Popen([sys.executable, "-c", script, str(tree), str(out),
                                 pickle.dumps(options).hex()], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the model never started"
            time.sleep(0.1)
        child = int(marker.read_text())
        with open(f"/proc/{child}/stat") as f:
            worker = int(f.read().rsplit(")", 1)[1].split()[1])  # the child's parent
        os.kill(worker, signal.SIGKILL)  # the Dask worker, mid-task; its nanny restarts it
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    result = pickle.loads(bytes.fromhex(stdout.strip().splitlines()[-1]))
    statuses = {m.source: m.status for m in result.models}
    assert statuses["node/test_if/model.onnx"] in (CONVERTED, AT_TARGET), result.models
    assert FAILED not in {s for r, s in statuses.items()} or all(
        "bitwise" in r for r, s in statuses.items() if s == FAILED)
    assert leftovers_below(out) == []
    onnx.checker.check_model(str(out / "node" / "test_if" / "model.onnx"))
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.1)  # the hung child went with its worker


def test_scheduler_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from streamconv.cli import main as cli_main

    src = tmp_path / "src"
    src.mkdir()
    save(reduce_chain(), src / "a.onnx")
    with cluster() as c:
        (tmp_path / "scheduler.json").write_text(json.dumps({"address": c.scheduler_address}))
        assert cli_main(["batch", str(src), str(tmp_path / "o1"), "--opset", "13", "--json",
                         "--scheduler-file", str(tmp_path / "scheduler.json")]) == 0
        assert json.loads(capsys.readouterr().out)["counts"]["converted"] == 1
        # the scheduler ran the task (its time is counted under the tasks' prefix)
        ran = c.scheduler.task_prefixes["streamconv"].all_durations["compute"]
        assert ran > 0
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", c.scheduler_address)
        assert cli_main(["batch", str(src), str(tmp_path / "o2"), "--opset", "13", "-q"]) == 0
        assert c.scheduler.task_prefixes["streamconv"].all_durations["compute"] > ran
        one, two = (tmp_path / "o1" / "a.onnx"), (tmp_path / "o2" / "a.onnx")
        assert one.read_bytes() == two.read_bytes()
    capsys.readouterr()


def test_without_distributed_or_with_bad_options(tmp_path: Path) -> None:
    from streamconv import UsageError

    with pytest.raises(UsageError, match="exclude each other"):
        BatchOptions(opset=13, scheduler="local", scheduler_file="x.json").validate()
    code = ("import sys; sys.modules['distributed'] = None; "
            "from streamconv.cli import main; sys.exit(main(sys.argv[1:]))")
    (tmp_path / "src").mkdir()
    proc = subprocess.run([sys.executable, "-c", code, "batch", str(tmp_path / "src"),
                           str(tmp_path / "out"), "--scheduler", "local"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "streamconv: error: --scheduler needs Dask distributed: " \
        "pip install 'streamconv[dask]'\n"


def test_tasks_are_sized_by_skeleton_and_nodes(tree: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx import helper

    from streamconv.batch.dask_executor import BASE_MEMORY, memory_estimate
    from streamconv.batch.plan import Job
    from streamconv.cli import main as cli_main

    big = tree / "big" / "big.onnx"
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(3000)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "v0", onnx.TensorProto.FLOAT, [4])], [helper.make_tensor_value_info(
            "v3000", onnx.TensorProto.FLOAT, [4])])
    del x
    wide = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]),
                tmp_path / "wide.onnx")
    options = BatchOptions(opset=13)

    def estimate(path: Path) -> int:
        return memory_estimate(Job(0, path.name, str(path), "", path.stat().st_size), options)

    # 260 MiB of weights weigh nothing (they are streamed); 3000 nodes do
    assert BASE_MEMORY <= estimate(big) < BASE_MEMORY + (1 << 20) < estimate(Path(wide))
    assert os.path.getsize(wide) < big.stat().st_size
    src = tmp_path / "src"
    src.mkdir()
    os.replace(wide, src / "wide.onnx")
    claims: list[object] = []
    submit = distributed.Client.submit

    def recording(self: distributed.Client, *args: object, **kwargs: object) -> object:
        claims.append(kwargs.get("resources"))
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", recording)
    # workers that declare MEMORY: each task claims its estimate (at most what they have)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  resources={"MEMORY": 8e9}) as c:
        result = convert_tree(src, tmp_path / "out", BatchOptions(
            opset=13, jobs=1, scheduler=c.scheduler_address))
    assert result.counts()["converted"] == 1
    assert claims == [{"MEMORY": estimate(src / "wide.onnx")}]
    # --scheduler local declares none (one task per worker at a time): nothing claimed
    claims.clear()
    assert cli_main(["batch", str(src), str(tmp_path / "out2"), "--opset", "13",
                     "--scheduler", "local", "--jobs", "1", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["counts"]["converted"] == 1
    assert claims == [None]


def test_ctrl_c_cancels_and_leaves_no_partial_output(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject_faults(monkeypatch, tmp_path, crash="", hang="hang/hang.onnx")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamconv", "batch", str(tree), str(out), "--opset", "13",
         "--scheduler", "local", "--jobs", "2", "--include", "hang/*", "--include", "ext/*",
         "-q"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # staged at the top of DST (the chunk's staging folder) or beside its output
        wait_until_staged(proc, out, "**/.streamconv-*/hang.onnx", 120)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed: end the batch and its cluster
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (out / "hang" / "hang.onnx").exists()
    assert leftovers_below(out) == [], stderr[-2000:]


def test_a_crash_inside_a_chunk_fails_only_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_batch_executors import chunks_of, flat_tree, recorded

    src, out = tmp_path / "src", tmp_path / "out"
    names = flat_tree(src, 24)
    crash = "m04.onnx"
    assert ["m03.onnx", crash, "m05.onnx"] in chunks_of(src, names, 2)  # one task
    inject_faults(monkeypatch, tmp_path, crash=crash, hang="")
    with cluster() as c, distributed.Client(c) as client:
        options = BatchOptions(opset=13, jobs=2, scheduler=c.scheduler_address)
        workers_before = set(client.scheduler_info()["workers"])
        models = by_source(convert_tree(src, out, options))
        assert set(client.scheduler_info()["workers"]) == workers_before
        rerun = by_source(convert_tree(src, out, options))
    assert models[crash].status == FAILED  # type: ignore[attr-defined]
    assert "SIGABRT" in models[crash].error  # type: ignore[attr-defined]
    assert {rel for rel, m in models.items()
            if m.status == CONVERTED} == set(names) - {crash}  # type: ignore[attr-defined]
    assert recorded(out) == set(names) - {crash}
    assert leftovers_below(out) == []
    assert {rel: m.status for rel, m in rerun.items()} == {  # type: ignore[attr-defined]
        rel: FAILED if rel == crash else SKIPPED for rel in names}
