"""The conversion layer past onnx's adapters: table, driver, schema checks, expansion.

Every converted model is checked with onnx's full checker and run in ONNX
Runtime against the original model's outputs (or the backend case's reference
outputs) on seeded inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, defs, helper, numpy_helper, version_converter

from streamconv import ConversionError, convert
from streamconv.steps import (
    ADAPTERS,
    STEPS,
    Kind,
    StepError,
    convert_down,
    find_step,
    lowest_opset,
)
from tests.models import save

RNG = np.random.default_rng(20240611)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        shape = [d.dim_value or 1 for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if dtype == np.bool_:
            feeds[v.name] = RNG.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[v.name] = RNG.integers(-5, 5, shape).astype(dtype)
        else:
            feeds[v.name] = RNG.standard_normal(shape).astype(dtype)
    return feeds


def same_numbers(original: onnx.ModelProto, converted: onnx.ModelProto, target: int,
                 rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """*converted* is valid at *target* and computes what *original* computes."""
    onnx.checker.check_model(converted, full_check=True)
    assert [o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")] == [target]
    feeds = _feeds(original)
    expected = _session(original).run(None, feeds)
    actual = _session(converted).run(None, feeds)
    for e, a in zip(expected, actual, strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def model_of(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[onnx.ValueInfoProto], opset: int,
             initializers: list[onnx.TensorProto] | None = None,
             functions: list[onnx.FunctionProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    imports = [helper.make_opsetid("", opset)]
    if functions:
        imports.append(helper.make_opsetid("local", 1))
    model = helper.make_model(graph, opset_imports=imports, functions=functions or [])
    model.ir_version = 8
    return model


def vi(name: str, elem: int = TensorProto.FLOAT, shape: list[Any] | None = None
       ) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


# -- the table -------------------------------------------------------------------------

def _schema_versions() -> set[tuple[str, int]]:
    return {(s.name, s.since_version) for s in defs.get_all_schemas_with_history()
            if s.domain in ("", "ai.onnx") and s.since_version > 1}


def test_every_op_version_of_onnx_has_a_row() -> None:
    missing = sorted(_schema_versions() - set(STEPS))
    assert missing == []


def test_rows_name_real_schemas_and_give_reasons() -> None:
    assert set(STEPS) <= _schema_versions()
    for step in STEPS.values():
        assert (step.reason and step.reason[0].islower()) or step.reason[0].isupper()


def test_every_adapter_row_has_its_adapter() -> None:
    rows = {k for k, step in STEPS.items() if step.kind is Kind.ADAPTER}
    assert sorted(rows - set(ADAPTERS)) == []


def test_every_adapter_belongs_to_an_adapter_row() -> None:
    for key in ADAPTERS:
        step = find_step(*key)
        assert step is not None and step.kind is Kind.ADAPTER, key


def test_semantic_changes_are_never_compatible() -> None:
    for key in [("Softmax", 13), ("LogSoftmax", 13), ("Hardmax", 13), ("Shape", 15),
                ("GRU", 14), ("LSTM", 14), ("RNN", 14), ("BatchNormalization", 14),
                ("Reshape", 14), ("Pad", 18), ("Split", 18)]:
        assert STEPS[key].kind is Kind.ADAPTER, key


# -- schema-checked compatible steps ---------------------------------------------------------

def _add_model(elem: int, opset: int = 14) -> onnx.ModelProto:
    return model_of([helper.make_node("Add", ["a", "b"], ["c"], name="plus"),
                     helper.make_node("Relu", ["c"], ["y"])],
                    [vi("a", elem, [2, 3]), vi("b", elem, [2, 3])], [vi("y", elem, [2, 3])],
                    opset)


def test_types_only_step_crosses_with_types_the_older_schema_allows() -> None:
    model = _add_model(TensorProto.FLOAT, 14)
    for target in (13, 12, 9, 7):
        same_numbers(model, convert_down(model, target), target)


def test_types_only_step_refuses_a_type_the_older_schema_lacks() -> None:
    model = _add_model(TensorProto.INT16, 14)
    with pytest.raises(StepError) as info:
        convert_down(model, 13)
    text = str(info.value)
    assert "node 'plus' (Add, graph.node[0]) has no equivalent below opset 14" in text
    assert "'a' is tensor(int16), which opset 13 does not allow" in text
    assert lowest_opset(model)[0] == 14


def test_steps_where_onnx_only_restricts_types_need_no_onnx_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cos 22 added bfloat16, Identity 19/21 float8 and int4, Where 16 bfloat16: onnx's
    adapters for them only refuse those types, and streamconv's schema check does
    the same without onnx's converter (4 ms a call, whatever the model)."""
    model = model_of([helper.make_node("Cos", ["x"], ["c"]),
                      helper.make_node("Identity", ["c"], ["i"]),
                      helper.make_node("Greater", ["i", "x"], ["g"]),
                      helper.make_node("Where", ["g", "i", "x"], ["y"])],
                     [vi("x", shape=[2, 3])], [vi("y", shape=[2, 3])], 22)
    assert find_step("Cos", 22).kind is Kind.COMPATIBLE
    calls = []

    def counting(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        calls.append(target)
        return version_converter.convert_version(model, target)

    monkeypatch.setattr("streamconv.steps._driver.version_converter",
                        type("Converter", (), {"convert_version": staticmethod(counting)}))
    for target in (21, 16, 13):
        same_numbers(model, convert_down(model, target), target)
    assert calls == []
    bf16 = model_of([helper.make_node("Cos", ["x"], ["y"], name="cos")],
                    [vi("x", TensorProto.BFLOAT16, [2])], [vi("y", TensorProto.BFLOAT16, [2])],
                    22)
    with pytest.raises(StepError) as info:
        convert_down(bf16, 21)
    assert "node 'cos' (Cos, graph.node[0]) has no equivalent below opset 22" in str(info.value)
    assert "'x' is tensor(bfloat16), which opset 21 does not allow" in str(info.value)


def test_defaulted_new_attribute_is_dropped() -> None:
    shape = numpy_helper.from_array(np.array([3, 2], dtype=np.int64), "shape")
    model = model_of([helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=0)],
                     [vi("x", shape=[2, 3])], [vi("y", shape=[3, 2])], 14, [shape])
    converted = convert_down(model, 13)
    assert not converted.graph.node[0].attribute
    same_numbers(model, converted, 13)


