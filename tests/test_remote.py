"""Models on object storage: convert from and to s3:// and http://, against real servers.

moto's S3 API server runs on a free 127.0.0.1 port in this process, behind a
WSGI middleware that counts what it serves (fixtures/objectstore.py); s3fs is
the client, as it is for a user.  A Range-capable HTTP server serves a folder
for http://.  Nothing of s3fs or botocore is mocked.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures.bigmodel import BigModelInfo, write_big_model
from fixtures.objectstore import RangeServer, S3Server
from streamconv import convert
from streamconv.errors import ExternalDataError, OutputError, StreamconvError
from tests.conftest import ROOT
from tests.models import rand, reduce_chain

pytest.importorskip("s3fs")

#: Size of the inline model the tests move through the server.
TENSOR_MIB = 64
#: Fetched bytes may exceed the file's size by this factor at most.
FETCH_FACTOR = 1.05
#: Most bytes ``inspect`` may fetch of the 192 MiB model (its skeleton, twice: the
#: description and the reachable range each scan it).
INSPECT_FETCH = 1 << 20
#: Peak resident memory of a CLI conversion (Python, numpy, onnx and the s3 client
#: alone take about 100 MiB); the model is 3 x 64 MiB.
PEAK_MIB = 250

_PEAK = (
    "import resource, sys; from streamconv.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
    "print(hwm.split()[1]); sys.exit(rc)"
)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        server.bucket("zoo")
        server.bucket("other")
        yield server


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Iterator[dict[str, Any]]:
    """An inline model of 192 MiB in s3://zoo/big/m.onnx, and its local conversion."""
    folder = tmp_path_factory.mktemp("remote-big")
    info = write_big_model(folder / "m.onnx", n_tensors=3, tensor_mib=TENSOR_MIB, opset=11)
    s3.fs.put(str(info.path), "zoo/big/m.onnx")
    reference = folder / "ref.onnx"
    convert(info.path, reference, opset=13)
    yield {"info": info, "ref": reference, "folder": folder}
    for p in folder.iterdir():
        p.unlink()


def _options(s3: S3Server) -> str:
    return json.dumps(s3.options)


