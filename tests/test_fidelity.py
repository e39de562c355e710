"""Nothing the input had is lost: functions, training_info, metadata, annotations,
sparse initializers, unknown fields and external data all come through conversion."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fixtures import small_models as sm
from streamconv import convert
from streamconv.errors import ConversionError, ExternalDataError
from tests.conftest import leftovers, run, same_outputs

TARGETS = [13, 18]


def convert_and_check(src: Path, dst: Path, target: int, **kwargs: object) -> onnx.ModelProto:
    report = convert(src, dst, opset=target, **kwargs)  # type: ignore[arg-type]
    assert report.check.startswith("onnx.checker")
    onnx.checker.check_model(str(dst), full_check=True)
    model = onnx.load(str(dst))
    versions = {o.domain: o.version for o in model.opset_import}
    assert versions[""] == target
    return model


def entries(props: object) -> list[tuple[str, str]]:
    return [(p.key, p.value) for p in props]  # type: ignore[attr-defined]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["inline", "external"])
@pytest.mark.parametrize(
    "name", ["constant_node", "subgraph", "typed_fields", "squeeze_axes", "metadata", "quantized"]
)
def test_matrix_runs_like_input(tmp_path: Path, name: str, layout: str, target: int) -> None:
    model, feeds = sm.MODEL_BUILDERS[name]()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    dst = tmp_path / "out.onnx"
    convert_and_check(src, dst, target, layout=layout)
    same_outputs(src, dst, feeds)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("target", TARGETS)
def test_functions_kept_and_converted(tmp_path: Path, target: int) -> None:
    model, feeds = sm.function_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = convert_and_check(src, tmp_path / "out.onnx", target)
    assert [(f.domain, f.name) for f in out.functions] == [
        (f.domain, f.name) for f in model.functions
    ]
    fn = out.functions[0]
    assert {o.domain: o.version for o in fn.opset_import}[""] == target
    assert fn.doc_string == model.functions[0].doc_string
    # Unsqueeze/Squeeze in the body took axes as inputs at 13+
    squeeze = next(n for n in fn.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2
    # the big Constant and the attribute default came back with their values
    original_default = numpy_helper.to_array(model.functions[0].attribute_proto[0].t)
    np.testing.assert_array_equal(numpy_helper.to_array(fn.attribute_proto[0].t), original_default)
    same_outputs(src, tmp_path / "out.onnx", feeds)


def test_onnx_alone_drops_functions() -> None:
    """The failure streamconv exists to avoid: the converter's output calls a missing function."""
    from onnx import version_converter

    model, _ = sm.function_model()
    assert len(version_converter.convert_version(model, 13).functions) == 0


