"""How fast a student can read cached logits, on one CPU core.

Builds small archives of a 1,000-class teacher with `kdpipe cache-teacher` (synthetic
data, the built-in MLP at 16 px: the teacher's weights do not matter for read speed),
then reads every epoch in training order, `ArchiveReader.read` over consecutive
batches of positions, as a cached student does. Each pass opens a fresh reader, so
the time includes opening the manifest, verifying every object's sha256 and decoding
the logits to float32. The reading process is pinned to one core (torch, blosc and
zarr's threads included); the S3 server (moto) runs in its own process on the other
cores where there are any, so only the client's work is counted.

Cases, side by side in one run:

    zarr dense-fp16, local disk
    webdataset dense-fp16, local disk
    zarr topk:10, local disk
    zarr dense-fp16 on S3 (moto on 127.0.0.1)
    the same with --local-cache, cold (the pass that fills it) and warm

    python benchmarks/read_speed.py            # about a minute on two cores
    python benchmarks/read_speed.py --quick    # a few seconds, for CI
    python benchmarks/read_speed.py --json     # machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_VIEWS_PER_SEC = 100_000  # zarr dense-fp16 from local disk, one core
CLASSES = 1000
SIZE = 16
BUCKET = "kdpipe-bench"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_archive(out: Path, codec: str, fmt: str, args: argparse.Namespace) -> dict:
    """One archive through the CLI, exactly as a user makes it; returns its summary line."""
    command = [
        sys.executable, "-m", "cli", "cache-teacher", "--data", f"synthetic:{args.samples}:{CLASSES}:{SIZE}",
        "--teacher", "kdpipe:mlp", "--size", str(SIZE), "--epochs", str(args.epochs),
        "--views-per-sample", str(args.views_per_sample), "--codec", codec, "--format", fmt,
        "--out", str(out), "--workers", "0", "--overwrite",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"cache-teacher failed:\n{' '.join(command)}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_s3_server(cpus: set[int]) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a child process pinned to `cpus`; returns it and its endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import os, sys, threading\n"
        f"os.sched_setaffinity(0, {sorted(cpus)!r})\n"
        "from moto.server import ThreadedMotoServer\n"
        f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
        "sys.stdin.read()  # serve until the parent closes our stdin\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the moto S3 server did not start (pip install 'kdpipe[test]')")
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def upload(local: Path, endpoint: str, key: str) -> tuple[str, dict]:
    """Copy a local archive into the S3 server; returns its URL and storage options."""
    import s3fs

    options = {"endpoint_url": endpoint, "key": "x", "secret": "y"}
    fs = s3fs.S3FileSystem(**options)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{BUCKET}/{key}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return f"s3://{BUCKET}/{key}", options


def pin_to_one_core() -> int:
    """Run everything in this process on one core: torch, blosc and zarr's threads."""
    import numcodecs.blosc
    import torch

    cpu = min(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    os.sched_setaffinity(0, {cpu})
    return cpu


def read_pass(open_reader, batch: int) -> tuple[int, float]:
    """Views read and seconds taken by one pass over every epoch, in training order."""
    started = time.perf_counter()
    reader = open_reader()
    views = 0
    for epoch in range(reader.epochs):
        for start in range(0, reader.num_samples, batch):
            logits, _, _ = reader.read(epoch, start, min(start + batch, reader.num_samples))
            views += logits.shape[0] * logits.shape[1]
    return views, time.perf_counter() - started


def measure(name: str, open_reader, batch: int, passes: int, warm_up: bool = True) -> dict:
    """Best of `passes` timed passes, after one untimed pass that pays for this
    process's first use of the code path (lazy imports, zarr's event loop)."""
    if warm_up:
        read_pass(open_reader, batch)
    runs = [read_pass(open_reader, batch) for _ in range(passes)]
    views = runs[0][0]
    seconds = [s for _, s in runs]
    return {"case": name, "views": views, "passes": passes, "best_seconds": min(seconds),
            "views_per_sec": views / min(seconds), "views_per_sec_each": [views / s for s in seconds]}


def same_logits(a, b) -> bool:
    """Whether two readers decode identical logits (first and last batch of each epoch)."""
    import numpy as np

    for epoch in range(a.epochs):
        for start in (0, max(a.num_samples - 256, 0)):
            stop = min(start + 256, a.num_samples)
            if not np.array_equal(a.read(epoch, start, stop)[0], b.read(epoch, start, stop)[0]):
                return False
    return True


class TimeSplit:
    """Where a pass spends its time, by wrapping the reader's stages while it runs:
    sha256 checks, storage reads, the backend turning verified bytes into arrays
    (decompression, zarr or tar parsing) and the codec turning stored fields into float32
    logits. What is left is slicing, concatenation and bookkeeping."""

    def __init__(self):
        self.seconds = {"sha256": 0.0, "storage read": 0.0, "backend decode": 0.0, "codec decode": 0.0}

    def _timed(self, part: str, function, exclude: tuple[str, ...] = ()):
        def wrapper(*args, **kwargs):
            before = sum(self.seconds[p] for p in exclude)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                inner = sum(self.seconds[p] for p in exclude) - before
                self.seconds[part] += time.perf_counter() - started - inner
        return wrapper

    def run(self, open_reader, batch: int) -> dict:
        import hashlib

        from pipeline.store import Location

        reader = open_reader()  # a first reader, to learn the backend and codec classes
        backend, codec = type(reader.backend), type(reader.codec)
        patches = [(hashlib, "sha256", self._timed("sha256", hashlib.sha256)),
                   (Location, "read", self._timed("storage read", Location.read)),
                   (backend, "decode", self._timed("backend decode", backend.decode, ("sha256", "storage read"))),
                   (codec, "decode", self._timed("codec decode", codec.decode))]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, function in patches:
                setattr(owner, name, function)
            _, total = read_pass(open_reader, batch)
        finally:
            for owner, name, function in saved:
                setattr(owner, name, function)
        split = {part: seconds / total for part, seconds in self.seconds.items()}
        return split | {"other": 1 - sum(split.values()), "seconds": total}


def format_table(report: dict) -> str:
    machine, archive = report["machine"], report["archive"]
    base = report["results"][0]["views_per_sec"]
    lines = [
        f"machine: {machine['cpus']} CPU(s), {machine['cpu_model']}; reader pinned to CPU {machine['pinned_cpu']}",
        f"archive: {archive['views']:,} views = {archive['epochs']} epochs x {archive['samples']:,} samples x "
        f"{archive['views_per_sample']} views, {CLASSES} classes; batches of {report['batch_positions']} positions; "
        f"best of {report['passes']} passes, each with a fresh reader",
        "",
        f"{'case':<40}{'bytes/view':>11}{'views/s':>11}{'vs first':>10}   each pass (views/s)",
    ]
    for row in report["results"]:
        each = ", ".join(f"{v:,.0f}" for v in row["views_per_sec_each"])
        lines.append(f"{row['case']:<40}{row['bytes_per_view']:>11.1f}{row['views_per_sec']:>11,.0f}"
                     f"{row['views_per_sec'] / base:>9.2f}x   {each}")
    target = report["target"]
    lines += ["", f"target: >= {target['views_per_sec']:,} views/s for local zarr dense-fp16 on one core: "
                  f"{'met' if target['met'] else 'NOT met'} ({base:,.0f})"]
    split_rows = [row for row in report["results"] if "time_split" in row]
    if split_rows:
        parts = list(split_rows[0]["time_split"])[:-1]
        lines += ["", "share of one extra pass's time (--profile):",
                  f"{'case':<40}" + "".join(f"{part:>16}" for part in parts)]
        for row in split_rows:
            lines.append(f"{row['case']:<40}" + "".join(f"{row['time_split'][p]:>16.0%}" for p in parts))
    if not report["identical_logits"]:
        lines.append("WARNING: the cases did not all decode identical logits")
    return "\n".join(lines)


LOCAL_CASES = {"zarr dense-fp16": ("dense-fp16", "zarr"), "webdataset dense-fp16": ("dense-fp16", "webdataset"),
               "zarr topk:10": ("topk:10", "zarr")}


def run_cases(built: dict, s3: tuple[str, dict] | None, local_cache: Path, args: argparse.Namespace) -> tuple[list, bool]:
    """Every case's row, and whether all dense readers decode identical logits."""
    from pipeline.store import ArchiveReader

    openers = {f"{name}, local": (lambda path=built[name]["archive"]: ArchiveReader(path)) for name in LOCAL_CASES}
    sizes = {f"{name}, local": built[name]["bytes_per_view"] for name in LOCAL_CASES}
    results = [measure(case, opener, args.batch, args.passes) for case, opener in openers.items()]
    if s3 is not None:
        url, options = s3

        def with_cache():
            return ArchiveReader(url, options, local_cache=local_cache)

        shutil.rmtree(local_cache, ignore_errors=True)  # a kept --workdir's, from an earlier run
        openers["zarr dense-fp16, S3"] = lambda: ArchiveReader(url, options)
        results += [measure("zarr dense-fp16, S3", openers["zarr dense-fp16, S3"], args.batch, args.passes),
                    measure("zarr dense-fp16, S3, local cache cold", with_cache, args.batch, 1, warm_up=False),
                    measure("zarr dense-fp16, S3, local cache warm", with_cache, args.batch, args.passes)]
    dense = built["zarr dense-fp16"]["bytes_per_view"]
    for row in results:
        row["bytes_per_view"] = sizes.get(row["case"], dense)
    readers = [opener() for case, opener in openers.items() if "topk" not in case]
    if s3 is not None:
        readers.append(with_cache())
    identical = all(same_logits(readers[0], other) for other in readers[1:])
    if args.profile:
        for row in results:
            if row["case"] in openers:
                row["time_split"] = TimeSplit().run(openers[row["case"]], args.batch)
    return results, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000, help="samples per epoch (default 5000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs cached (default 2)")
    parser.add_argument("--views-per-sample", type=int, default=2, help="views per sample (default 2)")
    parser.add_argument("--batch", type=int, default=256, help="positions per read (default 256)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per case; the best counts (default 3)")
    parser.add_argument("--quick", action="store_true", help="a small archive and 2 passes: seconds, not a measurement")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 cases")
    parser.add_argument("--profile", action="store_true", help="also split one extra pass of each case by stage")
    parser.add_argument("--workdir", help="where to build the archives (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.epochs, args.views_per_sample, args.passes = 1000, 1, 2, 2

    with tempfile.TemporaryDirectory(prefix="kdpipe-read-speed-") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        built = {name: build_archive(workdir / f"{fmt}-{codec.replace(':', '')}", codec, fmt, args)
                 for name, (codec, fmt) in LOCAL_CASES.items()}
        cpus = os.sched_getaffinity(0)
        server = None
        try:
            if not args.no_s3:  # the server gets the other cores, this process the first
                server, endpoint = start_s3_server(cpus - {min(cpus)} or cpus)
                s3 = upload(Path(built["zarr dense-fp16"]["archive"]), endpoint, "dense-fp16.zarr")
            pinned = pin_to_one_core()
            results, identical = run_cases(built, None if args.no_s3 else s3, workdir / "local-cache", args)
        finally:
            if server is not None:
                server.stdin.close()
                server.terminate()
                server.wait()

    report = {
        "machine": {"cpus": len(cpus), "cpu_model": cpu_model(), "pinned_cpu": pinned, "python": platform.python_version()},
        "archive": {"samples": args.samples, "epochs": args.epochs, "views_per_sample": args.views_per_sample,
                    "views": built["zarr dense-fp16"]["views"], "classes": CLASSES},
        "batch_positions": args.batch,
        "passes": args.passes,
        "results": results,
        "identical_logits": identical,
        "target": {"views_per_sec": TARGET_VIEWS_PER_SEC,
                   "met": results[0]["views_per_sec"] >= TARGET_VIEWS_PER_SEC},
    }
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
