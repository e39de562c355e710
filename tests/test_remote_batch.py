"""Batch on object storage: ``batch s3://.../zoo s3://.../out`` on the local pool and Dask.

Against moto's S3 API server on 127.0.0.1 (fixtures/objectstore.py); the
workers read and write the bucket themselves, with no shared folder.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from fixtures.bigmodel import write_big_model
from fixtures.objectstore import S3Server
from streamconv import convert
from tests.conftest import ROOT
from tests.models import reduce_chain

pytest.importorskip("s3fs")

MODELS = ["a.onnx", "sub/ext.onnx", "sub/at13.onnx"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Path]]:
    """A small zoo in s3://zoo/in/: an inline model, one with external data, one at 13."""
    root = tmp_path_factory.mktemp("remote-zoo")
    src = root / "zoo"
    (src / "sub").mkdir(parents=True)
    write_big_model(src / "a.onnx", n_tensors=2, tensor_mib=4, opset=11)
    onnx.save(reduce_chain(11, n=64), str(src / "sub" / "ext.onnx"), save_as_external_data=True,
              location="ext.bin", size_threshold=1024)
    onnx.save(reduce_chain(13, n=8), str(src / "sub" / "at13.onnx"))
    with S3Server() as s3:
        s3.bucket("zoo")
        s3.fs.put(str(src) + "/", "zoo/in/", recursive=True)
        yield s3, src