def _cli_peak(*argv: str) -> tuple[int, float, str]:
    """The CLI in a child process: exit code, its peak RSS in MiB, stderr."""
    result = subprocess.run([sys.executable, "-c", _PEAK, *argv, "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    lines = result.stdout.split()
    return result.returncode, int(lines[-1]) / 1024 if lines else -1.0, result.stderr


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True


def _run_big(path: Path, info: BigModelInfo) -> None:
    x = np.full(info.k, 0.25, dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(["Y"], {"X": x})
    np.testing.assert_allclose(y, info.expected_output(x), rtol=1e-3)


def _objects(s3: S3Server, prefix: str) -> list[str]:
    return sorted(s3.fs.find(prefix))


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Iterator[BigModelInfo]:
    """A 40 MiB model in s3://zoo/medium/m.onnx: its data object takes three parts."""
    folder = tmp_path_factory.mktemp("remote-medium")
    info = write_big_model(folder / "m.onnx", n_tensors=2, tensor_mib=20, opset=11)
    s3.fs.put(str(info.path), "zoo/medium/m.onnx")
    yield info
    for p in folder.iterdir():
        p.unlink()


# -- one model, three directions -----------------------------------------------------------


def test_s3_to_local_streams_once_with_flat_memory(s3: S3Server, big: dict[str, Any],
                                                   tmp_path: Path) -> None:
    info: BigModelInfo = big["info"]
    out = tmp_path / "out.onnx"
    s3.counts.reset()
    code, peak, err = _cli_peak("s3://zoo/big/m.onnx", str(out), "--opset", "13",
                                "--storage-options", _options(s3))
    assert code == 0, err
    assert _same_bytes(out, big["ref"])
    served = s3.counts.get_bytes
    assert info.file_size <= served <= FETCH_FACTOR * info.file_size, (served, info.file_size)
    assert peak < PEAK_MIB, peak
    _run_big(out, info)


def test_local_to_s3_identical_and_complete(s3: S3Server, big: dict[str, Any],
                                            tmp_path: Path) -> None:
    info: BigModelInfo = big["info"]
    code, peak, err = _cli_peak(str(info.path), "s3://zoo/out1/m.onnx", "--opset", "13",
                                "--storage-options", _options(s3))
    assert code == 0, err
    assert peak < PEAK_MIB, peak
    got = tmp_path / "got.onnx"
    s3.fs.get("zoo/out1/m.onnx", str(got))
    assert _same_bytes(got, big["ref"])
    assert s3.open_uploads("zoo") == []


def test_s3_to_s3_inline_and_external(s3: S3Server, big: dict[str, Any], medium: BigModelInfo,
                                      tmp_path: Path) -> None:
    info: BigModelInfo = big["info"]
    s3.counts.reset()
    report = convert("s3://zoo/big/m.onnx", "s3://zoo/out2/m.onnx", opset=13,
                     storage_options=s3.options)
    assert report.bytes_fetched == s3.counts.get_bytes
    assert report.bytes_fetched is not None
    assert report.bytes_fetched <= FETCH_FACTOR * info.file_size
    got = tmp_path / "got.onnx"
    s3.fs.get("zoo/out2/m.onnx", str(got))
    assert _same_bytes(got, big["ref"])

    # external layout: the same result as converting the local copy so
    local = tmp_path / "local" / "m.onnx"
    local.parent.mkdir()
    convert(medium.path, local, opset=13, layout="external")
    convert("s3://zoo/medium/m.onnx", "s3://zoo/out3/m.onnx", opset=13, layout="external",
            storage_options=s3.options)
    assert _objects(s3, "zoo/out3") == ["zoo/out3/m.onnx", "zoo/out3/m.onnx.data"]
    remote = tmp_path / "remote"
    s3.fs.get("zoo/out3/", str(remote), recursive=True)
    assert _same_bytes(remote / "m.onnx", local)
    assert _same_bytes(remote / "m.onnx.data", tmp_path / "local" / "m.onnx.data")
    assert s3.open_uploads("zoo") == []


# -- external data in a bucket folder -----------------------------------------------------


def _external_model(folder: Path, location: str = "weights/m.bin") -> Path:
    model = reduce_chain(11, n=64)
    path = folder / "m.onnx"
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=location,
              size_threshold=1024)
    return path


def _with_location(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


def test_external_data_model_in_a_bucket_folder(s3: S3Server, tmp_path: Path) -> None:
    src = _external_model(tmp_path / "src")
    s3.fs.put(str(tmp_path / "src") + "/", "zoo/ext/", recursive=True)
    assert "zoo/ext/weights/m.bin" in _objects(s3, "zoo/ext")
    local_ref = tmp_path / "ref" / "m.onnx"
    local_ref.parent.mkdir()
    convert(src, local_ref, opset=13, layout="external")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    convert("s3://zoo/ext/m.onnx", out, opset=13, layout="external",
            storage_options=s3.options)
    assert _same_bytes(out, local_ref)
    assert _same_bytes(out.parent / "m.onnx.data", local_ref.parent / "m.onnx.data")
    x = rand((64, 64), 5)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(
        None, {"X": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # and from bucket to bucket, the data copied into the output's own data object
    convert("s3://zoo/ext/m.onnx", "s3://other/ext/m.onnx", opset=13, layout="external",
            storage_options=s3.options)
    assert _objects(s3, "other/ext") == ["other/ext/m.onnx", "other/ext/m.onnx.data"]


@pytest.mark.parametrize("location, why", [
    ("../other/m.bin", "escapes the model's folder"),
    ("/zoo/hostile/weights/m.bin", "absolute path"),
    ("s3://other/weights/m.bin", "is a URL"),
    ("weights/../../m.bin", "escapes the model's folder"),
])
def test_hostile_locations_are_refused(s3: S3Server, tmp_path: Path, location: str,
                                       why: str) -> None:
    src = _external_model(tmp_path / "src")
    _with_location(src, location)
    s3.fs.put(str(tmp_path / "src") + "/", "zoo/hostile/", recursive=True)
    s3.fs.put(str(tmp_path / "src" / "weights" / "m.bin"), "zoo/other/m.bin")
    s3.fs.put(str(tmp_path / "src" / "weights" / "m.bin"), "other/weights/m.bin")
    with pytest.raises(ExternalDataError, match=why):
        convert("s3://zoo/hostile/m.onnx", "s3://zoo/hostile-out/m.onnx", opset=13,
                storage_options=s3.options)
    assert _objects(s3, "zoo/hostile-out") == []
    if not location.startswith("../"):
        return
    # the command line: one line, exit 2
    result = subprocess.run(
        [sys.executable, "-m", "streamconv", "s3://zoo/hostile/m.onnx", str(tmp_path / "o.onnx"),
         "--storage-options", _options(s3)], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert why in result.stderr and "s3://zoo/hostile/m.onnx" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


# -- failures leave nothing ----------------------------------------------------------------


def test_refused_upload_leaves_no_object_and_no_open_upload(s3: S3Server,
                                                            medium: BigModelInfo) -> None:
    """The server refuses the third part of the data object's upload."""
    def third_part(line: str) -> bool:
        return line.startswith("PUT /zoo/fail1/") and "partNumber=3" in line

    s3.refuse(third_part)
    try:
        with pytest.raises(StreamconvError):
            convert("s3://zoo/medium/m.onnx", "s3://zoo/fail1/m.onnx", opset=13,
                    layout="external", storage_options=s3.options)
    finally:
        s3.refuse(None)
    assert any("partNumber=2" in line and "/zoo/fail1/" in line for line in s3.counts.log)
    assert _objects(s3, "zoo/fail1") == []
    assert s3.open_uploads("zoo") == []


def test_failure_while_completing_removes_the_data_object(s3: S3Server,
                                                          medium: BigModelInfo) -> None:
    """The data object completes, then the model's upload is refused: neither remains."""
    def model_put(line: str) -> bool:
        return line.startswith(("PUT /zoo/fail2/m.onnx", "POST /zoo/fail2/m.onnx?")) and (
            ".data" not in line)

    s3.refuse(model_put)
    try:
        with pytest.raises(OutputError):
            convert("s3://zoo/medium/m.onnx", "s3://zoo/fail2/m.onnx", opset=13,
                    layout="external", storage_options=s3.options)
    finally:
        s3.refuse(None)
    assert any(line.startswith("POST /zoo/fail2/m.onnx.data?uploadId=")
               for line in s3.counts.log)  # the data object had been completed
    assert _objects(s3, "zoo/fail2") == []
    assert s3.open_uploads("zoo") == []


def test_replacing_an_output_never_pairs_a_model_with_other_data(s3: S3Server,
                                                                 medium: BigModelInfo) -> None:
    """A rerun into an external output: the old model goes before the new data lands.

    With the data object's completion refused, what remains is no model (and the
    old data untouched), never the old model over new data.
    """
    url = "s3://zoo/replace/m.onnx"
    convert("s3://zoo/medium/m.onnx", url, opset=13, layout="external",
            storage_options=s3.options)
    old_data = s3.fs.cat_file("zoo/replace/m.onnx.data")
    s3.refuse(lambda line: line.startswith("POST /zoo/replace/m.onnx.data?uploadId="))
    try:
        with pytest.raises(OutputError):
            convert("s3://zoo/medium/m.onnx", url, opset=12, layout="external",
                    storage_options=s3.options)
    finally:
        s3.refuse(None)
    assert _objects(s3, "zoo/replace") == ["zoo/replace/m.onnx.data"]
    assert s3.fs.cat_file("zoo/replace/m.onnx.data") == old_data
    assert s3.open_uploads("zoo") == []
    # reruns that succeed leave the pair; over a pair in place, the old model goes
    # first, then the data object completes, then the model
    for _ in range(2):
        s3.counts.reset()
        convert("s3://zoo/medium/m.onnx", url, opset=12, layout="external",
                storage_options=s3.options)
    assert _objects(s3, "zoo/replace") == ["zoo/replace/m.onnx", "zoo/replace/m.onnx.data"]
    log = s3.counts.log
    deleted = log.index("DELETE /zoo/replace/m.onnx")
    data_done = next(i for i, line in enumerate(log)
                     if line.startswith("POST /zoo/replace/m.onnx.data?uploadId="))
    model_done = log.index("PUT /zoo/replace/m.onnx")
    assert deleted < data_done < model_done, log
    model = onnx.load_from_string(s3.fs.cat_file("zoo/replace/m.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 12


def test_file_urls_take_the_local_path(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(reduce_chain(11), str(src))
    report = convert(f"file://{src}", f"file://{tmp_path / 'out.onnx'}", opset=13)
    assert report.bytes_fetched is None  # no fsspec on the way
    assert (tmp_path / "out.onnx").exists()


def test_ctrl_c_mid_upload_leaves_nothing(s3: S3Server, big: dict[str, Any]) -> None:
    s3.counts.reset()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamconv", "s3://zoo/big/m.onnx", "s3://zoo/intr/m.onnx",
         "--opset", "13", "-q", "--storage-options", _options(s3)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while s3.counts.parts() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it was interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1, err
    assert _objects(s3, "zoo/intr") == []
    assert s3.open_uploads("zoo") == []


# -- inspect and verify ---------------------------------------------------------------------


def test_inspect_fetches_the_skeleton_only(s3: S3Server, big: dict[str, Any],
                                           tmp_path: Path) -> None:
    from streamconv.inspection import inspect_model

    info: BigModelInfo = big["info"]
    local = inspect_model(info.path)
    s3.counts.reset()
    remote = inspect_model("s3://zoo/big/m.onnx", storage_options=s3.options)
    served = s3.counts.get_bytes
    assert served < INSPECT_FETCH, served  # of a 192 MiB file
    assert remote.reachable == local.reachable and remote.reachable is not None
    assert remote.bytes == local.bytes and remote.ops == local.ops
    # external data below the model's folder, named as in the model
    src = _external_model(tmp_path / "src")
    s3.fs.put(str(tmp_path / "src") + "/", "zoo/inspect-ext/", recursive=True)
    ext = inspect_model("s3://zoo/inspect-ext/m.onnx", storage_options=s3.options)
    assert ext.external_files == inspect_model(src).external_files == {
        "weights/m.bin": 64 * 64 * 4}
    result = subprocess.run(
        [sys.executable, "-m", "streamconv", "verify", "s3://zoo/inspect-ext/m.onnx"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "verify takes local model files only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- errors of the remote path -------------------------------------------------------------


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamconv", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_usage_errors_are_one_line(s3: S3Server, tmp_path: Path) -> None:
    cases = [
        (["s3://zoo/none.onnx", str(tmp_path / "o.onnx"), "--storage-options", _options(s3)],
         "no such object"),
        (["nosuch://zoo/m.onnx", str(tmp_path / "o.onnx")], "unknown protocol"),
        (["s3://zoo/big/m.onnx", str(tmp_path / "o.onnx"), "--storage-options", "[1]"],
         "--storage-options must be a JSON object"),
        ([str(tmp_path / "missing.onnx"), "s3://zoo/o.onnx", "--storage-options",
          _options(s3)], "no such file"),
        ([str(tmp_path / "missing.onnx"), "s3://nobucket/o.onnx", "--storage-options",
          _options(s3)], "bucket or folder 'nobucket' does not exist"),
        ([str(tmp_path / "missing.onnx"), "http://127.0.0.1:9/o.onnx"], "is read-only here"),
    ]
    for argv, text in cases:
        result = _cli(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert text in result.stderr, result.stderr


def test_missing_package_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['s3fs'] = None; from streamconv.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "s3://zoo/m.onnx",
                             str(tmp_path / "o.onnx")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "streamconv: error: s3:// needs s3fs: pip install 'streamconv[s3]'")


# -- http(s) with range requests -----------------------------------------------------------


def test_http_with_range_requests(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    folder = tmp_path / "site"
    folder.mkdir()
    info = write_big_model(folder / "m.onnx", n_tensors=2, tensor_mib=8, opset=11)
    ref = tmp_path / "ref.onnx"
    convert(info.path, ref, opset=13)
    out = tmp_path / "out.onnx"
    with RangeServer(folder) as server:
        report = convert(f"{server.url}/m.onnx", out, opset=13)
        served = server.counts.get_bytes
    assert _same_bytes(out, ref)
    assert info.file_size <= served <= FETCH_FACTOR * info.file_size
    assert report.requests is not None and report.requests < 16
    _run_big(out, info)