# -- onnx's adapters, and where streamconv corrects them --------------------------------------

@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("axis", [0, 1, -2])
def test_one_axis_ops_below_13_match(op: str, axis: int) -> None:
    model = model_of([helper.make_node(op, ["x"], ["y"], axis=axis)],
                     [vi("x", shape=[3, 4, 5])], [vi("y", shape=[3, 4, 5])], 13)
    for target in (12, 11):
        same_numbers(model, convert_down(model, target), target)


def test_onnx_softmax_adapter_is_wrong_and_streamconv_right() -> None:
    """onnx's 13 -> 12 adapter keeps a non-last axis (2-D coercion): wrong numbers."""
    model = model_of([helper.make_node("Softmax", ["x"], ["y"], axis=0)],
                     [vi("x", shape=[3, 4])], [vi("y", shape=[3, 4])], 13)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    reference = np.exp(x) / np.exp(x).sum(axis=0, keepdims=True)
    by_onnx = _session(version_converter.convert_version(model, 12)).run(None, {"x": x})[0]
    ours = _session(convert_down(model, 12)).run(None, {"x": x})[0]
    assert np.abs(by_onnx - reference).max() > 0.05
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_onnx_only_steps_match() -> None:
    # Squeeze/Unsqueeze/ReduceSum axes move from inputs to attributes (onnx's adapters)
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    model = model_of(
        [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
         helper.make_node("Squeeze", ["s", "axes"], ["y"])],
        [vi("x", shape=[2, 3, 4])], [vi("y", shape=[2, 4])], 18, [axes])
    for target in (17, 13, 12, 11):
        same_numbers(model, convert_down(model, target), target)