def _batch(s3: S3Server, src: str, dst: str, *extra: str) -> dict[str, dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "streamconv", "batch", src, dst, "--opset", "13", "--json",
         "-q", "--storage-options", json.dumps(s3.options), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return {m["source"]: m for m in report["models"]}


def _check_outputs(s3: S3Server, src: Path, prefix: str, tmp: Path) -> None:
    """Each output is the bytes a single local conversion (or copy) gives."""
    got = tmp / "got"
    s3.fs.get(f"{prefix}/", str(got), recursive=True)
    ref = tmp / "ref"
    (ref / "sub").mkdir(parents=True)
    convert(src / "a.onnx", ref / "a.onnx", opset=13)
    convert(src / "sub" / "ext.onnx", ref / "sub" / "ext.onnx", opset=13, layout="external")
    for rel in ("a.onnx", "sub/ext.onnx", "sub/ext.onnx.data"):
        assert (got / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert (got / "sub" / "at13.onnx").read_bytes() == (src / "sub" / "at13.onnx").read_bytes()
    onnx.checker.check_model(str(got / "sub" / "ext.onnx"), full_check=True)


@pytest.mark.parametrize("scheduler", [None, "local"])
def test_batch_bucket_to_bucket_and_rerun(zoo: tuple[S3Server, Path], tmp_path: Path,
                                          scheduler: str | None) -> None:
    s3, src = zoo
    out = f"zoo/out-{scheduler or 'pool'}"
    extra = ["--jobs", "2"] + (["--scheduler", scheduler] if scheduler else [])
    first = _batch(s3, "s3://zoo/in", f"s3://{out}", *extra)
    assert {k: v["status"] for k, v in first.items()} == {
        "a.onnx": "converted", "sub/ext.onnx": "converted", "sub/at13.onnx": "at_target"}
    _check_outputs(s3, src, out, tmp_path)
    assert f"{out}/.streamconv.batch.json" in s3.fs.find(out)
    assert s3.open_uploads("zoo") == []
    again = _batch(s3, "s3://zoo/in", f"s3://{out}", *extra)
    assert {v["status"] for v in again.values()} == {"skipped"}, again


def test_changed_source_and_removed_output_are_redone(zoo: tuple[S3Server, Path],
                                                     tmp_path: Path) -> None:
    s3, src = zoo
    _batch(s3, "s3://zoo/in", "s3://zoo/out-change")
    s3.fs.rm_file("zoo/out-change/sub/ext.onnx.data")
    onnx.save(reduce_chain(11, n=16), str(tmp_path / "a.onnx"))
    s3.fs.put(str(tmp_path / "a.onnx"), "zoo/in2/a.onnx")
    s3.fs.put(str(src / "a.onnx"), "zoo/in2/b.onnx")
    _batch(s3, "s3://zoo/in2", "s3://zoo/out-in2")
    s3.fs.put(str(src / "a.onnx"), "zoo/in2/a.onnx")  # a new version of a.onnx
    again = _batch(s3, "s3://zoo/in2", "s3://zoo/out-in2")
    assert {k: v["status"] for k, v in again.items()} == {"a.onnx": "converted",
                                                          "b.onnx": "skipped"}
    rerun = _batch(s3, "s3://zoo/in", "s3://zoo/out-change")
    assert rerun["sub/ext.onnx"]["status"] == "converted"  # its data object was gone
    assert rerun["a.onnx"]["status"] == "skipped"


def test_bucket_to_local_folder(zoo: tuple[S3Server, Path], tmp_path: Path) -> None:
    s3, src = zoo
    out = tmp_path / "out"
    first = _batch(s3, "s3://zoo/in", str(out))
    assert first["a.onnx"]["status"] == "converted"
    ref = tmp_path / "ref.onnx"
    convert(src / "a.onnx", ref, opset=13)
    assert (out / "a.onnx").read_bytes() == ref.read_bytes()
    again = _batch(s3, "s3://zoo/in", str(out))
    assert {v["status"] for v in again.values()} == {"skipped"}


def test_options_that_need_local_folders_are_refused(zoo: tuple[S3Server, Path]) -> None:
    s3, _ = zoo
    result = subprocess.run(
        [sys.executable, "-m", "streamconv", "batch", "s3://zoo/in", "s3://zoo/o", "--copy-other",
         "--storage-options", json.dumps(s3.options)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "streamconv: error: --copy-other needs local SRC_DIR and DST_DIR")


def test_ctrl_c_mid_batch_leaves_no_upload_open(zoo: tuple[S3Server, Path],
                                                tmp_path: Path) -> None:
    """The workers are killed on Ctrl-C; the batch aborts the uploads they had open."""
    s3, _ = zoo
    write_big_model(tmp_path / "big.onnx", n_tensors=2, tensor_mib=48, opset=11)
    s3.fs.put(str(tmp_path / "big.onnx"), "zoo/inbig/big.onnx")
    s3.counts.reset()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamconv", "batch", "s3://zoo/inbig", "s3://zoo/outbig",
         "--opset", "13", "-q", "--layout", "external",
         "--storage-options", json.dumps(s3.options)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120

    def parts() -> int:
        with s3.counts.lock:
            return sum(1 for line in s3.counts.log
                       if line.startswith("PUT /zoo/outbig/") and "partNumber=" in line)

    while parts() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the batch ended before it was interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert s3.open_uploads("zoo") == []
    assert [k for k in s3.fs.find("zoo/outbig") if k.endswith((".onnx", ".data"))] == []


def test_versioned_bucket_rerun_converts_nothing(zoo: tuple[S3Server, Path]) -> None:
    """With versioning on, objects carry a VersionId: the identity still matches on rerun."""
    s3, src = zoo
    s3.bucket("versioned")
    s3.client().put_bucket_versioning(Bucket="versioned",
                                      VersioningConfiguration={"Status": "Enabled"})
    s3.fs.put(str(src / "a.onnx"), "versioned/in/a.onnx")
    first = _batch(s3, "s3://versioned/in", "s3://versioned/out")
    assert first["a.onnx"]["status"] == "converted"
    again = _batch(s3, "s3://versioned/in", "s3://versioned/out")
    assert again["a.onnx"]["status"] == "skipped"
    s3.fs.put(str(src / "sub" / "at13.onnx"), "versioned/in/a.onnx")  # a new version
    third = _batch(s3, "s3://versioned/in", "s3://versioned/out")
    assert third["a.onnx"]["status"] == "at_target"
