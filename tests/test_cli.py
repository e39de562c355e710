"""The one command line: subcommands, the bare form, exit codes, --json, inspect.

Most commands run in this process through ``cli.main``; exit codes that need a
fault (an internal error, a signal) run ``python -m streamconv`` in a child whose
``sitecustomize`` (written by the test) injects it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import fixtures.small_models as sm
from streamconv import cli
from streamconv.cli import EXIT_CODES, SUBCOMMANDS, build_parser
from streamconv.cli import main as cli_main
from tests.conftest import ROOT, leftovers
from tests.models import reduce_chain, save

README = ROOT / "README.md"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("streamconv: error: ") and "Traceback" not in err


# -- subcommands and the bare form -----------------------------------------------------------


def test_convert_and_its_bare_form_write_the_same_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    assert run(["convert", src, str(tmp_path / "a.onnx"), "--opset", "13", "-q"], capsys)[0] == 0
    assert run([src, str(tmp_path / "b.onnx"), "--opset", "13", "-q"], capsys)[0] == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert onnx.load(str(tmp_path / "a.onnx")).opset_import[0].version == 13


def test_a_file_named_like_a_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``./batch`` is a file; ``batch`` is the subcommand."""
    monkeypatch.chdir(tmp_path)
    for name in ("batch", "verify", "inspect", "convert"):
        save(reduce_chain(), tmp_path / name)
        code, out, err = run([f"./{name}", f"{name}-out.onnx", "--opset", "13"], capsys)
        assert code == 0, err
        assert out.startswith(f"converted ./{name} (opset 11) -> {name}-out.onnx (opset 13")
    # the subcommand wants a folder: the file named batch is refused as SRC_DIR
    code, _, err = run(["batch", "batch", "out"], capsys)
    assert code == 2 and one_error_line(err) and "SRC_DIR batch is not a folder" in err


def test_no_arguments_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([], capsys)
    assert code == 2 and one_error_line(err)
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert "{convert,batch,verify,inspect}" in out.splitlines()[0]
    assert "streamconv IN OUT" in out
    for code_text, _ in EXIT_CODES:
        assert re.search(rf"^  {re.escape(code_text)}\s", out, re.M), code_text
    for command in SUBCOMMANDS:
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0 and out.startswith(f"usage: streamconv {command} ")
        assert "exit codes:" in out and "128+N" in out
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("streamconv ")


def test_quiet_and_verbose_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    for command in (["convert", src, str(tmp_path / "o.onnx")], ["inspect", src],
                    ["verify", src], ["batch", str(tmp_path), str(tmp_path / "out")]):
        code, _, err = run([*command, "-q", "-v"], capsys)
        assert code == 2 and one_error_line(err), err
        assert "not allowed with argument" in err
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "out").exists()


def test_check_is_one_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    args = [src, str(tmp_path / "o.onnx"), "--opset", "13", "--json", "-q"]
    assert json.loads(run([*args, "--no-check"], capsys)[1])["check"] == "skipped"
    report = json.loads(run([*args, "--check"], capsys)[1])
    assert report["check"].startswith("onnx.checker")
    report = json.loads(run([*args, "--check", "--no-check"], capsys)[1])  # the last one wins
    assert report["check"] == "skipped"


def test_batch_has_every_conversion_option() -> None:
    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    def options(command: str) -> set[str]:
        return {s for a in actions[command]._actions for s in a.option_strings}

    assert options("convert") - options("batch") == set()