# -- graphs: subgraphs at any depth, functions --------------------------------------------------

def _if_model(opset: int) -> onnx.ModelProto:
    axes = helper.make_node("Constant", [], ["axes"],
                            value=numpy_helper.from_array(np.array([0], dtype=np.int64)))
    then = helper.make_graph(
        [axes, helper.make_node("Squeeze", ["x", "axes"], ["t1"]),
         helper.make_node("Add", ["t1", "t1"], ["t"])],
        "then", [], [vi("t", shape=[3])])
    inner_if = helper.make_node("If", ["c"], ["e"], then_branch=then, else_branch=helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["e1"], axis=0),
         helper.make_node("Squeeze", ["e1", "axes0"], ["e"])],
        "else", [], [vi("e", shape=[3])]))
    outer_else = helper.make_graph([inner_if], "outer_else", [], [vi("e", shape=[3])])
    outer_then = helper.make_graph([helper.make_node("Mul", ["z", "z"], ["m"])], "outer_then",
                                   [], [vi("m", shape=[3])])
    axes0 = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes0")
    return model_of(
        [helper.make_node("Not", ["c"], ["nc"]),
         helper.make_node("If", ["nc"], ["y"], then_branch=outer_then, else_branch=outer_else)],
        [vi("c", TensorProto.BOOL, []), vi("x", shape=[1, 3]), vi("z", shape=[3])],
        [vi("y", shape=[3])], opset, [axes0])


@pytest.mark.parametrize("condition", [True, False])
def test_nested_subgraphs_convert_through_held_control_flow(condition: bool) -> None:
    """If 14 -> 13 crosses as compatible (held); onnx's Squeeze adapter must still reach
    the nodes inside it, two levels down, and Softmax's fix applies there too."""
    model = _if_model(14)
    for target in (13, 12, 11):
        converted = convert_down(model, target)
        onnx.checker.check_model(converted, full_check=True)
        feeds = {"c": np.array(condition), "x": RNG.standard_normal((1, 3)).astype(np.float32),
                 "z": RNG.standard_normal(3).astype(np.float32)}
        np.testing.assert_allclose(_session(converted).run(None, feeds)[0],
                                   _session(model).run(None, feeds)[0], rtol=1e-5, atol=1e-6)


