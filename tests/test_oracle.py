"""streamconv against onnx's own version converter, on onnx's backend node test cases.

A fixed, seeded sample of (case, target opset) pairs from :mod:`fixtures.corpus`
(plain models, and models whose inputs were folded into initializers) is
converted by ``onnx.version_converter`` and by streamconv at the default size
threshold and at 0.  Wherever onnx converts, streamconv must convert too and
give a semantically equal model; nowhere may streamconv fail with anything but
a StreamconvError.  A sub-sample of the converted models is run in ONNX Runtime
against the cases' expected outputs.  ``python -m fixtures.corpus --all`` runs
every pair.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import corpus
from fixtures.corpus import (
    CRASHED,
    DELIBERATE,
    DIFFER,
    EQUAL,
    ONLY_STREAMCONV,
    TARGETS,
    THRESHOLDS,
    Pair,
    compare_models,
    evaluate_pair,
    load_cases,
    run_pairs,
    sample_pairs,
)
from streamconv import convert

SEED = 20240611
PLAIN_PAIRS = 360
FOLDED_PAIRS = 180
ORT_PAIRS = 40
ORT_MIN_RUN = 20
JOBS = max(1, min(2, os.cpu_count() or 1))

PAIRS: list[Pair] = sample_pairs(PLAIN_PAIRS, SEED, TARGETS, ("plain",)) + sample_pairs(
    FOLDED_PAIRS, SEED, TARGETS, ("folded",)
)


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    """Every sampled pair evaluated once, in worker processes that survive onnx aborting."""
    return {r["id"]: r for r in run_pairs(PAIRS, jobs=JOBS)}


# --------------------------------------------------------------------------- the sample


def _sample_ids_in_a_child() -> list[str]:
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from fixtures.corpus import TARGETS, sample_pairs\n"
        f"pairs = sample_pairs({PLAIN_PAIRS}, {SEED}, TARGETS, ('plain',)) + sample_pairs(\n"
        f"    {FOLDED_PAIRS}, {SEED}, TARGETS, ('folded',))\n"
        "print(json.dumps(sorted(p.id for p in pairs)))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    ids: list[str] = json.loads(result.stdout)
    return ids


def test_sample_is_fixed_and_covers_every_target(records: Mapping[str, Any]) -> None:
    assert len(PAIRS) == PLAIN_PAIRS + FOLDED_PAIRS
    assert len({p.id for p in PAIRS}) == len(PAIRS)
    # fixed: another interpreter, with other string hashing, draws the same sample
    assert sorted(p.id for p in PAIRS) == _sample_ids_in_a_child()
    assert {p.target for p in PAIRS} == set(TARGETS)
    assert set(records) == {p.id for p in PAIRS}
    for variant in ("plain", "folded"):
        for target in TARGETS:
            chosen = [r for r in records.values()
                      if r["target"] == target and r["variant"] == variant]
            converted = [r for r in chosen if r["onnx"]["status"] == "ok"]
            assert len(chosen) >= 40, (variant, target)
            # Otherwise the equivalence checks below would hold vacuously.
            assert len(converted) >= 5, (variant, target, len(converted))
    # Size threshold 0 must really have moved payloads out and back in.
    diverted = [r for r in records.values() if r["onnx"]["status"] == "ok"
                and r["streamconv"]["0"].get("tensors_diverted", 0) > 0]
    assert len(diverted) >= 50


def _explain(record: Mapping[str, Any], threshold: str) -> str:
    run = record["streamconv"][threshold]
    lines = [f"{record['id']} (source opset {record['source_opset']}, ops {record['ops']}), "
             f"size_threshold={threshold}: {run['category']}"]
    if "error" in run:
        lines.append(f"  streamconv: {run.get('error_type', '')}: {run['error']}")
    if "error" in record["onnx"]:
        lines.append(f"  onnx: {record['onnx']['error']}")
    lines += [f"  {d}" for d in run.get("diff", ())]
    return "\n".join(lines)


@pytest.mark.parametrize("pair_id", [p.id for p in PAIRS])
def test_streamconv_matches_onnx(records: Mapping[str, Any], pair_id: str) -> None:
    record = records[pair_id]
    assert "harness_error" not in record, record["harness_error"]
    onnx_ok = record["onnx"]["status"] == "ok"
    for threshold in map(str, THRESHOLDS):
        run = record["streamconv"][threshold]
        assert run["category"] != CRASHED, _explain(record, threshold)
        assert run["category"] != DIFFER, _explain(record, threshold)
        if onnx_ok and "refusal" not in run:
            assert run["category"] in (EQUAL, DELIBERATE), _explain(record, threshold)
        if run["category"] == DELIBERATE:
            # a deliberate difference is never a worse model than onnx's
            assert run["checker"] == "ok" or record["onnx"]["checker"] != "ok", \
                _explain(record, threshold)
    check = record["check"]
    assert check["status"] not in ("exception", "crash"), f"check=True: {check}"
    if onnx_ok and record["onnx"]["checker"] == "ok":
        # onnx's own result passes the checker, so the checked conversion must not refuse.
        assert check["status"] == "ok", f"check=True: {check}"


# --------------------------------------------------------------------------- the comparison


def _model(value: onnx.TensorProto, *, axes: Sequence[int] = (0,)) -> onnx.ModelProto:
    then = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["T"])], "then", [],
        [helper.make_tensor_value_info("T", onnx.TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["X"], ["S"], axes=list(axes)),
            helper.make_node("Constant", [], ["C"], value=value),
            helper.make_node("If", ["B"], ["Y"], then_branch=then, else_branch=then),
        ],
        "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("B", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor("W", onnx.TensorProto.INT64, [3], [1, 2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_comparison_ignores_encoding_but_not_values() -> None:
    typed = helper.make_tensor("v", onnx.TensorProto.FLOAT, [2], [1.5, -2.0])
    raw = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "v")
    base = _model(typed)
    assert compare_models(base, _model(raw)) == []

    changed = _model(numpy_helper.from_array(np.array([1.5, 2.0], np.float32), "v"))
    assert any("values differ" in d for d in compare_models(base, changed))

    assert any("axes" in d for d in compare_models(base, _model(typed, axes=(1,))))

    weights = onnx.ModelProto()
    weights.CopyFrom(base)
    weights.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.array([1, 2, 4], np.int64), "W")
    )
    assert any("initializer 'W'" in d for d in compare_models(base, weights))

    branch = onnx.ModelProto()
    branch.CopyFrom(base)
    then = next(a for a in branch.graph.node[2].attribute if a.name == "then_branch")
    then.g.node[0].op_type = "Neg"
    assert any("then_branch.g.node[0]" in d for d in compare_models(base, branch))

    opset = onnx.ModelProto()
    opset.CopyFrom(base)
    opset.opset_import[0].version = 13
    assert any("opset_import" in d for d in compare_models(base, opset))


def test_a_worker_killed_by_onnx_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    # Workers are forked, so they inherit this converter that dies on Abs models.
    real = onnx.version_converter.convert_version

    def dying(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        if any(node.op_type == "Abs" for node in model.graph.node):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, target)

    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("needs fork to hand the patched converter to the workers")
    monkeypatch.setattr(onnx.version_converter, "convert_version", dying)
    pairs = [Pair("test_abs", 13), Pair("test_neg", 13), Pair("test_abs", 21),
             Pair("test_neg", 21)]
    got = run_pairs(pairs, jobs=1, timeout=120)
    assert [r["id"] for r in got] == [p.id for p in pairs]
    for r in (got[0], got[2]):
        assert r["onnx"]["status"] == "crash"
        assert "SIGKILL" in r["onnx"]["error"]
    # At its own opset streamconv calls the same converter, so it dies too, and that
    # is a bug.
    for run in got[0]["streamconv"].values():
        assert run["status"] == "crash" and run["category"] == CRASHED
    assert got[0]["category"] == CRASHED
    # Abs is the same op from 13 to 21: that upgrade only changes the opset import, so
    # streamconv never calls onnx's converter and converts it in the fresh worker.
    for run in got[2]["streamconv"].values():
        assert run["status"] == "ok" and run["category"] == ONLY_STREAMCONV
    assert got[1]["category"] == got[3]["category"] == EQUAL


# --------------------------------------------------------------------------- ONNX Runtime


def _feeds(case: Any, model: onnx.ModelProto) -> dict[str, Any]:
    initializers = {t.name for t in case.model.graph.initializer}
    names = [vi.name for vi in case.model.graph.input if vi.name not in initializers]
    values = dict(zip(names, case.data_sets[0][0], strict=False))
    wanted = {vi.name for vi in model.graph.input} - {t.name for t in model.graph.initializer}
    feeds = {}
    for name, value in values.items():
        if name not in wanted:
            continue
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, np.generic):
            value = np.asarray(value)
        feeds[name] = value
    return feeds


def _run(model: str | bytes, feeds: Mapping[str, Any]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))  # type: ignore[no-any-return]


def _mismatch(expected: Any, actual: Any, rtol: float, atol: float, where: str) -> str | None:
    """Why *actual* is not *expected* within tolerance, or None if it is."""
    if isinstance(expected, list) or isinstance(actual, list):
        if not isinstance(expected, list) or not isinstance(actual, list):
            return f"{where}: {type(expected).__name__} != {type(actual).__name__}"
        if len(expected) != len(actual):
            return f"{where}: {len(expected)} elements != {len(actual)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            why = _mismatch(e, a, rtol, atol, f"{where}[{i}]")
            if why:
                return why
        return None
    if expected is None or actual is None:
        return None if expected is actual else f"{where}: {expected!r} != {actual!r}"
    if isinstance(expected, onnx.TensorProto):
        expected = numpy_helper.to_array(expected)
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return f"{where}: shape {expected.shape} != {actual.shape}"
    try:
        if expected.dtype == object or actual.dtype == object:
            np.testing.assert_array_equal(actual, expected)
        else:
            np.testing.assert_allclose(
                actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol
            )
    except (AssertionError, TypeError, ValueError) as e:
        return f"{where}: {str(e).strip().splitlines()[0]}"
    return None


def _outputs_mismatch(case: Any, outputs: Sequence[Any]) -> str | None:
    expected = case.data_sets[0][1]
    if len(expected) != len(outputs):
        return f"{len(expected)} outputs expected, got {len(outputs)}"
    for i, (e, a) in enumerate(zip(expected, outputs, strict=True)):
        why = _mismatch(e, a, case.rtol, case.atol, f"output {i}")
        if why:
            return why
    return None


def test_converted_models_run_in_onnxruntime(records: Mapping[str, Any], tmp_path: Path) -> None:
    converted = sorted(
        r["id"] for r in records.values()
        if r["onnx"]["status"] == "ok"
        and all(run["status"] == "ok" for run in r["streamconv"].values())
    )
    chosen = sorted(random.Random(SEED).sample(converted, min(ORT_PAIRS, len(converted))))
    by_id = {p.id: p for p in PAIRS}
    ran, skipped, failures = [], [], []
    for i, pair_id in enumerate(chosen):
        pair = by_id[pair_id]
        case = load_cases()[pair.case]
        source = pair.model()
        try:
            why = _outputs_mismatch(case, _run(source.SerializeToString(), _feeds(case, source)))
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).strip()[:120]}"
        if why:
            skipped.append(f"{pair_id}: ONNX Runtime cannot run the original ({why})")
            continue
        src, dst = tmp_path / f"{i}.onnx", tmp_path / f"{i}-out.onnx"
        onnx.save(source, src)
        layout = ("inline", "external")[i % 2]
        convert(src, dst, opset=pair.target, size_threshold=0, layout=layout, check=False)
        try:
            out = onnx.load(dst)
            why = _outputs_mismatch(case, _run(str(dst), _feeds(case, out)))
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).strip()[:200]}"
        if why:
            failures.append(f"{pair_id} ({layout}): {why}")
        else:
            ran.append(pair_id)
    summary = (f"{len(chosen)} pairs: {len(ran)} ran and matched, {len(skipped)} skipped, "
               f"{len(failures)} failed")
    print(summary, *skipped, sep="\n  ")
    assert not failures, summary + "\n" + "\n".join(failures)
    assert len(ran) >= ORT_MIN_RUN, summary + "\n" + "\n".join(skipped)


def test_every_pair_runs_in_process_too() -> None:
    # evaluate_pair is what the workers run; in-process it gives the same record.
    pair = Pair("test_squeeze", 11, "folded")
    record = evaluate_pair(pair)
    assert record["onnx"]["status"] == "ok"
    assert record["category"] == EQUAL
    assert record["streamconv"]["0"]["tensors_diverted"] >= 1
    assert corpus.fold_inputs("test_squeeze") is not None
