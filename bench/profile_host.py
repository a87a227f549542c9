#!/usr/bin/env python3
"""Profile ``nicsplit host serve`` with py-spy while fio drives it.

    .venv/bin/pip install py-spy        # a developer tool, not a dependency
    .venv/bin/python bench/profile_host.py [--qd 16] [--duration 10] [--filters stats] [--native]

Starts a host on a temporary data directory (one 256 MiB vdisk, pre-filled),
runs fio 4 KiB randwrite at the given queue depth, samples the host with
``py-spy record --nonblocking`` in the middle of the load, and prints the
hottest functions by *self* samples (the leaf frame: where the CPU was) and
by *inclusive* samples (anywhere on the stack). Idle samples (the event loop
waiting in epoll) are excluded unless --idle, so percentages are of the time
the host was busy. Files: bench/out/profile-qdN.{raw,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MiB, NicsplitServer, cpu_times, fio_cmd, git_state, prefill  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    venv = Path(sys.executable).parent / "py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


def parse_raw(path: Path) -> tuple[int, collections.Counter, collections.Counter, collections.Counter]:
    """py-spy --format raw: one collapsed stack per line, ``f1;f2;... COUNT``."""
    total = 0
    self_fn: collections.Counter = collections.Counter()
    self_line: collections.Counter = collections.Counter()
    incl_fn: collections.Counter = collections.Counter()
    for row in path.read_text().splitlines():
        stack, _, n = row.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        keys = [_fn_key(f) for f in frames]
        self_fn[keys[-1]] += n
        self_line[_short(frames[-1])] += n
        for k in set(keys):
            incl_fn[k] += n
    return total, self_fn, self_line, incl_fn


def _short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m["file"]
    for prefix in (str(ROOT / "src") + "/", str(ROOT) + "/"):
        if f.startswith(prefix):
            f = f[len(prefix) :]
    f = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", r"<\1>/", f)
    return f"{m['func']} ({f}:{m['line']})" if m["line"] else f"{m['func']} ({f})"


def _fn_key(frame: str) -> str:
    """A function regardless of the line it was on."""
    return re.sub(r":\d+\)$", ")", _short(frame))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of sampling (default 10)")
    ap.add_argument("--rate", type=int, default=250, help="samples per second (default 250)")
    ap.add_argument("--filters", default="stats", help="comma-separated chain, '' for none (default stats)")
    ap.add_argument("--native", action="store_true",
                    help="include C frames (uvloop, libc) via py-spy --native (stops the process per sample)")
    ap.add_argument("--idle", action="store_true", help="include idle samples (waiting in epoll)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    a = ap.parse_args(argv)
    spy = py_spy()
    if not spy:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / f"profile-qd{a.qd}.raw"
    work = Path(tempfile.mkdtemp(prefix="nicsplit-profile-"))
    filters = [f for f in a.filters.split(",") if f]
    srv = NicsplitServer("nicsplit", "nicsplit", work / "data", 256 * MiB, filters)
    try:
        srv.start()
        prefill(srv, work, "256m")
        fio_out = work / "fio.json"
        fio_runtime = a.duration + 4
        fio = subprocess.Popen(
            fio_cmd(srv.uri, rw="randwrite", bs="4k", size="256m", iodepth=a.qd, out=fio_out, runtime=fio_runtime),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(1.5)  # let fio connect and reach steady state
        u0, s0 = cpu_times(srv.pid)
        cmd = [spy, "record", "--pid", str(srv.pid), "--duration", f"{a.duration:g}", "--rate", str(a.rate),
               "--format", "raw", "-o", str(raw)]
        # --native has to stop the process to unwind C stacks (slower, more
        # perturbing); Python-only sampling reads memory without stopping it.
        cmd.append("--native" if a.native else "--nonblocking")
        if a.idle:
            cmd.append("--idle")
        spy_p = subprocess.run(cmd, capture_output=True, text=True)
        u1, s1 = cpu_times(srv.pid)
        fio.wait(fio_runtime + 60)
        if spy_p.returncode != 0 or not raw.exists():
            print(f"py-spy failed ({spy_p.returncode}): {spy_p.stderr.strip()[-2000:]}", file=sys.stderr)
            return 2
        text = fio_out.read_text()
        job = json.loads(text[text.index("{") :])["jobs"][0]
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    total, self_fn, self_line, incl_fn = parse_raw(raw)
    busy = (u1 - u0 + s1 - s0) / a.duration * 100
    sys_pct = (s1 - s0) / a.duration * 100
    lines = [
        f"# py-spy profile of nicsplit host, fio 4 KiB randwrite QD{a.qd}, chain {filters or '(none)'}",
        "",
        f"{total} samples at {a.rate} Hz over {a.duration:g} s ({'with' if a.idle else 'without'} idle samples"
        f"{', native frames' if a.native else ''}); git {git_state(ROOT)}; host CPU {busy:.0f}% of one core "
        f"while sampled, {sys_pct:.0f}% of it in the kernel (py-spy cannot see kernel time: it is folded "
        "into the Python line that made the syscall); "
        f"fio under the profiler: {job['write']['iops']:,.0f} IOPS.",
        "",
        "## Self (leaf) samples by function",
        "",
        "| % | samples | function (file) |",
        "|--:|--:|---|",
    ]
    lines += [f"| {n / total * 100:.1f} | {n} | `{k}` |" for k, n in self_fn.most_common(a.top)]
    lines += ["", "## Self samples by line", "", "| % | samples | function (file:line) |", "|--:|--:|---|"]
    lines += [f"| {n / total * 100:.1f} | {n} | `{k}` |" for k, n in self_line.most_common(a.top)]
    lines += ["", "## Inclusive samples by function", "", "| % | samples | function (file) |", "|--:|--:|---|"]
    lines += [f"| {n / total * 100:.1f} | {n} | `{k}` |" for k, n in incl_fn.most_common(a.top)]
    md = "\n".join(lines) + "\n"
    (a.out / f"profile-qd{a.qd}.md").write_text(md)
    print(md)
    print(f"raw stacks: {raw} (flamegraph.pl / speedscope can read them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