def test_function_bodies_convert_down(tmp_path: Path) -> None:
    fn = helper.make_function(
        "local", "addrelu", ["a", "b"], ["y"],
        [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        [helper.make_opsetid("", 14)])
    model = model_of([helper.make_node("addrelu", ["x", "x"], ["y"], domain="local")],
                     [vi("x", shape=[2, 3])], [vi("y", shape=[2, 3])], 14, functions=[fn])
    src = save(model, tmp_path / "in.onnx")
    convert(src, tmp_path / "out.onnx", opset=13)
    out = onnx.load(tmp_path / "out.onnx")
    assert out.functions[0].opset_import[0].version == 13
    same_numbers(model, out, 13)


# -- function expansion ------------------------------------------------------------------------

def _expansion_model(op: str, opset: int, shape: list[int], extra: int = 0,
                     **attrs: Any) -> onnx.ModelProto:
    inputs = [vi("x", shape=shape)]
    names = ["x"]
    inits = []
    for i in range(extra):
        inits.append(numpy_helper.from_array(
            RNG.standard_normal(shape[-1:]).astype(np.float32), f"w{i}"))
        names.append(f"w{i}")
    node = helper.make_node(op, names, ["y"], name=f"the_{op.lower()}", **attrs)
    node.metadata_props.add(key="origin", value="exporter")
    return model_of([node], inputs, [vi("y", shape=shape)], opset, inits)


@pytest.mark.parametrize(("op", "opset", "extra", "attrs", "targets"), [
    ("LayerNormalization", 17, 2, {"axis": -1}, (16, 13)),
    ("Gelu", 20, 0, {}, (19, 13)),
    ("Gelu", 20, 0, {"approximate": "tanh"}, (19,)),
    ("Mish", 18, 0, {}, (17, 13)),
    ("HardSwish", 14, 0, {}, (13, 11)),
    ("Celu", 12, 0, {"alpha": 0.7}, (11,)),
])
def test_ops_absent_below_become_their_function_body(
        op: str, opset: int, extra: int, attrs: dict[str, Any], targets: tuple[int, ...]) -> None:
    model = _expansion_model(op, opset, [2, 3, 4], extra, **attrs)
    for target in targets:
        try:
            converted = convert_down(model, target)
        except StepError as e:
            pytest.fail(f"{op} {opset} -> {target}: {e}")
        assert op not in {n.op_type for n in converted.graph.node}
        names = [n.name for n in converted.graph.node]
        assert len(names) == len(set(names))
        last = next(n for n in converted.graph.node if "y" in n.output)
        assert [(p.key, p.value) for p in last.metadata_props] == [("origin", "exporter")]
        same_numbers(model, converted, target)


def test_op_without_function_body_is_refused_with_the_range() -> None:
    model = model_of([helper.make_node("BitwiseNot", ["x"], ["y"], name="invert")],
                     [vi("x", TensorProto.INT32, [4])], [vi("y", TensorProto.INT32, [4])], 18)
    with pytest.raises(StepError, match=r"node 'invert' \(BitwiseNot, graph.node\[0\]\) has no "
                       r"equivalent below opset 18: introduced at opset 18"):
        convert_down(model, 17)
    lowest, obstacle = lowest_opset(model)
    assert lowest == 18 and obstacle is not None and obstacle.op == "BitwiseNot"


def test_strict_onnx_keeps_onnx_behaviour(tmp_path: Path) -> None:
    src = save(_add_model(TensorProto.FLOAT, 14), tmp_path / "in.onnx")
    with pytest.raises(ConversionError, match="onnx's version converter failed"):
        convert(src, tmp_path / "strict.onnx", opset=13, strict_onnx=True)
    report = convert(src, tmp_path / "out.onnx", opset=13)
    assert report.opset_to == 13


# -- reachable range ---------------------------------------------------------------------------

def test_reachable_names_both_bounds(tmp_path: Path) -> None:
    from streamconv import reachable

    src = save(_add_model(TensorProto.INT16, 14), tmp_path / "int16.onnx")
    reach = reachable(src)
    assert (reach.opset, reach.lowest, reach.highest) == (14, 14, defs.onnx_opset_version())
    assert reach.below is not None and "'a' is tensor(int16)" in reach.below
    assert reach.above is None
    src = save(_expansion_model("LayerNormalization", 17, [2, 3, 4], 2, axis=-1),
               tmp_path / "ln.onnx")
    reach = reachable(src)
    assert reach.lowest < 17 and reach.below is not None
    assert "node 'the_layernormalization' (LayerNormalization, graph.node[0]; rewritten" \
        in reach.below
    # the bound is exact: the lowest converts, one below does not
    convert(src, tmp_path / "low.onnx", opset=reach.lowest)
    with pytest.raises(ConversionError, match=f"can be converted to opsets {reach.lowest}"):
        convert(src, tmp_path / "below.onnx", opset=reach.lowest - 1)
    assert reachable(src, strict_onnx=True).lowest == 17
    report = convert(src, tmp_path / "r.onnx", opset=16, reach=True)
    assert report.reachable == [reach.lowest, reach.highest]


def test_constants_a_rewrite_stops_using_are_dropped_and_dead_ones_kept() -> None:
    """Squeeze 13 -> 12 turns the axes Constant into an attribute: the Constant goes
    (else it would be carried to 8, where an int64 Constant needs a Cast); a Constant
    the input itself left unused stays."""
    axes = helper.make_node("Constant", [], ["axes"],
                            value=numpy_helper.from_array(np.array([0], dtype=np.int64)))
    dead = helper.make_node("Constant", [], ["unused"],
                            value=numpy_helper.from_array(np.array([7], dtype=np.int64)))
    model = model_of([axes, dead, helper.make_node("Squeeze", ["x", "axes"], ["y"])],
                     [vi("x", shape=[1, 3])], [vi("y", shape=[3])], 13)
    converted = convert_down(model, 8)
    outputs = [o for n in converted.graph.node for o in n.output]
    assert "axes" not in outputs and "unused" in outputs
    same_numbers(model, converted, 8)


@pytest.mark.parametrize(("axes", "noop"), [([1], 0), ([-1, 0], 0), ([], 0), ([], 1), (None, 0),
                                            (None, 1)])
def test_reduce_axes_input_back_to_attribute(axes: list[int] | None, noop: int) -> None:
    inputs = ["x"] if axes is None else ["x", "axes"]
    inits = [] if axes is None else [numpy_helper.from_array(np.array(axes, dtype=np.int64),
                                                             "axes")]
    shape = [2, 3, 4]
    if axes:
        shape = [1 if d in {a % 3 for a in axes} else n for d, n in enumerate(shape)]
    elif not noop:
        shape = [1, 1, 1]
    model = model_of([helper.make_node("ReduceMean", inputs, ["y"], keepdims=1,
                                       noop_with_empty_axes=noop)],
                     [vi("x", shape=[2, 3, 4])], [vi("y", shape=shape)], 18, inits)
    for target in (17, 13, 11):
        converted = convert_down(model, target)
        assert not converted.graph.initializer or target >= 18
        same_numbers(model, converted, target)


def test_axes_computed_at_run_time_are_refused() -> None:
    model = model_of([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="sq")],
                     [vi("x", shape=[1, 3]), vi("axes", TensorProto.INT64, [1])],
                     [vi("y", shape=[3])], 13)
    with pytest.raises(StepError, match=r"node 'sq' \(Squeeze, graph.node\[0\]\) has no "
                       r"equivalent below opset 13: axes 'axes' is computed at run time"):
        convert_down(model, 12)


