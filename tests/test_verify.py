"""verify: every external-data reference checked, one line per tensor, weights never loaded."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import external_data_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attacks import _files  # noqa: E402
from attacks import _wire as w  # noqa: E402
from fixtures import small_models  # noqa: E402
from streamconv import convert  # noqa: E402
from streamconv.cli import main as cli_main  # noqa: E402
from streamconv.errors import StreamconvError, WireFormatError  # noqa: E402
from streamconv.verify import iter_tensors, one_line, verify_model  # noqa: E402


def run(*argv: str) -> tuple[int, str, str]:
    """``streamconv verify ARGV`` through the command line: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["verify", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def converted(tmp_path: Path) -> Path:
    """A model converted with --layout external --checksum: three external tensors."""
    src, _ = small_models.external_data_model(tmp_path / "src")
    dst = tmp_path / "dst" / "model.onnx"
    dst.parent.mkdir()
    convert(src, dst, opset=13, layout="external", checksum=True, size_threshold=0)
    return dst


def data_of(model: Path) -> Path:
    return model.with_name(model.name + ".data")


# ---------------------------------------------------------------------------
# Sound models
# ---------------------------------------------------------------------------


def test_checksummed_output_verifies(converted: Path) -> None:
    report = verify_model(converted)
    assert report.ok and report.problems == []
    assert report.tensors and all(t.checksum == "ok" for t in report.tensors)
    assert report.bytes_hashed == sum(t.length or 0 for t in report.tensors)
    code, stdout, stderr = run(str(converted))
    assert code == 0 and stderr == ""
    lines = stdout.splitlines()
    assert len(lines) == len(report.tensors) + 1
    assert all(line.startswith("ok ") and "checksum ok" in line for line in lines[:-1])
    assert "all ok" in lines[-1] and f"{len(report.tensors)} external tensor(s)" in lines[-1]


def test_checksum_is_the_sha1_of_the_tensor_bytes(converted: Path) -> None:
    """What --checksum records is the SHA-1 of [offset, offset + length) of the data file."""
    data = data_of(converted).read_bytes()
    model = onnx.load(str(converted), load_external_data=False)
    for tensor, _ in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        keys = {e.key: e.value for e in tensor.external_data}
        offset, length = int(keys["offset"]), int(keys["length"])
        assert hashlib.sha1(data[offset:offset + length]).hexdigest() == keys["checksum"]


def test_without_checksums_no_data_byte_is_read(
    converted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    report = verify_model(converted, checksums=False)
    assert report.ok and all(t.checksum == "skipped" for t in report.tensors)
    assert report.bytes_hashed == 0
    assert opened == [str(converted)]


def test_inline_model_counts_inline_tensors(tmp_path: Path) -> None:
    proto, _ = small_models.subgraph_model()
    path = tmp_path / "inline.onnx"
    onnx.save(proto, str(path))
    report = verify_model(path)
    assert report.ok and report.tensors == []
    assert report.inline == sum(1 for _ in iter_tensors(proto))
    code, stdout, _ = run(str(path))
    assert code == 0 and stdout.count("\n") == 1 and "0 external tensor(s)" in stdout


@pytest.mark.parametrize("name", sorted(small_models.MODEL_BUILDERS))
def test_every_place_a_tensor_lives(name: str, tmp_path: Path) -> None:
    """Initializers, Constant attributes, subgraphs, functions, training graphs, sparse
    tensors: verify finds every tensor onnx itself stores as external data."""
    proto, _ = small_models.MODEL_BUILDERS[name]()
    path = tmp_path / "model.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0, convert_attribute=True)
    saved = onnx.load(str(path), load_external_data=False)
    expected = sum(
        1 for t in external_data_helper._get_all_tensors(saved)
        if external_data_helper.uses_external_data(t)
    )
    report = verify_model(path)
    assert report.ok, [t.describe() for t in report.problems]
    assert len(report.tensors) == expected
    assert len(report.tensors) + report.inline == sum(1 for _ in iter_tensors(saved))


def test_several_models_in_one_call(converted: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00\x01")
    code, stdout, stderr = run(str(converted), str(broken))
    assert code == 2
    assert "all ok" in stdout
    assert stderr.count("\n") == 1 and stderr.startswith("streamconv: error: ")


def test_quiet_prints_problems_and_summaries_only(converted: Path) -> None:
    code, stdout, _ = run("-q", str(converted))
    assert code == 0 and stdout.count("\n") == 1


def test_uppercase_checksum_is_accepted(tmp_path: Path) -> None:
    data = bytes(range(256)) * 16
    model = _files.external_model(tmp_path, [
        ("location", "w.bin"), ("length", "4096"),
        ("checksum", hashlib.sha1(data).hexdigest().upper()),
    ])
    (model.parent / "w.bin").write_bytes(data)
    report = verify_model(model)
    assert report.ok and report.tensors[0].checksum == "ok"


# ---------------------------------------------------------------------------
# Problems: one line each, exit 1
# ---------------------------------------------------------------------------


def _problems(model: Path) -> list[str]:
    code, stdout, stderr = run(str(model))
    assert code == 1 and stderr == "", (code, stderr)
    lines = stdout.splitlines()
    assert "with problems" in lines[-1]
    return [line for line in lines if line.startswith("PROBLEM")]


def test_corrupted_byte_is_a_checksum_mismatch(converted: Path) -> None:
    data = data_of(converted)
    blob = bytearray(data.read_bytes())
    blob[10] ^= 0xFF
    data.write_bytes(bytes(blob))
    problems = _problems(converted)
    assert len(problems) == 1 and "checksum mismatch" in problems[0]
    report = verify_model(converted)
    assert [t.checksum for t in report.problems] == ["mismatch"]
    assert sum(t.ok for t in report.tensors) == len(report.tensors) - 1


def test_truncated_data_file(converted: Path) -> None:
    data = data_of(converted)
    os.truncate(data, 100)
    problems = _problems(converted)
    assert problems and all("runs past the end" in p for p in problems)


def test_missing_data_file(converted: Path) -> None:
    data_of(converted).unlink()
    problems = _problems(converted)
    assert problems and all("cannot be opened" in p for p in problems)


@pytest.mark.parametrize(
    "entries, expect",
    [
        ([("location", "w.bin"), ("length", "16")], "need 4096 bytes"),
        ([("location", "w.bin"), ("offset", "x"), ("length", "4096")], "not a plain decimal"),
        # int() would take each of these as 0 or 4096
        ([("location", "w.bin"), ("offset", "0_0")], "offset '0_0' is not a plain decimal"),
        ([("location", "w.bin"), ("offset", " 0")], "offset ' 0' is not a plain decimal"),
        ([("location", "w.bin"), ("length", "4096\n")], "not a plain decimal"),
        ([("location", "w.bin"), ("length", "+4096")], "not a plain decimal"),
        ([("location", "w.bin"), ("length", "\u0664\u0660\u0669\u0666")], "not a plain decimal"),
        ([("location", "w.bin"), ("offset", "")], "not a plain decimal"),
        ([("location", "w.bin"), ("offset", "9" * 5000)], "has 5000 digits; at most 20"),
        ([("location", "w.bin"), ("offset", "-1")], "negative offset"),
        ([("location", "w.bin"), ("checksum", "abc")], "not a SHA-1 hex digest"),
        ([("location", "w.bin"), ("checksum", "0" * 40)], "checksum mismatch"),
        ([("length", "4096")], "without a location"),
        ([("location", "__streamconv__/1")], "reserved"),
        ([("location", "../w.bin")], "escapes the model's folder"),
        ([("location", "/etc/hostname")], "absolute path"),
    ],
)
def test_bad_reference(entries: list[tuple[str, str]], expect: str, tmp_path: Path) -> None:
    model = _files.external_model(tmp_path, entries)
    (model.parent / "w.bin").write_bytes(bytes(4096))
    (tmp_path / "w.bin").write_bytes(bytes(4096))
    problems = _problems(model)
    assert len(problems) == 1 and expect in problems[0], problems


def test_invalid_utf8_location_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    body = (w.field_varint(1, 1024) + w.field_varint(2, 1) + w.field_str(8, "W")
            + w.field_bytes(13, w.field_bytes(1, b"location") + w.field_bytes(2, b"w\xff.bin"))
            + w.field_varint(14, 1))
    model = _files.model_folder(tmp_path) / "model.onnx"
    model.write_bytes(w.simple_model(body))
    problems = _problems(model)
    assert len(problems) == 1 and "not valid UTF-8" in problems[0]


def test_a_name_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    body = w.external_tensor("W\nPROBLEM forged", [1024], [("location", "missing.bin")])
    model = _files.model_folder(tmp_path) / "model.onnx"
    model.write_bytes(w.simple_model(body))
    problems = _problems(model)
    assert len(problems) == 1 and "\\n" in problems[0]


def test_one_line_escapes_control_characters() -> None:
    assert one_line("a\nb\rc\x00d\te") == "a\\nb\\rc\\x00d\\te"
    assert one_line("plain é 中") == "plain é 中"


# ---------------------------------------------------------------------------
# Unreadable models: exit 2, one error line
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, expect",
    [
        (b"", "empty file"),
        (b"\x0a\xff\xff\xff\xff\x0f", "exceeds"),
        (w.tag(0, 0) + b"\x01", "invalid field number 0"),
    ],
)
def test_unreadable_model(content: bytes, expect: str, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    code, stdout, stderr = run(str(path))
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("streamconv: error: ")
    assert expect in stderr
    with pytest.raises(WireFormatError):
        verify_model(path)


def test_missing_model_and_folder(tmp_path: Path) -> None:
    for path in (tmp_path / "nothing.onnx", tmp_path):
        code, _, stderr = run(str(path))
        assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("streamconv: error:")
        with pytest.raises(StreamconvError):
            verify_model(path)


def test_usage_error_is_one_line() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["verify"])
    assert code == 2
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("streamconv: error:")


# ---------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _sparse_file(path: Path, size: int) -> Iterator[Path]:
    with open(path, "wb") as f:
        f.truncate(size)
    try:
        yield path
    finally:
        path.unlink()


def test_hashing_a_large_file_keeps_memory_flat(tmp_path: Path) -> None:
    """512 MiB hashed in chunks: the process grows by far less than the data."""
    size = 512 << 20
    digest = hashlib.sha1()
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        digest.update(chunk)
    model = _files.external_model(tmp_path, [
        ("location", "w.bin"), ("length", str(size)), ("checksum", digest.hexdigest()),
    ], dims=(size // 4,))
    with _sparse_file(model.parent / "w.bin", size):
        script = (
            "import sys\n"
            "from streamconv.verify import verify_model\n"
            "def hwm():\n"
            "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "    return int(line.split()[1])\n"
            "before = hwm()\n"
            "report = verify_model(sys.argv[1])\n"
            "assert report.ok and report.tensors[0].checksum == 'ok', report\n"
            "after = hwm()\n"
            "print((after - before) // 1024)\n"
        )
        result = subprocess.run([sys.executable, "-c", script, str(model)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grown_mib = int(result.stdout.strip())
    assert grown_mib < 64, f"grew by {grown_mib} MiB while hashing 512 MiB"


@pytest.mark.big
def test_inline_model_past_2_gib(tmp_path: Path) -> None:
    """A 2.2 GB inline model (protobuf cannot parse it) is read as a stream: its tensors
    are counted, and memory stays far below the file's size."""
    from fixtures.bigmodel import write_big_model

    path = tmp_path / "big.onnx"
    info = write_big_model(path, n_tensors=4, tensor_mib=560, opset=11)
    assert path.stat().st_size > 2**31
    script = (
        "import sys\n"
        "from streamconv.verify import verify_model\n"
        "report = verify_model(sys.argv[1])\n"
        "assert report.ok and report.tensors == [], report\n"
        # VmHWM is this process's own peak (ru_maxrss would count the pre-exec copy
        # of the test process, which may be large)
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(report.inline, int(hwm.split()[1]) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    inline, peak_mib = map(int, result.stdout.split())
    assert inline == len(info.tensor_names) + 1  # the weights and the Constant's value
    assert peak_mib < 400, f"peak {peak_mib} MiB for a {path.stat().st_size >> 20} MiB model"


def test_symlink_inside_the_folder_is_accepted(tmp_path: Path) -> None:
    """Only links that lead out of the model's folder are refused."""
    model = _files.external_model(tmp_path, [("location", "link.bin"), ("length", "4096")])
    (model.parent / "blobs").mkdir()
    (model.parent / "blobs" / "w.bin").write_bytes(bytes(4096))
    os.symlink("blobs/w.bin", model.parent / "link.bin")
    assert verify_model(model).ok
    convert(model, tmp_path / "out.onnx", opset=13, layout="external", check=False)
    assert verify_model(tmp_path / "out.onnx").ok


def test_a_later_entry_replaces_an_earlier_one(tmp_path: Path) -> None:
    """As in ONNX (and the converter), the last entry of a key counts: an earlier one that
    is not even UTF-8 is no problem."""
    entries = [(b"location", b"w.bin"), (b"length", b"\xff\xfe"), (b"length", b"4096")]
    body = w.field_varint(1, 1024) + w.field_varint(2, 1) + w.field_str(8, "W")
    for key, value in entries:
        body += w.field_bytes(13, w.field_bytes(1, key) + w.field_bytes(2, value))
    model = _files.model_folder(tmp_path) / "model.onnx"
    model.write_bytes(w.simple_model(body + w.field_varint(14, 1)))
    (model.parent / "w.bin").write_bytes(bytes(4096))
    assert verify_model(model).ok
    convert(model, tmp_path / "out.onnx", opset=13, check=False)
