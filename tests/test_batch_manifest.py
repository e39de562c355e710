"""Reruns that are never wrong: the manifest beside the outputs decides what is up to date.

An output is redone whenever its source, the source's data files, the target
opset or an option that changes its bytes differ from the run that wrote it, and
the report describes the files on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

import fixtures.small_models as sm
from streamconv.batch import AT_TARGET, CONVERTED, SKIPPED, BatchOptions, convert_tree
from streamconv.batch.manifest import MANIFEST
from streamconv.cli import main as cli_main
from tests.models import reduce_chain, save


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    save(reduce_chain(opset=11), root / "chain11.onnx")
    save(reduce_chain(opset=13, n=600), root / "a" / "chain13.onnx")
    sm.external_data_model(root / "ext")
    return root


def opset_on_disk(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def statuses(result: object) -> dict[str, str]:
    return {m.source: m.status for m in result.models}  # type: ignore[attr-defined]


def assert_report_matches_disk(result: object, out: Path) -> None:
    for m in result.models:  # type: ignore[attr-defined]
        path = out / m.source
        assert m.opset_to == opset_on_disk(path), m.source
        assert m.bytes_out is not None


MODELS = {"chain11.onnx", "a/chain13.onnx", "ext/model.onnx"}


def test_another_opset_redoes_every_model(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = convert_tree(src, out, BatchOptions(opset=17, jobs=2))
    assert set(statuses(first)) == MODELS and set(statuses(first).values()) == {CONVERTED}
    assert_report_matches_disk(first, out)
    # the defect this replaces: every output was newer than its source, so all were skipped
    second = convert_tree(src, out, BatchOptions(opset=13, jobs=2))
    assert statuses(second) == {"chain11.onnx": CONVERTED, "a/chain13.onnx": AT_TARGET,
                                "ext/model.onnx": CONVERTED}
    assert_report_matches_disk(second, out)
    third = convert_tree(src, out, BatchOptions(opset=13, jobs=2))
    assert set(statuses(third).values()) == {SKIPPED}
    assert_report_matches_disk(third, out)
    assert {m.source: m.opset_from for m in third.models} == {
        "chain11.onnx": 11, "a/chain13.onnx": 13, "ext/model.onnx": 11}
    assert (out / MANIFEST).is_file()


@pytest.mark.parametrize("change", [
    {"layout": "external"}, {"size_threshold": 0}, {"align": 4096}, {"check": False},
    {"checksum": True}, {"strict_onnx": True}, {"data_name": "{stem}.bin"},
    {"force_convert": True},
])
def test_a_byte_changing_option_redoes_the_models(src: Path, tmp_path: Path,
                                                  change: dict[str, object]) -> None:
    out = tmp_path / "out"
    base = {"opset": 13, "jobs": 2}
    convert_tree(src, out, BatchOptions(**base))  # type: ignore[arg-type]
    again = convert_tree(src, out, BatchOptions(**base, **change))  # type: ignore[arg-type]
    assert SKIPPED not in statuses(again).values(), statuses(again)
    assert_report_matches_disk(again, out)
    # options that do not change the bytes keep everything up to date
    quiet = {**base, **change, "jobs": 1, "fsync": False, "timeout": 600.0}
    same = convert_tree(src, out, BatchOptions(**quiet))  # type: ignore[arg-type]
    assert set(statuses(same).values()) == {SKIPPED}


def test_touched_inputs_and_outputs_redo_their_model(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_tree(src, out, BatchOptions(opset=17, jobs=2))
    data = src / "ext" / "model.onnx.data"
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, touched
    again = convert_tree(src, out, BatchOptions(opset=17, jobs=2))
    assert statuses(again) == {"chain11.onnx": SKIPPED, "a/chain13.onnx": SKIPPED,
                               "ext/model.onnx": CONVERTED}
    # an output replaced or removed behind the batch's back is redone too
    (out / "chain11.onnx").write_bytes((out / "a" / "chain13.onnx").read_bytes())
    (out / "a" / "chain13.onnx").unlink()
    again = convert_tree(src, out, BatchOptions(opset=17, jobs=2))
    assert statuses(again) == {"chain11.onnx": CONVERTED, "a/chain13.onnx": CONVERTED,
                               "ext/model.onnx": SKIPPED}
    assert_report_matches_disk(again, out)
    # a source replaced by one of another opset: redone, the report follows the new file
    save(reduce_chain(opset=17), src / "chain11.onnx")
    again = convert_tree(src, out, BatchOptions(opset=17, jobs=2))
    assert statuses(again)["chain11.onnx"] == AT_TARGET
    assert_report_matches_disk(again, out)


def test_force_and_a_damaged_manifest(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_tree(src, out, BatchOptions(opset=13, jobs=2))
    forced = convert_tree(src, out, BatchOptions(opset=13, jobs=2, force=True))
    assert SKIPPED not in statuses(forced).values()
    (out / MANIFEST).write_text("{not json")
    redone = convert_tree(src, out, BatchOptions(opset=13, jobs=2))
    assert SKIPPED not in statuses(redone).values()
    assert json.loads((out / MANIFEST).read_text())["format"] == 1
    assert set(statuses(convert_tree(src, out, BatchOptions(opset=13, jobs=2))).values()) == {
        SKIPPED}


def test_rerun_from_the_command_line_and_dry_run(src: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli_main(["batch", str(src), str(out), "--opset", "17", "-q"]) == 0
    capsys.readouterr()
    assert cli_main(["batch", str(src), str(out), "--opset", "13", "--dry-run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["dry_run"]
    assert {r["action"] for r in rows} == {"convert", "copy"}
    assert cli_main(["batch", str(src), str(out), "--opset", "17", "--dry-run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["dry_run"]
    assert {(r["action"], r["detail"]) for r in rows} == {("skip", "up to date")}
