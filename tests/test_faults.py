"""Hostile files, deep nesting, a full or read-only disk, permissions, and interruptions.

Every case ends in one of two ways: a converted model, or exactly one
``streamconv: error:`` line (``interrupted`` for signals) with a non-zero exit,
no output, no temporary folder left behind, the input untouched and nothing
outside the model's folder opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attacks  # noqa: E402
import streamconv.api  # noqa: E402
import streamconv.writer  # noqa: E402
from attacks import _wire as w  # noqa: E402
from fixtures import small_models  # noqa: E402
from streamconv import convert  # noqa: E402
from streamconv.cli import main as cli_main  # noqa: E402
from streamconv.errors import OutputError, StreamconvError  # noqa: E402
from streamconv.verify import verify_model  # noqa: E402
from tests.conftest import time_limit  # noqa: E402

#: Seconds any single conversion in this file may take before it counts as a hang.
SECONDS = 20.0


def run_cli(*argv: str, seconds: float = SECONDS) -> tuple[int, str, str]:
    """``streamconv ARGV`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with time_limit(seconds), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("streamconv: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def digest_tree(folder: Path) -> dict[str, str]:
    """Everything below *folder*: links by target, files by SHA-256 (links not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if p.is_dir() else "other"
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".streamconv-"))


@contextlib.contextmanager
def opened_paths() -> Iterator[list[str]]:
    """Record the real path of every file this process opens through os.open or open()."""
    seen: list[str] = []
    real_os_open = os.open
    real_open = open

    def note(path: Any) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            with contextlib.suppress(OSError, ValueError):
                seen.append(os.path.realpath(os.fsdecode(path)))

    def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        note(path)
        return real_os_open(path, *args, **kwargs)

    def builtin_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", os_open)
        mp.setattr("builtins.open", builtin_open)
        yield seen


# ---------------------------------------------------------------------------
# Hostile files: every script in attacks/
# ---------------------------------------------------------------------------

# Attacks that still fail, each pinned by a regression test in test_fuzz.py.
KNOWN_FAILURES: dict[str, str] = {}


def _attack_params(known: dict[str, str]) -> list[Any]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=known[name]))
        if name in known else name
        for name in attacks.names()
    ]


def _attack(name: str) -> ModuleType:
    return importlib.import_module(f"attacks.{name}")


@pytest.mark.parametrize("name", _attack_params(KNOWN_FAILURES))
def test_attack_is_refused_cleanly(name: str, tmp_path: Path) -> None:
    attack = _attack(name)
    model = attack.build(tmp_path / "attack")
    model_dir = model.parent
    before = digest_tree(tmp_path / "attack")
    dst = tmp_path / "out"
    dst.mkdir()
    with opened_paths() as seen:
        code, _, stderr = run_cli(str(model), str(dst / "out.onnx"), "--opset", "13", "-q",
                                  seconds=5 if attack.EXPECT is None else SECONDS)
    if attack.EXPECT is None:
        # converting is the correct answer (in seconds), and the result is a model
        assert code == 0 and stderr == "", stderr
        out = onnx.load(str(dst / "out.onnx"))
        onnx.checker.check_model(out)
        assert {o.domain: o.version for o in out.opset_import}[""] == 13
    else:
        assert code == 2, stderr
        line = one_error_line(stderr)
        assert attack.EXPECT in line, line
        assert len(line) < 600, f"{len(line)} characters"
        assert os.listdir(dst) == []
    assert leftovers(dst) == []
    assert digest_tree(tmp_path / "attack") == before
    outside = os.path.realpath(tmp_path / "attack")
    inside = os.path.realpath(model_dir)
    escaped = [p for p in seen if p.startswith(outside) and not p.startswith(inside)]
    assert escaped == [], f"opened outside the model's folder: {escaped}"
    assert not any(p.startswith("/dev/") for p in seen)


@pytest.mark.parametrize("name", attacks.names())
def test_attack_is_reported_by_verify(name: str, tmp_path: Path) -> None:
    attack = _attack(name)
    model = attack.build(tmp_path / "attack")
    with opened_paths() as seen:
        code, stdout, stderr = run_cli("verify", str(model))
    assert code == attack.VERIFY, (stdout, stderr)
    if code == 2:
        assert attack.EXPECT in one_error_line(stderr), stderr
    elif code == 1:
        problems = [line for line in stdout.splitlines() if line.startswith("PROBLEM")]
        assert len(problems) == 1 and attack.EXPECT in problems[0], stdout
    outside = os.path.realpath(tmp_path / "attack")
    inside = os.path.realpath(model.parent)
    assert [p for p in seen if p.startswith(outside) and not p.startswith(inside)] == []


def test_attack_scripts_run_standalone(tmp_path: Path) -> None:
    """``python -m attacks.NAME FOLDER`` writes the file and prints its path."""
    result = subprocess.run(
        [sys.executable, "-m", "attacks.dotdot_location", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    assert Path(result.stdout.strip()).is_file()


# ---------------------------------------------------------------------------
# Deep nesting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 300, 2000])
def test_deep_nesting_is_a_clear_limit_error(depth: int, tmp_path: Path) -> None:
    """Hundreds or thousands of nested Ifs: one short line, no RecursionError, no crash."""
    model = tmp_path / "deep.onnx"
    model.write_bytes(w.nested_if_model(depth, payload=4096))
    code, _, stderr = run_cli(str(model), str(tmp_path / "out.onnx"), "--opset", "13")
    line = one_error_line(stderr)
    assert code == 2 and "nested more than 100 deep" in line, line
    assert len(line) < 400
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.onnx").exists()
    code, _, stderr = run_cli("verify", str(model))
    assert code == 2 and "nested more than 100 deep" in one_error_line(stderr)


@pytest.mark.parametrize("depth", range(28, 36))
def test_nesting_around_protobufs_limit(depth: int, tmp_path: Path) -> None:
    """Where protobuf's own limit (100 messages) is met: success or one clear line.

    Up to depth 31 the model converts; from 33 on reading refuses it (depth 32
    parses in streamconv but not in onnx's converter, which then says so).
    """
    model = tmp_path / "deep.onnx"
    model.write_bytes(w.nested_if_model(depth, payload=16))
    code, stdout, stderr = run_cli("verify", str(model))
    if code == 0:
        assert "0 external tensor(s)" in stdout
    else:
        assert code == 2
        one_error_line(stderr)
    code, _, stderr = run_cli(str(model), str(tmp_path / "out.onnx"), "--opset", "13", "-q")
    if depth <= 31:
        assert code == 0, stderr
        onnx.load(str(tmp_path / "out.onnx"))
    else:
        assert code in (1, 2)
        line = one_error_line(stderr)
        assert "nested deeper than protobuf's limit" in line or "MaxDepth" in line, line
        assert not (tmp_path / "out.onnx").exists()
    assert leftovers(tmp_path) == []


def test_deep_nesting_below_the_walker_is_named(tmp_path: Path) -> None:
    """Nesting the walker never enters (small branches) still gets a nesting message."""
    model = tmp_path / "deep.onnx"
    model.write_bytes(w.nested_if_model(34, payload=16))
    code, _, stderr = run_cli(str(model), str(tmp_path / "out.onnx"), "--opset", "13")
    assert code == 2 and "nested" in one_error_line(stderr), stderr


def test_named_pipe_as_input_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    code, _, stderr = run_cli(str(fifo), str(tmp_path / "out.onnx"), "--opset", "13",
                              seconds=5)
    assert code == 2, stderr
    one_error_line(stderr)
    assert leftovers(tmp_path) == []


def test_named_pipe_is_refused_by_verify(tmp_path: Path) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    code, _, stderr = run_cli("verify", str(fifo), seconds=5)
    assert code == 2 and "not a regular file" in one_error_line(stderr)


def test_moderate_nesting_converts(tmp_path: Path) -> None:
    """Ten levels of If with payloads worth diverting at every level convert and load."""
    model = tmp_path / "nested.onnx"
    model.write_bytes(w.nested_if_model(10, payload=4096))
    code, _, stderr = run_cli(str(model), str(tmp_path / "out.onnx"), "--opset", "13", "-q",
                              "--size-threshold", "0")
    assert code == 0, stderr
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))


# ---------------------------------------------------------------------------
# The destination: out of space, read-only, missing, not writable
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An inline model (82 KB of weights in subgraphs) and one with external data."""
    folder = tmp_path_factory.mktemp("inputs")
    proto, _ = small_models.subgraph_model()
    inline = folder / "subgraph.onnx"
    onnx.save(proto, str(inline))
    external, _ = small_models.external_data_model(folder / "ext")
    return {"inline": inline, "external": external}


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs with *options* on *path*; yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    ).returncode == 0 if shutil.which("mount") else False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)


LAYOUT_ARGS = {
    "inline": ["--layout", "inline"],
    "external": ["--layout", "external"],
    "external+checksum": ["--layout", "external", "--checksum"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_ARGS))
@pytest.mark.parametrize("kind", ["inline", "external"])
@pytest.mark.parametrize("size", ["8k", "40k"])
def test_out_of_space_on_a_small_tmpfs(
    layout: str, kind: str, size: str, inputs: dict[str, Path], tmp_path: Path
) -> None:
    """A real ENOSPC: one clear line, the small file system left empty."""
    before = digest_tree(inputs[kind].parent)
    with tmpfs(tmp_path / "small", f"size={size}") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here; test_out_of_space_injected covers ENOSPC")
        out = tmp_path / "small" / "out.onnx"
        code, _, stderr = run_cli(str(inputs[kind]), str(out), "--opset", "13", "-q",
                                  "--size-threshold", "0", *LAYOUT_ARGS[layout])
        line = one_error_line(stderr)
        assert code == 2 and "No space left on device" in line, line
        assert os.listdir(tmp_path / "small") == []
    assert digest_tree(inputs[kind].parent) == before


def _enospc_after(limit: int) -> Callable[..., Any]:
    """A stand-in for os.write / copy_file_range / sendfile failing after *limit* bytes."""
    written = {"n": 0}

    def fail_if_full(n: int) -> None:
        written["n"] += n
        if written["n"] > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return fail_if_full


@pytest.mark.parametrize("early", ["", "thread", "process"], ids=["one-pass", "thread",
                                                                "process"])
@pytest.mark.parametrize("layout", sorted(LAYOUT_ARGS))
@pytest.mark.parametrize("kind", ["inline", "external"])
@pytest.mark.parametrize("limit", [0, 1000, 30000])
def test_out_of_space_injected(
    layout: str, kind: str, limit: int, early: str, inputs: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC from every write path (write, pwrite, copy_file_range, sendfile) after *limit*
    bytes, also where payloads are written while the skeleton converts."""
    if early:
        monkeypatch.setattr(streamconv.api, "EARLY_MIN", 0)
        monkeypatch.setattr(streamconv.writer, "FORK", early == "process")
        monkeypatch.setattr(streamconv.writer, "FORK_MIN", 0)
    count = _enospc_after(limit)
    real_write, real_pwrite = os.write, os.pwrite
    real_cfr, real_sendfile = os.copy_file_range, os.sendfile

    def write(fd: int, data: Any) -> int:
        count(len(data))
        return real_write(fd, data)

    def pwrite(fd: int, data: Any, offset: int) -> int:
        count(len(data))
        return real_pwrite(fd, data, offset)

    def copy_file_range(src: int, dst: int, n: int, *args: Any) -> int:
        count(n)
        return real_cfr(src, dst, n, *args)

    def sendfile(out: int, src: int, offset: Any, n: int) -> int:
        count(n)
        return real_sendfile(out, src, offset, n)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    monkeypatch.setattr(os, "sendfile", sendfile)
    dst = tmp_path / "dst"
    dst.mkdir()
    code, _, stderr = run_cli(str(inputs[kind]), str(dst / "out.onnx"), "--opset", "13", "-q",
                              "--size-threshold", "0", *LAYOUT_ARGS[layout])
    line = one_error_line(stderr)
    assert code == 2 and "No space left on device" in line, line
    assert os.listdir(dst) == []


def test_failed_conversion_keeps_an_existing_output(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output appears by rename only: a failure leaves the previous file as it was."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    monkeypatch.setattr(os, "sendfile", full)
    with pytest.raises(OutputError, match="No space left on device"):
        convert(inputs["external"], out, opset=13, layout="external", size_threshold=0)
    monkeypatch.undo()
    assert out.read_bytes() == b"previous result"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"previous data"
    assert leftovers(tmp_path) == []


def test_read_only_destination(inputs: dict[str, Path], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a read-only tmpfs here")
        code, _, stderr = run_cli(str(inputs["inline"]), str(tmp_path / "ro" / "out.onnx"),
                                  "--opset", "13")
        line = one_error_line(stderr)
        assert code == 2 and "Read-only file system" in line, line
        assert os.listdir(tmp_path / "ro") == []


@pytest.mark.parametrize(
    "dst, expect",
    [
        ("missing/out.onnx", "does not exist"),
        ("model-file/out.onnx", "does not exist"),
        ("a-folder", "is a folder"),
    ],
)
def test_unusable_destination(
    dst: str, expect: str, inputs: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "model-file").write_bytes(b"not a folder")
    (tmp_path / "a-folder").mkdir()
    before = digest_tree(tmp_path)
    code, _, stderr = run_cli(str(inputs["inline"]), str(tmp_path / dst), "--opset", "13")
    line = one_error_line(stderr)
    assert code == 2 and expect in line, line
    assert digest_tree(tmp_path) == before


def _as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run the command line in a forked child that has dropped root; exit code and stderr."""
    # Everything the child needs is imported now: after setuid it may not read the
    # interpreter's own folders (root's home, here).
    for module in ("onnx.checker", "onnx.inliner", "onnx.version_converter",
                   "streamconv.api", "streamconv.converter"):
        importlib.import_module(module)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli_main(argv)
            os.write(write_end, err.getvalue().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


@pytest.fixture
def world_readable(tmp_path: Path, inputs: dict[str, Path]) -> Iterator[Path]:
    """A folder anyone may read, holding a copy of both inputs."""
    folder = Path(tempfile.mkdtemp(prefix="streamconv-perm-"))
    folder.chmod(0o755)
    shutil.copy(inputs["inline"], folder / "model.onnx")
    shutil.copytree(inputs["external"].parent, folder / "ext")
    for p in [folder / "model.onnx", *(folder / "ext").iterdir()]:
        p.chmod(0o644)
    (folder / "ext").chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _permission_denied(argv: list[str]) -> tuple[int, str]:
    if os.geteuid() == 0:
        return _as_nobody(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        code, _, stderr = run_cli(*argv)
    return code, stderr


def test_permission_denied_destination(world_readable: Path) -> None:
    """A folder the user may not write to (checked as 'nobody' when the tests run as root)."""
    locked = world_readable / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    code, stderr = _permission_denied(
        [str(world_readable / "model.onnx"), str(locked / "out.onnx"), "--opset", "13", "-q"]
    )
    line = one_error_line(stderr)
    assert code == 2 and "Permission denied" in line, line
    assert os.listdir(locked) == []


def test_permission_denied_input(world_readable: Path) -> None:
    (world_readable / "model.onnx").chmod(0)
    out = world_readable / "out"
    out.mkdir()
    out.chmod(0o777)
    code, stderr = _permission_denied(
        [str(world_readable / "model.onnx"), str(out / "out.onnx"), "--opset", "13", "-q"]
    )
    line = one_error_line(stderr)
    assert code == 2 and "Permission denied" in line, line
    assert os.listdir(out) == []


def test_permission_denied_external_data(world_readable: Path) -> None:
    (world_readable / "ext" / "model.onnx.data").chmod(0)
    out = world_readable / "out"
    out.mkdir()
    out.chmod(0o777)
    code, stderr = _permission_denied(
        [str(world_readable / "ext" / "model.onnx"), str(out / "out.onnx"), "--opset", "13",
         "-q", "--layout", "external"]
    )
    line = one_error_line(stderr)
    assert code == 2 and "Permission denied" in line, line
    assert os.listdir(out) == []


def test_permission_denied_replacing_anothers_file(world_readable: Path) -> None:
    """In a sticky folder (like /tmp) another user's file cannot be replaced by rename."""
    if os.geteuid() != 0:
        pytest.skip("needs two users: runs as root, converting as 'nobody'")
    shared = world_readable / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "out.onnx").write_bytes(b"root's file")
    code, stderr = _as_nobody(
        [str(world_readable / "model.onnx"), str(shared / "out.onnx"), "--opset", "13", "-q"]
    )
    line = one_error_line(stderr)
    assert code == 2 and "Operation not permitted" in line, line
    assert os.listdir(shared) == ["out.onnx"]
    assert (shared / "out.onnx").read_bytes() == b"root's file"


# ---------------------------------------------------------------------------
# Interruptions
# ---------------------------------------------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("when", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("layout", ["inline", "external"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, Stop])
def test_interrupted_from_the_progress_callback(
    when: float, layout: str, error: type[BaseException], inputs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """An exception (Ctrl-C included) mid-write, in either thread, leaves nothing behind."""

    def progress(done: int, total: int) -> None:
        if done >= when * total:
            raise error()

    with pytest.raises(error):
        convert(inputs["inline"], tmp_path / "out.onnx", opset=13, layout=layout,
                size_threshold=0, progress=progress)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300 MB inline model: long enough to write that a signal lands mid-way."""
    from fixtures.bigmodel import write_big_model

    path = tmp_path_factory.mktemp("big") / "big.onnx"
    write_big_model(path, n_tensors=2, tensor_mib=150, opset=11)
    return path


def _writing(dst: Path) -> bool:
    """Whether the conversion into *dst* is past loading onnx and writing its output.

    The model file gets bytes only after conversion, and the checker's folder
    appears after it too, while the data file may fill from the start (an
    interruption then is test_signal_while_onnx_loads' business).
    """
    for temp in leftovers(dst):
        for root, dirs, files in os.walk(dst / temp):
            if any(name.startswith("check") for name in dirs + files):
                return True
            with contextlib.suppress(OSError):
                if "out.onnx" in files and os.path.getsize(Path(root, "out.onnx")):
                    return True
    return False


def _interrupt(model: Path, dst: Path, sig: int, args: list[str]) -> tuple[int | None, str]:
    """Start a conversion and signal it once it is writing its output.

    Returns the exit code and stderr, or (None, "") when the conversion ended
    before the signal could be sent.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamconv", str(model), str(dst / "out.onnx"),
         "--opset", "13", "-q", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if _writing(dst):
            proc.send_signal(sig)
            break
        time.sleep(0.0005)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        return None, ""
    return proc.returncode, stderr


@pytest.mark.parametrize("layout", ["inline", "external --checksum"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_large_conversion(
    sig: int, layout: str, big_model: Path, tmp_path: Path
) -> None:
    """SIGINT/SIGTERM mid-write: non-zero exit, one line, temporary files removed.

    A signal that arrives during the publish is held until the publish is done
    (streamconv.publish): then the output is there, complete and sound, and
    nothing else is.
    """
    from streamconv.cli import main as cli_main

    for attempt in range(5):
        dst = tmp_path / f"dst{attempt}"
        dst.mkdir()
        code, stderr = _interrupt(big_model, dst, sig, ["--layout", *layout.split()])
        if code is None:
            continue  # finished first; try again
        assert code == 128 + sig, (code, stderr)
        assert stderr.count("\n") == 1 and "interrupted by signal" in stderr, stderr
        left = sorted(os.listdir(dst))
        if left:
            expected = ["out.onnx", "out.onnx.data"] if "external" in layout else ["out.onnx"]
            assert left == expected, left
            assert cli_main(["verify", str(dst / "out.onnx"), "-q"]) == 0
            onnx.checker.check_model(str(dst / "out.onnx"), full_check=True)
        return
    pytest.fail("the conversion always finished before the signal arrived")


# Runs the command line, sending itself SIGTERM from inside the initialization of
# onnx's C++ extension (which first happens in the middle of a conversion).
_SIGNAL_DURING_IMPORT = """
import os, signal, sys
TARGET = "onnx.onnx_cpp2py_export"
fired = []

def initializing(frame):
    while frame is not None:
        if frame.f_code.co_name in ("create_module", "exec_module"):
            spec, module = frame.f_locals.get("spec"), frame.f_locals.get("module")
            if TARGET in (getattr(spec, "name", None), getattr(module, "__name__", None)):
                return True
        frame = frame.f_back
    return False

def profile(frame, event, arg):
    if not fired and event == "call" and frame.f_code.co_filename.endswith("enum.py") \\
            and initializing(frame):
        fired.append(True)
        os.kill(os.getpid(), signal.SIGTERM)

if "onnx" in sys.modules:
    sys.exit(99)
sys.setprofile(profile)
from streamconv.cli import main
code = main(sys.argv[1:])
sys.setprofile(None)
sys.exit(code if fired else 98)
"""


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_signal_while_onnx_loads(layout: str, big_model: Path, tmp_path: Path) -> None:
    """SIGTERM in the first tenths of a second (onnx still loading): a clean interruption."""
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _SIGNAL_DURING_IMPORT, str(big_model),
         str(tmp_path / "out.onnx"), "--opset", "13", "-q", "--layout", layout],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    if result.returncode in (98, 99):
        pytest.skip("could not signal during onnx's extension initialization here")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "interrupted by signal" in result.stderr and "Fatal" not in result.stderr
    assert os.listdir(tmp_path) == []


def _signal_self(sig: int = signal.SIGINT) -> None:
    os.kill(os.getpid(), sig)


def test_second_signal_during_clean_up(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C pressed again while the first one's clean-up runs (real signals, in order)."""
    real_write, real_rmtree = os.write, shutil.rmtree
    fired = []

    def write(fd: int, data: Any) -> int:
        if not fired:
            fired.append(True)
            _signal_self()  # the first Ctrl-C, mid-write
        return real_write(fd, data)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        _signal_self()  # the second, as clean-up starts
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    dst = tmp_path / "dst"
    dst.mkdir()
    try:
        code, _, stderr = run_cli(str(inputs["inline"]), str(dst / "out.onnx"), "--opset", "13",
                                  "-q", "--layout", "inline", "--size-threshold", "0")
    finally:
        monkeypatch.undo()
    assert code == 130 and "interrupted" in stderr, stderr
    assert os.listdir(dst) == []


def test_signal_right_after_the_temporary_folder_appears(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkdir = os.mkdir

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        real_mkdir(path, *args, **kwargs)
        if os.path.basename(os.fsdecode(path)).startswith(".streamconv-"):
            _signal_self()  # the folder exists; whoever made it has not returned yet

    monkeypatch.setattr(os, "mkdir", mkdir)
    dst = tmp_path / "dst"
    dst.mkdir()
    try:
        code, _, stderr = run_cli(str(inputs["inline"]), str(dst / "out.onnx"), "--opset", "13")
    finally:
        monkeypatch.undo()
    assert code == 130 and "interrupted" in stderr, stderr
    assert os.listdir(dst) == []


def test_library_errors_are_streamconv_errors(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Through the API, faults surface as StreamconvError subclasses only."""
    with pytest.raises(StreamconvError):
        convert(inputs["inline"], tmp_path / "missing" / "out.onnx", opset=13)
    with pytest.raises(StreamconvError):
        convert(tmp_path / "nothing.onnx", tmp_path / "out.onnx", opset=13)
    with pytest.raises(StreamconvError):
        verify_model(tmp_path / "nothing.onnx")