def _relu_function_model() -> onnx.ModelProto:
    """A graph calling a model-local function whose body is a Relu."""
    fn = helper.make_function("custom", "MyRelu", ["x"], ["y"],
                              [helper.make_node("Relu", ["x"], ["y"])],
                              [helper.make_opsetid("", 11)])
    graph = helper.make_graph(
        [helper.make_node("MyRelu", ["X"], ["Y"], domain="custom")], "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [4])])
    return helper.make_model(graph, functions=[fn], ir_version=8, opset_imports=[
        helper.make_opsetid("", 11), helper.make_opsetid("custom", 1)])


def test_batch_with_checksum_data_name_and_inline_functions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    onnx.save(_relu_function_model(), str(src / "a" / "fn.onnx"))
    onnx.save(reduce_chain(n=600), str(src / "a" / "chain.onnx"))
    out = tmp_path / "out"
    code, stdout, err = run(
        ["batch", str(src), str(out), "--opset", "13", "--jobs", "1", "--layout", "external",
         "--checksum", "--data-name", "{stem}.weights", "--inline-functions",
         "--size-threshold", "0", "--json", "-q"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    by_source = {m["source"]: m for m in result["models"]}
    assert by_source["a/chain.onnx"]["data_files"] == ["chain.weights"]
    fn = onnx.load(str(out / "a" / "fn.onnx"), load_external_data=False)
    assert len(fn.functions) == 0  # inlined
    chain = onnx.load(str(out / "a" / "chain.onnx"), load_external_data=False)
    keys = [{e.key for e in t.external_data} for t in chain.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL]
    assert keys and all("checksum" in k for k in keys)
    # a fixed name would make every model of a folder share one data file
    code, _, err = run(["batch", str(src), str(tmp_path / "o2"), "--data-name", "w.data"],
                       capsys)
    assert code == 2 and one_error_line(err) and "{name} or {stem}" in err


# -- exit codes ------------------------------------------------------------------------------


def test_exit_codes_0_1_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save(reduce_chain(), tmp_path / "in.onnx")
    assert run([src, str(tmp_path / "ok.onnx"), "--opset", "13", "-q"], capsys)[0] == 0
    x = helper.make_tensor_value_info("x", onnx.TensorProto.INT32, [4])
    graph = helper.make_graph([helper.make_node("BitwiseNot", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [4])])
    refused = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                   tmp_path / "refused.onnx")
    code, _, err = run([refused, str(tmp_path / "r.onnx"), "--opset", "11"], capsys)
    assert code == 1 and one_error_line(err)
    (tmp_path / "corrupt.onnx").write_bytes(b"\x0f" * 64)
    for argv in (["convert", str(tmp_path / "corrupt.onnx"), str(tmp_path / "c.onnx")],
                 ["inspect", str(tmp_path / "corrupt.onnx")],
                 ["verify", str(tmp_path / "corrupt.onnx")],
                 [src, str(tmp_path / "o.onnx"), "--opset", "0"],
                 [src, str(tmp_path / "o.onnx"), "--layout", "sideways"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and one_error_line(err), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt.onnx", "in.onnx", "ok.onnx", "refused.onnx"]


FAULT_SITE = textwrap.dedent("""
    import os, sys, time
    import streamconv.api

    def convert(src, dst, **kwargs):
        if os.environ["FAULT"] == "bug":
            raise ZeroDivisionError("injected")
        open(os.environ["READY"], "w").close()
        time.sleep(60)

    streamconv.api.convert = convert
""")


def _faulty(tmp_path: Path, fault: str) -> subprocess.Popen[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(FAULT_SITE)
    src = save(reduce_chain(), tmp_path / "in.onnx")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "FAULT": fault,
           "READY": str(tmp_path / "ready")}
    return subprocess.Popen([sys.executable, "-m", "streamconv", src, str(tmp_path / "o.onnx")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_exit_code_3_for_an_internal_error(tmp_path: Path) -> None:
    proc = _faulty(tmp_path, "bug")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert err == "streamconv: internal error: ZeroDivisionError: injected " \
        "(run with -v for details)\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_exit_code_128_plus_signal(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _faulty(tmp_path, "sleep")
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + int(sig)
    assert one_error_line(err) and f"interrupted by signal {int(sig)}" in err


# -- --json and messages ---------------------------------------------------------------------


def test_convert_json_field_by_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save(reduce_chain(n=600), tmp_path / "in.onnx")
    dst = tmp_path / "o.onnx"
    code, out, err = run([src, str(dst), "--opset", "13", "--layout", "external", "--json"],
                         capsys)
    assert code == 0
    report = json.loads(out)  # stdout is the JSON alone; the summary went to stderr
    assert report["source"] == src and report["destination"] == str(dst)
    assert report["data_file"] == f"{dst}.data" and os.path.isfile(report["data_file"])
    assert (report["opset_from"], report["opset_to"], report["layout"]) == (11, 13, "external")
    assert report["bytes_in"] == os.path.getsize(src)
    assert report["bytes_out"] == dst.stat().st_size + os.path.getsize(report["data_file"])
    assert report["tensors_diverted"] > 0 and report["bytes_diverted"] > 0
    assert report["warnings"] == [] and report["seconds"] > 0
    assert "MiB streamed" in err and "converted" in err


def test_warnings_are_printed_unless_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [helper.make_node("Relu", ["X"], ["A"], foo=1),
             helper.make_node("AveragePool", ["A"], ["Y"], kernel_shape=[2, 2])]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 1, 7, 7])])
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]),
               tmp_path / "in.onnx")
    code, _, err = run([src, str(tmp_path / "o.onnx"), "--opset", "18"], capsys)
    assert code == 0
    assert f"streamconv: warning: {src}: the input already fails onnx.checker the same way: " \
        "Unrecognized attribute: foo for operator Relu" in err
    code, out, err = run([src, str(tmp_path / "q.onnx"), "--opset", "18", "-q"], capsys)
    assert code == 0 and out == "" and err == ""