def test_function_with_changing_reference_needs_inlining(tmp_path: Path) -> None:
    from onnx import helper

    body = helper.make_node("Unsqueeze", ["x"], ["y"])
    ref = helper.make_attribute_ref("axes", onnx.AttributeProto.INTS)
    ref.ref_attr_name = "ax"
    body.attribute.append(ref)
    fn = helper.make_function("custom", "Expand0", ["x"], ["y"], [body],
                              [helper.make_opsetid("", 11)], attributes=["ax"])
    call = helper.make_node("Expand0", ["X"], ["Y"], domain="custom", ax=[0])
    graph = helper.make_graph(
        [call], "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 11), helper.make_opsetid("custom", 1)])
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    with pytest.raises(ConversionError, match=r"custom::Expand0.*--inline-functions"):
        convert(src, tmp_path / "out.onnx", opset=13)
    out = convert_and_check(src, tmp_path / "out.onnx", 13, inline_functions=True)
    assert [n.op_type for n in out.graph.node][-1] == "Unsqueeze"
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(run(tmp_path / "out.onnx", {"X": x})[0], x[None])


def test_inlined_function_keeps_its_attribute_defaults(tmp_path: Path) -> None:
    """A call that leaves a tensor attribute at the function's default still gets the default.

    (onnx's inliner alone drops it and leaves a Constant without a value.)
    """
    model, feeds = sm.function_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = convert_and_check(src, tmp_path / "out.onnx", 13, inline_functions=True)
    assert not out.functions
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(src, feeds)[0],
                               rtol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_training_info_kept_and_converted(tmp_path: Path, target: int) -> None:
    model, feeds = sm.training_info_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = convert_and_check(src, tmp_path / "out.onnx", target)
    assert len(out.training_info) == len(model.training_info)
    for a, b in zip(model.training_info, out.training_info, strict=True):
        assert entries(a.initialization_binding) == entries(b.initialization_binding)
        assert entries(a.update_binding) == entries(b.update_binding)
        for name in ("initialization", "algorithm"):
            ga, gb = getattr(a, name), getattr(b, name)
            assert [t.name for t in ga.initializer] == [t.name for t in gb.initializer]
            for ta, tb in zip(ga.initializer, gb.initializer, strict=True):
                np.testing.assert_array_equal(numpy_helper.to_array(ta),
                                              numpy_helper.to_array(tb))
    same_outputs(src, tmp_path / "out.onnx", feeds)


def test_metadata_everywhere(tmp_path: Path) -> None:
    model, _ = sm.metadata_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = convert_and_check(src, tmp_path / "out.onnx", 18)
    assert entries(out.metadata_props) == entries(model.metadata_props)
    assert out.doc_string == model.doc_string
    assert entries(out.graph.metadata_props) == entries(model.graph.metadata_props)
    assert out.graph.doc_string == model.graph.doc_string
    by_out = {tuple(n.output): n for n in out.graph.node}
    for node in model.graph.node:
        got = by_out[tuple(node.output)]
        assert entries(got.metadata_props) == entries(node.metadata_props)
        assert got.doc_string == node.doc_string and got.name == node.name
    by_name = {t.name: t for t in out.graph.initializer}
    for t in model.graph.initializer:
        assert by_name[t.name].doc_string == t.doc_string
        assert entries(by_name[t.name].metadata_props) == entries(t.metadata_props)
    by_vi = {v.name: v for v in out.graph.value_info}
    for v in model.graph.value_info:
        assert entries(by_vi[v.name].metadata_props) == entries(v.metadata_props)
        assert by_vi[v.name].doc_string == v.doc_string


def test_quantization_annotations(tmp_path: Path) -> None:
    model, _ = sm.quantized_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = convert_and_check(src, tmp_path / "out.onnx", 18)
    assert [a.SerializeToString() for a in out.graph.quantization_annotation] == [
        a.SerializeToString() for a in model.graph.quantization_annotation
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_sparse_initializers(tmp_path: Path, target: int) -> None:
    model, feeds = sm.sparse_initializer_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    # onnx's strict check already rejects the input (sparse MatMul operands), so
    # streamconv may only pass the same failure through, and says so
    with pytest.raises(Exception):  # noqa: B017
        onnx.checker.check_model(model, full_check=True)
    report = convert(src, tmp_path / "out.onnx", opset=target)
    assert any("already fails onnx.checker" in w for w in report.warnings)
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out)
    assert len(out.graph.sparse_initializer) == len(model.graph.sparse_initializer)
    for a, b in zip(model.graph.sparse_initializer, out.graph.sparse_initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a.values),
                                      numpy_helper.to_array(b.values))
        np.testing.assert_array_equal(numpy_helper.to_array(a.indices),
                                      numpy_helper.to_array(b.indices))
        assert list(a.dims) == list(b.dims)
    same_outputs(src, tmp_path / "out.onnx", feeds)


def test_unknown_fields_survive(tmp_path: Path) -> None:
    data, feeds = sm.unknown_field_model()
    src = tmp_path / "in.onnx"
    src.write_bytes(data)
    dst = tmp_path / "out.onnx"
    convert_and_check(src, dst, 18)

    def unknown(message: object) -> bytes:
        probe = type(message)()  # type: ignore[operator]
        probe.CopyFrom(message)
        for d in probe.DESCRIPTOR.fields:
            probe.ClearField(d.name)
        return bytes(probe.SerializeToString())

    original = onnx.load_from_string(data)
    out = onnx.load(str(dst))
    assert unknown(original) and unknown(out) == unknown(original)
    assert unknown(out.graph) == unknown(original.graph)
    by_name = {t.name: t for t in out.graph.initializer}
    for t in original.graph.initializer:
        assert unknown(by_name[t.name]) == unknown(t)
    same_outputs(src, dst, feeds)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("several", [False, True])
