"""Special files in SRC: FIFOs, sockets and devices named *.onnx, symbolic links out of SRC.

Each batch runs as a child process with a time limit, so a hang fails the test
instead of holding up the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.models import reduce_chain, save

LIMIT = 120


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """SRC with one good model, special files named *.onnx and other files to copy.

    Returns the folder and, per special model, the kind its error must name.
    """
    src = tmp_path / "src"
    src.mkdir()
    save(reduce_chain(), src / "good.onnx")
    os.mkfifo(src / "fifo.onnx")
    kinds = {"fifo.onnx": "a named pipe (FIFO)", "sock.onnx": "a socket"}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(src / "sock.onnx"))
    try:
        os.mknod(src / "dev.onnx", 0o600 | 0o020000, os.makedev(1, 3))  # like /dev/null
        kinds["dev.onnx"] = "a character device"
    except (PermissionError, OSError):
        pass  # no CAP_MKNOD here: the FIFO and the socket still make the point
    (src / "notes.txt").write_text("notes")
    (tmp_path / "secret.txt").write_text("secret outside SRC")
    os.symlink(tmp_path / "secret.txt", src / "link-out.txt")
    os.symlink("notes.txt", src / "link-in.txt")
    os.mkfifo(src / "pipe.txt")
    yield src, kinds
    sock.close()


def batch(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamconv", "batch", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=LIMIT)


def test_special_files_fail_alone_and_never_hang(tmp_path: Path,
                                                 tree: tuple[Path, dict[str, str]]) -> None:
    src, kinds = tree
    out = tmp_path / "out"
    proc = batch(str(src), str(out), "--opset", "13", "--jobs", "2", "--copy-other", "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    models = {m["source"]: m for m in result["models"]}
    assert models["good.onnx"]["status"] == "converted"
    for name, kind in kinds.items():
        assert models[name]["status"] == "failed"
        assert models[name]["error"] == f"not a regular file: {kind}", models[name]
        assert not (out / name).exists()
    others = result["other_files"]
    assert sorted(others["copied"]) == ["link-in.txt", "notes.txt"]
    failed = dict((f["path"], f["error"]) for f in others["failed"])
    assert failed == {"link-out.txt": "a symbolic link to outside SRC_DIR; not followed",
                      "pipe.txt": "not a regular file: a named pipe (FIFO)"}
    assert not (out / "link-out.txt").exists() and not (out / "pipe.txt").exists()
    assert (out / "link-in.txt").read_text() == "notes"
    assert all("secret" not in p.read_text(errors="replace")
               for p in out.rglob("*") if p.is_file() and p.suffix == ".txt")


def test_dry_run_names_special_files_without_opening_them(
    tmp_path: Path, tree: tuple[Path, dict[str, str]]
) -> None:
    src, kinds = tree
    out = tmp_path / "out"
    proc = batch(str(src), str(out), "--opset", "13", "--copy-other", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: (r["action"], r["detail"]) for r in json.loads(proc.stdout)["dry_run"]}
    assert rows["good.onnx"][0] == "convert"
    for name, kind in kinds.items():
        assert rows[name] == ("fail", f"not a regular file: {kind}")
    assert rows["link-out.txt"] == ("fail", "a symbolic link to outside SRC_DIR; not followed")
    assert rows["link-in.txt"] == ("copy-other", "")
    assert not out.exists()