def test_verify_json_field_by_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path, _ = sm.external_data_model(tmp_path)
    code, out, _ = run(["verify", str(model_path), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True
    (model,) = report["models"]
    assert model["model"] == str(model_path) and model["ok"] is True
    stored = onnx.load(str(model_path), load_external_data=False)
    expected = {t.name for t in stored.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert expected <= {t["name"] for t in model["tensors"]}
    for t in model["tensors"]:
        assert t["location"] == "model.onnx.data" and t["problem"] is None
        assert t["length"] > 0 and t["checksum"] == "absent"
    # a broken reference: exit 1, the problem in the JSON
    data = tmp_path / "model.onnx.data"
    os.truncate(data, data.stat().st_size // 2)
    code, out, _ = run(["verify", str(model_path), "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert any("past the end" in (t["problem"] or "") for t in report["models"][0]["tensors"])


def test_batch_json_and_dry_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save(reduce_chain(), src / "a.onnx")
    save(reduce_chain(opset=13), src / "b.onnx")
    out = tmp_path / "out"
    code, stdout, _ = run(["batch", str(src), str(out), "--opset", "13", "--dry-run", "--json"],
                          capsys)
    assert code == 0 and not out.exists()
    rows = json.loads(stdout)["dry_run"]
    assert [(r["action"], r["path"]) for r in rows] == [("convert", "a.onnx"), ("copy", "b.onnx")]
    code, stdout, err = run(["batch", str(src), str(out), "--opset", "13", "--jobs", "1",
                             "--json"], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert result["opset"] == 13 and result["counts"]["converted"] == 1
    assert result["counts"]["at_target"] == 1 and result["interrupted"] is False
    a, b = result["models"]
    assert (a["source"], a["status"], a["action"], a["opset_from"], a["opset_to"]) == (
        "a.onnx", "converted", "convert", 11, 13)
    assert (b["source"], b["status"], b["action"]) == ("b.onnx", "at_target", "copy")
    assert a["bytes_out"] == (out / "a.onnx").stat().st_size and a["error"] is None
    assert "2 models" in err  # the summary, on stderr beside the JSON


# -- inspect ---------------------------------------------------------------------------------


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code, out, err = run(["inspect", str(path), "--json", *extra], capsys)
    assert code == 0, err
    (model,) = json.loads(out)["models"]
    return model  # type: ignore[no-any-return]


def test_inspect_functions_and_subgraphs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = sm.subgraph_model()
    sub = tmp_path / "sub.onnx"
    onnx.save(model, str(sub))
    info = inspect_json(sub, capsys)
    assert info["opsets"] == {"ai.onnx": 11} and info["ir_version"] == model.ir_version
    assert info["nodes_by_place"]["graph"] == len(model.graph.node)
    assert info["nodes_by_place"]["subgraph"] > 0
    assert info["ops"]["If"] == 1 and info["ops"]["Loop"] == 1
    assert sum(info["ops"].values()) == info["nodes"]
    assert info["tensors_by_place"]["subgraph"] > 0
    assert info["bytes"]["raw_data"] + info["bytes"]["typed_fields"] \
        + info["bytes"]["structure"] == sub.stat().st_size
    assert info["reachable"]["opset"] == 11 and info["reachable"]["lowest"] <= 11

    model, _ = sm.function_model()
    fn = tmp_path / "fn.onnx"
    onnx.save(model, str(fn))
    info = inspect_json(fn, capsys)
    assert [(f["domain"], f["name"]) for f in info["functions"]] == [
        (f.domain, f.name) for f in model.functions]
    assert info["nodes_by_place"]["function"] == sum(len(f.node) for f in model.functions)
    assert info["tensors_by_place"]["function"] > 0 and info["training_info"] == 0
    assert info["reachable"]["below"]  # the function body bounds the way down
    code, out, _ = run(["inspect", str(fn)], capsys)
    assert code == 0 and "functions: 1" in out and "reachable opsets:" in out

    model, _ = sm.training_info_model()
    tr = tmp_path / "tr.onnx"
    onnx.save(model, str(tr))
    assert inspect_json(tr, capsys, "--no-reach")["training_info"] == len(model.training_info)


def test_inspect_typed_fields_and_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = sm.typed_fields_model()
    path = tmp_path / "typed.onnx"
    onnx.save(model, str(path))
    info = inspect_json(path, capsys, "--size-threshold", "0")
    assert info["tensors"]["typed_fields"] > 0
    assert info["bytes"]["raw_data"] + info["bytes"]["typed_fields"] \
        + info["bytes"]["structure"] == path.stat().st_size
    everything = info["conversion"]["tensors_diverted"]
    big_only = inspect_json(path, capsys, "--size-threshold", str(1 << 30))
    assert big_only["conversion"]["tensors_diverted"] == 0 < everything


def test_inspect_external_data_adds_up_to_the_referenced_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path, _ = sm.external_data_model(tmp_path, several_files=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    info = inspect_json(model_path, capsys)
    stored = onnx.load(str(model_path), load_external_data=False)
    referenced: dict[str, int] = {}
    count = 0
    for t in [*stored.graph.initializer,
              *(a.t for n in stored.graph.node for a in n.attribute if a.HasField("t"))]:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            keys = {e.key: e.value for e in t.external_data}
            referenced[keys["location"]] = referenced.get(keys["location"], 0) + int(
                keys["length"])
            count += 1
    assert info["external_files"] == referenced and len(referenced) > 1
    assert info["bytes"]["external"] == sum(referenced.values())
    assert info["tensors"]["external"] == count
    assert info["bytes"]["raw_data"] + info["bytes"]["typed_fields"] \
        + info["bytes"]["structure"] == model_path.stat().st_size
    assert all(t["location"] in referenced for t in info["largest"] if t["storage"] == "external")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_inspect_corrupt_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = save(reduce_chain(), tmp_path / "good.onnx")
    data = Path(good).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    code, out, err = run(["inspect", str(tmp_path / "cut.onnx")], capsys)
    assert code == 2 and out == "" and one_error_line(err)
    assert err.startswith(f"streamconv: error: {tmp_path / 'cut.onnx'}: byte ")
    # several models: the readable ones are described, the exit code says one was not
    code, out, err = run(["inspect", good, str(tmp_path / "none.onnx"), "--json"], capsys)
    assert code == 2 and one_error_line(err) and "no such file" in err
    good_info, missing = json.loads(out)["models"]
    assert good_info["source"] == good and missing["error"].endswith("no such file")
    assert leftovers(tmp_path) == []


@pytest.mark.big
def test_inspect_an_inline_model_past_2_gib(tmp_path: Path) -> None:
    """The whole command in a child process: seconds, flat memory, every byte accounted."""
    from fixtures.bigmodel import write_big_model

    info = write_big_model(tmp_path / "big.onnx", n_tensors=4, tensor_mib=560, opset=11)
    try:
        assert info.file_size > 2 << 30
        code = ("import sys; from streamconv.cli import main; rc = main(sys.argv[1:]); "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
                "print(hwm.split()[1], file=sys.stderr); sys.exit(rc)")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, "inspect", str(info.path), "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - started
        assert proc.returncode == 0, proc.stderr
        peak_mib = int(proc.stderr.strip().splitlines()[-1]) / 1024
        (model,) = json.loads(proc.stdout)["models"]
    finally:
        info.path.unlink()
    assert model["bytes"]["raw_data"] + model["bytes"]["typed_fields"] \
        + model["bytes"]["structure"] == info.file_size
    # three weights in raw_data, and the Constant 0.5 the model multiplies by
    assert 0 <= model["bytes"]["raw_data"] - 3 * info.tensor_nbytes < 64
    assert model["bytes"]["typed_fields"] == info.tensor_nbytes  # W1 as packed float_data
    assert model["bytes"]["structure"] < 4096
    assert [t["name"] for t in model["largest"][:4]] == sorted(info.tensor_names)
    assert model["conversion"]["layout_auto"] == "external"
    assert model["conversion"]["tensors_diverted"] == 4
    assert model["reachable"]["opset"] == 11 and model["reachable"]["highest"] >= 18
    assert peak_mib < 250, peak_mib  # the weights (2240 MiB) are never read
    assert seconds < 60, seconds
    print(f"inspect of a {info.file_size / 2**30:.2f} GiB model: {seconds:.2f} s, "
          f"{peak_mib:.0f} MiB peak")


# -- the README ------------------------------------------------------------------------------


def _commands_in_readme() -> list[list[str]]:
    """Every ``streamconv ...`` command line in the README's shell blocks, split."""
    text = README.read_text()
    lines: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            for prefix in ("python -m streamconv ", "streamconv "):
                if line.startswith(prefix):
                    lines.append(line[len(prefix):].split())
    return lines


def test_readme_usage_matches_help() -> None:
    """The README shows each subcommand's usage exactly as --help prints it, documents
    every option and exit code, and uses no option that does not exist."""
    text = README.read_text()
    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in SUBCOMMANDS:
        usage = actions[command].format_usage().strip()
        assert usage.removeprefix("usage: ") in text, f"README lacks:\n{usage}"
        for action in actions[command]._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
                        f"{command} {option} is not in the README"
    for code, meaning in EXIT_CODES:
        assert f"| {code} | {meaning} |" in text, code
    commands = _commands_in_readme()
    assert commands
    for argv in commands:
        command = argv[0] if argv[0] in SUBCOMMANDS else "convert"
        known = {s for a in actions[command]._actions for s in a.option_strings}
        for token in argv:
            option = token.split("=")[0]
            if option.startswith("-") and not option.startswith("-["):
                assert option.strip("[]") in known, f"{' '.join(argv)}: {option}"


def test_help_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for columns in ("40", "300"):
        monkeypatch.setenv("COLUMNS", columns)
        cli_main(["batch", "--help"])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and max(len(line) for line in outs[0].splitlines()) <= \
        cli.HELP_WIDTH


def test_units_are_binary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save(reduce_chain(n=600), tmp_path / "in.onnx")
    code, out, _ = run([src, str(tmp_path / "o.onnx"), "--opset", "13"], capsys)
    streamed = json.loads(run([src, str(tmp_path / "p.onnx"), "--opset", "13", "--json", "-q"],
                              capsys)[1])["bytes_diverted"]
    assert f"{streamed / 2**20:.1f} MiB streamed" in out and " MB" not in out
    code, out, _ = run(["inspect", src], capsys)
    assert code == 0 and not re.search(r"\d (MB|GB|kB)\b", out) and "MiB" in out
    assert np.isfinite(streamed)