@pytest.mark.parametrize("layout", ["auto", "inline", "external"])
def test_external_data_inputs(tmp_path: Path, several: bool, layout: str) -> None:
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    src, feeds = sm.external_data_model(src_dir, several_files=several)
    before = _digests(src_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "model.onnx"
    report = convert(src, dst, opset=18, layout=layout)
    assert report.tensors_diverted >= 3
    assert _digests(src_dir) == before
    onnx.checker.check_model(str(dst), full_check=True)
    same_outputs(src, dst, feeds)
    if report.layout == "external":
        assert set(os.listdir(out_dir)) == {"model.onnx", "model.onnx.data"}


def test_reuse_data_references_input_files(tmp_path: Path) -> None:
    src, feeds = sm.external_data_model(tmp_path, several_files=True)
    dst = tmp_path / "model-18.onnx"
    names_before = set(os.listdir(tmp_path))
    report = convert(src, dst, opset=18, reuse_data=True)
    assert report.data_file is None  # nothing copied
    assert set(os.listdir(tmp_path)) == names_before | {"model-18.onnx"}
    assert os.path.getsize(dst) < 4096
    same_outputs(src, dst, feeds)


def test_value_read_tensor_in_external_data_is_read(tmp_path: Path) -> None:
    """onnx's own workaround (load without external data, convert) silently drops axes."""
    from onnx import version_converter

    model, feeds = sm.squeeze_axes_model()
    reference = tmp_path / "reference.onnx"
    onnx.save(model, str(reference))
    src = tmp_path / "m.onnx"
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="m.data", size_threshold=0
    )
    onnx.save(model, str(src))
    skeleton_only = onnx.load(str(src), load_external_data=False)
    wrong = version_converter.convert_version(skeleton_only, 11)
    squeeze = next(n for n in wrong.graph.node if n.op_type == "Squeeze")
    assert onnx.helper.get_attribute_value(squeeze.attribute[0]) == []  # silently wrong

    dst = tmp_path / "out11.onnx"
    convert(src, dst, opset=11)
    right = onnx.load(str(dst))
    squeeze = next(n for n in right.graph.node if n.op_type == "Squeeze")
    assert onnx.helper.get_attribute_value(squeeze.attribute[0]) != []
    same_outputs(reference, dst, feeds)


@pytest.mark.parametrize(
    "location, message",
    [
        ("/etc/passwd", "absolute path"),
        ("../outside.data", "escapes the model's folder"),
        ("missing.data", "cannot be opened"),
        ("link.data", "outside the model's folder"),
    ],
)
def test_hostile_locations(tmp_path: Path, location: str, message: str) -> None:
    model, _ = sm.constant_node_model()
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "outside.data").write_bytes(bytes(1 << 16))
    os.symlink(tmp_path / "outside.data", folder / "link.data")
    tensor = next(t for t in model.graph.node[0].attribute if t.name == "value").t
    nbytes = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value=str(nbytes))
    src = folder / "model.onnx"
    onnx.save(model, str(src))
    with pytest.raises(ExternalDataError, match=message):
        convert(src, tmp_path / "out.onnx", opset=13)
    assert not (tmp_path / "out.onnx").exists()


def test_short_sidecar(tmp_path: Path) -> None:
    src, _ = sm.external_data_model(tmp_path)
    data = tmp_path / sm.EXTERNAL_DATA_LOCATION
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    with pytest.raises(ExternalDataError, match="runs past the end"):
        convert(src, tmp_path / "out.onnx", opset=13)


def test_split_nodes_keep_unique_names(tmp_path: Path) -> None:
    """Adapters that turn one node into several must not leave two nodes with one name."""
    import collections

    src = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    dst = tmp_path / "sq13.onnx"
    convert(src, dst, opset=13)
    names = collections.Counter(n.name for n in onnx.load(str(dst)).graph.node if n.name)
    assert [n for n, k in names.items() if k > 1] == []
    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"])


def _tagged(message: object, where: str) -> None:
    """Append an unknown length-delimited field (number 999) naming *where* to *message*."""
    from fixtures.wirewriter import encode_len_field

    message.MergeFromString(encode_len_field(999, where.encode()))  # type: ignore[attr-defined]


def _unknown_of(message: object) -> bytes:
    probe = type(message)()  # type: ignore[operator]
    probe.CopyFrom(message)
    for d in probe.DESCRIPTOR.fields:
        probe.ClearField(d.name)
    return bytes(probe.SerializeToString())


