"""Downgrades against the numbers: onnx's node test cases run in ONNX Runtime.

A fixed, seeded sample of (case, target opset) downgrade pairs from
:mod:`fixtures.downgrades` is converted by streamconv (default mode) and by
onnx's ``convert_version``; every converted model is checked with
``onnx.checker.check_model(full_check=True)`` and run in ONNX Runtime against
the case's reference outputs, with the tolerance of onnx's backend tests.
streamconv may refuse a pair, but what it converts must pass the checker and
give the reference's numbers.  ``python -m fixtures.downgrades --all`` (part of
``make corpus``) runs every pair.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import pytest

import streamconv
from fixtures.corpus import Pair
from fixtures.downgrades import (
    CHECKER_FAILING,
    CRASHED,
    MATCHING,
    MISMATCHING,
    ORT_UNRUNNABLE,
    REFUSED,
    SKIPPED,
    TARGETS,
    all_downgrades,
    categorize,
    compare_outputs,
    normalize_reason,
    random_reason,
    refusal_op,
    run_downgrades,
    sample_downgrades,
    summarize,
)

SEED = 20261201
SAMPLE = 300
JOBS = max(1, min(2, os.cpu_count() or 1))

PAIRS = sample_downgrades(SAMPLE, SEED)
# onnx's Softmax/LogSoftmax 13 -> 12 adapter keeps a non-last axis, whose meaning changed.
SOFTMAX = [Pair("test_softmax_axis_0", 12), Pair("test_softmax_axis_1", 12),
           Pair("test_logsoftmax_axis_0", 12)]


# GroupNormalization 21 takes scale and bias per channel, 18 per group: the step is
# not compatible, and the conversion must not give a model ORT rejects.
GROUPNORM = [Pair("test_group_normalization_example", 17),
             Pair("test_group_normalization_epsilon", 13)]

# A Squeeze with a negative axis inside a Loop body (LinearAttention's function
# body) needs its input's rank at 11; only inference at a newer opset finds it,
# so the steps after must keep it when no onnx call in between writes it down.
LOOP_BODY = [Pair("test_linear_attention_decode_step", 9),
             Pair("test_linear_attention_gated_expanded", 9)]

# Opset-28 steps that only added types cross by the schema check, without onnx's
# converter: one case of each such op, from 28 down to 21.
OPSET28 = [Pair(case, 21) for case in (
    "test_cast_BFLOAT16_to_FLOAT", "test_compress_0", "test_dequantizelinear",
    "test_einsum_batch_diagonal", "test_onehot_negative_indices",
    "test_optional_has_element_empty_no_input_name_optional_input", "test_quantizelinear",
    "test_reversesequence_batch", "test_unique_length_1")]


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    """The sample and the regression pairs, evaluated once in crash-surviving workers."""
    return {r["id"]: r for r in run_downgrades(
        PAIRS + SOFTMAX + GROUPNORM + LOOP_BODY + OPSET28, jobs=JOBS)}


def _explain(record: Mapping[str, Any]) -> str:
    side = record["streamconv"]
    lines = [f"{record['case']} downgraded to {record['target']} (from opset "
             f"{record['source_opset']}, ops {record['ops']}): {side['category']}"]
    if "max_abs_diff" in side:
        lines.append(f"  max abs diff {side['max_abs_diff']:.4g} from the "
                     f"{side.get('matched', 'reference')} (rtol {record['rtol']}, "
                     f"atol {record['atol']})")
    for key in ("why", "checker", "ort_error", "refeval", "error"):
        if key in side and side[key] != "ok":
            lines.append(f"  {key}: {side[key]}")
    lines.append(f"  onnx's converter: {record['onnx']['category']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the sample


def test_sample_is_fixed_and_not_vacuous(records: Mapping[str, Any]) -> None:
    assert len(PAIRS) == SAMPLE
    assert len({p.id for p in PAIRS}) == SAMPLE
    assert PAIRS == sample_downgrades(SAMPLE, SEED)
    assert {p.target for p in PAIRS} == set(TARGETS)
    cases = {p.case: p for p in PAIRS}
    from fixtures.corpus import default_opset, load_cases

    for pair in PAIRS:
        model = load_cases()[pair.case].model
        assert pair.target < (default_opset(model) or 0), pair.id
        assert random_reason(model) is None, pair.id
    assert len(cases) > SAMPLE // 2
    sample = [records[p.id] for p in PAIRS]
    assert not [r["id"] for r in sample if "harness_error" in r]
    # Otherwise the numeric checks below would hold vacuously.
    ran = [r for r in sample if r["streamconv"]["category"] == MATCHING]
    assert len(ran) >= 40, summarize(sample)["counts"]["streamconv"]
    assert {r["target"] for r in ran} == set(TARGETS)
    assert sum(1 for r in sample if r["onnx"]["category"] == MATCHING) >= 20


@pytest.mark.parametrize("pair_id", [p.id for p in PAIRS + GROUPNORM])
def test_streamconv_downgrade_is_right_or_refused(records: Mapping[str, Any],
                                                   pair_id: str) -> None:
    record = records[pair_id]
    assert "harness_error" not in record, record["harness_error"]
    side = record["streamconv"]
    # Wrong numbers from a converted model, the one thing that must never happen.
    assert side["category"] != MISMATCHING, _explain(record)
    # A refusal is a StreamconvError; anything else, or a dead process, is a bug.
    assert side["category"] != CRASHED, _explain(record)
    if side["status"] == "ok":
        assert side["checker"] == "ok", _explain(record)
    assert side["category"] in (MATCHING, REFUSED, ORT_UNRUNNABLE), _explain(record)
    # Where ORT cannot run it, onnx's reference evaluator still checks the numbers.
    assert not str(side.get("refeval", "")).startswith("mismatch"), _explain(record)
    if side["category"] == ORT_UNRUNNABLE and record["original"]["status"] == "ok":
        # ORT runs the original, so the conversion must load too: ORT may lack a
        # kernel for the older opset, but anything else means a broken model.
        assert side.get("ort_error", "").startswith("NOT_IMPLEMENTED"), _explain(record)


@pytest.mark.parametrize("pair", SOFTMAX, ids=[p.id for p in SOFTMAX])
def test_softmax_with_a_non_last_axis_downgrades_to_12(records: Mapping[str, Any],
                                                        pair: Pair) -> None:
    record = records[pair.id]
    assert record["streamconv"]["category"] == MATCHING, _explain(record)
    assert record["streamconv"]["matched"] == "reference", _explain(record)


@pytest.mark.parametrize("pair", LOOP_BODY + OPSET28, ids=[p.id for p in LOOP_BODY + OPSET28])
def test_steps_crossed_without_onnx_match_the_reference(records: Mapping[str, Any],
                                                        pair: Pair) -> None:
    record = records[pair.id]
    assert record["streamconv"]["category"] == MATCHING, _explain(record)
    assert record["streamconv"]["matched"] == "reference", _explain(record)


@pytest.mark.skipif(onnx.__version__ != "1.23.2", reason="measured on onnx 1.23.2's adapter")
def test_the_oracle_sees_onnx_softmax_adapter_give_wrong_numbers(
    records: Mapping[str, Any],
) -> None:
    # onnx's own result of the same pairs runs in ORT, passes the checker, and is
    # wrong: what the oracle is there to catch.
    for pair in SOFTMAX:
        side = records[pair.id]["onnx"]
        assert side["category"] == MISMATCHING, (pair.id, side)
        assert side["max_abs_diff"] > 0.5, (pair.id, side)


def test_the_conversion_layer_fixes_pairs_onnx_gets_wrong(records: Mapping[str, Any]) -> None:
    if "strict_onnx" not in inspect.signature(streamconv.convert).parameters:
        pytest.skip("streamconv.convert has no strict_onnx: only onnx's adapters so far")
    sample = [records[p.id] for p in PAIRS]
    fixed = summarize(sample)["fixed_by_streamconv"]
    assert fixed, "in the sample, no pair that onnx refuses or gets wrong is converted right"


# --------------------------------------------------------------------------- the oracle itself


def test_outputs_compare_as_onnx_backend_tests_do() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    why, diff = compare_outputs([x], [x + 1e-5], 1e-3, 1e-7)
    assert why is None and diff == pytest.approx(1e-5, rel=1e-2)
    why, diff = compare_outputs([x], [x[:, ::-1].copy()], 1e-3, 1e-7)
    assert why is not None and "max abs diff" in why and diff == pytest.approx(1.0)
    assert "dtype" in (compare_outputs([x], [x.astype(np.float64)], 1e-3, 1e-7)[0] or "")
    assert "shape" in (compare_outputs([x], [x.ravel()], 1e-3, 1e-7)[0] or "")
    assert compare_outputs([x], [x, x], 1e-3, 1e-7)[0] == "1 outputs expected, got 2"
    nan = np.array([np.nan, 1.0], np.float32)
    assert compare_outputs([nan], [nan.copy()], 1e-3, 1e-7)[0] is None
    why, diff = compare_outputs([nan], [np.array([0.0, 1.0], np.float32)], 1e-3, 1e-7)
    assert why is not None and math.isinf(diff)
    words = np.array(["a", "b"], dtype=object)
    assert compare_outputs([words], [words.copy()], 1e-3, 1e-7)[0] is None
    assert compare_outputs([words], [words[::-1].copy()], 1e-3, 1e-7)[0] is not None
    seq = [np.zeros(2, np.int64), np.ones(3, np.int64)]
    assert compare_outputs([seq], [list(seq)], 1e-3, 1e-7)[0] is None
    assert compare_outputs([seq], [seq[:1]], 1e-3, 1e-7)[0] is not None


def test_a_model_ort_cannot_run_is_never_a_pass() -> None:
    ok = {"status": "ok", "checker": "ok"}
    assert categorize({**ok, "ort": "match"}) == MATCHING
    assert categorize({**ok, "ort": "error", "ort_error": "no kernel"}) == ORT_UNRUNNABLE
    assert categorize({**ok, "ort": "crash"}) == ORT_UNRUNNABLE
    assert categorize(ok) == ORT_UNRUNNABLE
    assert categorize({**ok, "checker": "fail: x", "ort": "match"}) == CHECKER_FAILING
    assert categorize({**ok, "checker": "fail: x", "ort": "mismatch"}) == MISMATCHING
    assert categorize({"status": "error", "error": "cannot"}) == REFUSED
    assert categorize({"status": "crash", "error": "SIGABRT"}) == CRASHED
    assert categorize({"status": "skipped"}) == SKIPPED


def test_random_cases_are_skipped_with_the_reason() -> None:
    from fixtures.corpus import load_cases

    cases = load_cases()
    assert random_reason(cases["test_bernoulli"].model) == "Bernoulli draws random values"
    assert "training_mode" in (random_reason(cases["test_training_dropout"].model) or "")
    assert random_reason(cases["test_dropout_default"].model) is None
    assert random_reason(cases["test_softmax_axis_0"].model) is None
    skipped = {p.case for p in all_downgrades((7,))} - {
        p.case for p in all_downgrades((7,), include_random=False)}
    assert "test_bernoulli_expanded" in skipped and "test_abs" not in skipped


def test_refusals_are_grouped_by_their_words() -> None:
    a = ("<model>: cannot convert to opset 12: node 'ln_3' (LayerNormalization, "
         "graph.node[412]) has no equivalent below 17; this model can be converted to "
         "opsets 13..28")
    b = ("<model>: cannot convert to opset 12: node 'x' (LayerNormalization, "
         "graph.node[0]) has no equivalent below 17; this model can be converted to "
         "opsets 17..28")
    assert normalize_reason(a) == normalize_reason(b)
    assert "LayerNormalization" in normalize_reason(a)
    onnx_error = ("/onnx/version_converter/BaseConverter.h:68: adapter_lookup: Assertion "
                  "`false` failed: No Adapter To Version $17 for Pad")
    passed_on = "<model>: onnx's version converter failed on the main graph: " + onnx_error
    assert normalize_reason(onnx_error) == normalize_reason(passed_on)
    assert normalize_reason(onnx_error) == "adapter_lookup: No Adapter To Version $17 for Pad"
    assert refusal_op(onnx_error) == "Pad"
    assert refusal_op(a) == "LayerNormalization"
    assert refusal_op("adapt: No initializer or constant input to node found",
                      ["Squeeze"]) == "Squeeze*"


def test_the_second_opinion_sees_wrong_numbers_too() -> None:
    from fixtures.corpus import load_cases
    from fixtures.downgrades import _second_opinion

    case = load_cases()["test_abs"]
    wrong = onnx.ModelProto()
    wrong.CopyFrom(case.model)
    wrong.graph.node[0].op_type = "Neg"
    side: dict[str, Any] = {}
    _second_opinion(side, wrong, case, "refeval", {}, lambda name: None)
    assert side["refeval"].startswith("mismatch"), side
    side = {}
    _second_opinion(side, case.model, case, "refeval", {}, lambda name: None)
    assert side["refeval"] == "match", side
