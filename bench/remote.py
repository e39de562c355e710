"""Convert a model on object storage: streamconv's ranged reads and uploads against
a plain s3fs download + local convert + upload of the same model, in one run.

Everything runs against moto's S3 API server on 127.0.0.1 (in this process,
behind a middleware that counts what it serves; see fixtures/objectstore.py).
Each conversion is a child process, its peak RSS read from its own VmHWM.
Figures are ratios within the run: the same server, the same model, the same
load.  Usage::

    python -m bench.remote --size-mb 500 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_PEAK = (
    "import sys; from streamconv.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
    "print(hwm.split()[1]); sys.exit(rc)"
)

# the baseline: download, convert the local copy, upload; one process, as a user's script
_BASELINE = """
import json, os, sys, time
import s3fs
from streamconv.cli import main
options, src, dst, work = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
local_in, local_out = os.path.join(work, "in.onnx"), os.path.join(work, "out.onnx")
t0 = time.perf_counter()
fs.get(src, local_in)
t1 = time.perf_counter()
rc = main([local_in, local_out, "--opset", "13", "-q"])
t2 = time.perf_counter()
disk = os.path.getsize(local_in) + os.path.getsize(local_out)
fs.put(local_out, dst)
t3 = time.perf_counter()
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps({"rc": rc, "download": t1 - t0, "convert": t2 - t1, "upload": t3 - t2,
                  "disk": disk, "peak_kib": int(hwm.split()[1])}))
"""


def _run(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv[:4])}...: {result.stderr.strip()[-400:]}")
    return seconds, result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=500, help="model size (default 500)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    parser.add_argument("--moto-ranges", action="store_true",
                        help="let moto answer ranged GETs itself (it copies the whole object "
                        "for each); by default they are read from its store directly")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from fixtures.bigmodel import write_big_model
    from fixtures.objectstore import S3Server

    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        info = write_big_model(work / "m.onnx", n_tensors=4, tensor_mib=args.size_mb / 4,
                               opset=11)
        size = info.file_size
        rows: dict[str, Any] = {}
        with S3Server(direct_ranges=not args.moto_ranges) as s3:
            s3.bucket("bench")
            s3.fs.put(str(info.path), "bench/in/m.onnx")
            info.path.unlink()
            options = json.dumps(s3.options)
            runs = [
                ("streamconv s3->s3", ["s3://bench/in/m.onnx", "s3://bench/out1/m.onnx"]),
                ("streamconv s3->local", ["s3://bench/in/m.onnx", str(work / "out.onnx")]),
            ]
            for name, paths in runs:
                s3.counts.reset()
                seconds, out = _run([sys.executable, "-c", _PEAK, *paths, "--opset", "13",
                                     "-q", "--storage-options", options])
                rows[name] = {
                    "seconds": seconds, "peak_mib": int(out.split()[-1]) / 1024,
                    "fetched_over_size": s3.counts.get_bytes / size,
                    "get_requests_per_gb": s3.counts.gets / (size / 1e9),
                    "requests": dict(s3.counts.requests),
                    "local_disk_bytes": size if "local" in name else 0,
                }
                (work / "out.onnx").unlink(missing_ok=True)
            s3.counts.reset()
            scratch = work / "baseline"
            scratch.mkdir()
            seconds, out = _run([sys.executable, "-c", _BASELINE, options,
                                 "bench/in/m.onnx", "bench/out2/m.onnx", str(scratch)])
            base = json.loads(out.strip().splitlines()[-1])
            rows["s3fs get + convert + put"] = {
                "seconds": seconds, "peak_mib": base["peak_kib"] / 1024,
                "fetched_over_size": s3.counts.get_bytes / size,
                "get_requests_per_gb": s3.counts.gets / (size / 1e9),
                "requests": dict(s3.counts.requests),
                "local_disk_bytes": base["disk"],
                "parts": {k: round(base[k], 2) for k in ("download", "convert", "upload")},
            }
        load = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    baseline = rows["s3fs get + convert + put"]["seconds"]
    ranges = "moto's own" if args.moto_ranges else "read from moto's store directly"
    print(f"model: {size / 2**20:.0f} MiB inline, opset 11 -> 13; moto S3 server on "
          f"127.0.0.1 (ranged GETs: {ranges}); load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'':28} {'seconds':>8} {'vs base':>8} {'peak MiB':>9} {'fetched/size':>13} "
          f"{'GETs/GB':>8} {'local disk':>11}")
    for name, row in rows.items():
        print(f"{name:28} {row['seconds']:8.2f} {row['seconds'] / baseline:8.2f} "
              f"{row['peak_mib']:9.0f} {row['fetched_over_size']:13.4f} "
              f"{row['get_requests_per_gb']:8.1f} {row['local_disk_bytes'] / 2**20:9.0f} M")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "load": load, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