def _deep_unknown_model() -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Opset 13: Transpose -> If (a Constant in each branch) -> local function Twice.

    Returns the model and, by a label, a function finding each tagged message
    in a model of the same structure.
    """
    from onnx import helper

    def branch(name: str, value: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [f"{name}_c"],
                                 value=helper.make_tensor("", 1, [1], [value]))
        add = helper.make_node("Add", ["T", f"{name}_c"], [f"{name}_y"])
        return helper.make_graph([const, add], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", 1, [2, 3])])

    nodes = [
        helper.make_node("Transpose", ["X"], ["T"], perm=[1, 0], name="transpose"),
        helper.make_node("If", ["flag"], ["I"], then_branch=branch("then", 1.0),
                         else_branch=branch("else", 2.0)),
        helper.make_node("Twice", ["I"], ["Y"], domain="local"),
    ]
    graph = helper.make_graph(
        nodes, "deep",
        [helper.make_tensor_value_info("X", 1, [3, 2]),
         helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", 1, [2, 3])],
        value_info=[helper.make_tensor_value_info("T", 1, [2, 3])],
    )
    body = [helper.make_node("Transpose", ["a"], ["b"], perm=[0, 1]),
            helper.make_node("Add", ["b", "b"], ["c"])]
    fn = helper.make_function("local", "Twice", ["a"], ["c"], body,
                              [helper.make_opsetid("", 13)])
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("local", 1)])
    helper.set_model_props(model, {"k": "v"})
    step = helper.make_graph(
        [helper.make_node("Transpose", ["T"], ["Z"], perm=[1, 0])], "step", [],
        [helper.make_tensor_value_info("Z", 1, [3, 2])],
    )
    model.training_info.add().algorithm.CopyFrom(step)

    def node(m: onnx.ModelProto, out: str) -> onnx.NodeProto:
        return next(n for n in m.graph.node if n.output[0] == out)

    def attr(n: onnx.NodeProto, name: str) -> onnx.AttributeProto:
        return next(a for a in n.attribute if a.name == name)

    def then(m: onnx.ModelProto) -> onnx.GraphProto:
        return attr(node(m, "I"), "then_branch").g

    def default(m: onnx.ModelProto) -> onnx.OperatorSetIdProto:
        return next(o for o in m.opset_import if o.domain == "")

    places: dict[str, Any] = {
        "opset_import": default,
        "metadata_props": lambda m: m.metadata_props[0],
        "graph.input": lambda m: m.graph.input[0],
        "graph.input.type": lambda m: m.graph.input[0].type,
        "graph.input.tensor_type": lambda m: m.graph.input[0].type.tensor_type,
        "graph.input.shape": lambda m: m.graph.input[0].type.tensor_type.shape,
        "graph.input.dim": lambda m: m.graph.input[0].type.tensor_type.shape.dim[1],
        "graph.output": lambda m: m.graph.output[0],
        "graph.value_info": lambda m: next(v for v in m.graph.value_info if v.name == "T"),
        "node.attribute": lambda m: attr(node(m, "T"), "perm"),
        "if.attribute": lambda m: attr(node(m, "I"), "then_branch"),
        "then.node.attribute": lambda m: then(m).node[0].attribute[0],
        "then.node.attribute.t": lambda m: then(m).node[0].attribute[0].t,
        "then.output": lambda m: then(m).output[0],
        "function": lambda m: m.functions[0],
        "function.node": lambda m: m.functions[0].node[0],
        "function.node.attribute": lambda m: m.functions[0].node[0].attribute[0],
        "function.opset_import": lambda m: m.functions[0].opset_import[0],
        "training_info": lambda m: m.training_info[0],
        "training.node": lambda m: m.training_info[0].algorithm.node[0],
        "training.node.attribute": lambda m: m.training_info[0].algorithm.node[0].attribute[0],
        "training.output": lambda m: m.training_info[0].algorithm.output[0],
    }
    for label, find in places.items():
        _tagged(find(model), label)
    return model, places


@pytest.mark.parametrize("target", [13, 18])
def test_unknown_fields_survive_at_every_level(tmp_path: Path, target: int) -> None:
    """Attributes, value_info and the messages inside them, opset imports, metadata,
    function bodies, branches: each keeps the unknown field it carried."""
    model, places = _deep_unknown_model()
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())
    dst = tmp_path / "out.onnx"
    convert(src, dst, opset=target, size_threshold=0)
    out = onnx.load(str(dst))
    assert {o.domain: o.version for o in out.opset_import}[""] == target
    lost = {label for label, find in places.items()
            if _unknown_of(find(out)) != _unknown_of(find(model))}
    assert lost == set()
    feeds = {"X": np.arange(6, dtype=np.float32).reshape(3, 2), "flag": np.array(True)}
    same_outputs(src, dst, feeds)