@pytest.mark.parametrize(("op", "attrs"), [
    ("Flatten", {"axis": -1}), ("Flatten", {"axis": -3}), ("Concat", {"axis": -1}),
    ("ArgMax", {"axis": -2}), ("Softmax", {"axis": -1}), ("ReduceSum", {"axes": [-1, 0]}),
])
def test_negative_axes_of_ops_onnx_adapts_at_11(op: str, attrs: dict[str, Any]) -> None:
    """onnx's 11 -> 10 adapters keep a negative axis, which opset 10 rejects."""
    inputs = ["x", "x"] if op == "Concat" else ["x"]
    node = helper.make_node(op, inputs, ["y"], **attrs)
    elem = TensorProto.INT64 if op == "ArgMax" else TensorProto.FLOAT
    probe = model_of([node], [vi("x", shape=[2, 3, 4])], [], 11)
    probe.graph.value_info.add().name = "y"
    shape = [d.dim_value for d in onnx.shape_inference.infer_shapes(probe).graph.value_info[0]
             .type.tensor_type.shape.dim]
    model = model_of([node], [vi("x", shape=[2, 3, 4])], [vi("y", elem, shape)], 11)
    for target in (10, 9):
        converted = convert_down(model, target)
        for a in converted.graph.node[0].attribute:
            if a.name in ("axis", "axes"):
                assert min([a.i] if a.name == "axis" else list(a.ints)) >= 0
        same_numbers(model, converted, target)
