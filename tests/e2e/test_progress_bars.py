"""Issue 13, item 6: progress bars of long commands, with `nicsplit up`.

Under a pseudo-terminal (stderr a TTY) restore, verify, image export and
``cg add --wait`` draw a rich bar on stderr and end with one summary line
(bytes, time, rate); stdout keeps its JSON. Without a terminal nothing is
drawn and ``--json`` output is alone (no summary); ``--progress`` forces
the bar. `nicsplit wait` follows an initial sync to protected."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from nicsplit.recovery import images
from nicsplit.recovery.select import Selector
from nicsplit.testing.procs import UpProcess, nbd_connect, nicsplit_cmd, run_cli
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def under_pty(data: Path, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal and stdout on a pipe:
    (exit status, stdout, what the terminal got)."""
    master, slave = os.openpty()
    got: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last holder of the slave side closed it
                return
            if not chunk:
                return
            got.append(chunk)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        p = subprocess.run(nicsplit_cmd("--data", str(data), *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=slave, timeout=timeout, env={**os.environ, "COLUMNS": "120"})
    finally:
        os.close(slave)
    t.join(30)
    os.close(master)
    return p.returncode, p.stdout.decode(), b"".join(got).decode(errors="replace")


def summary(term: str, what: str) -> re.Match:
    plain = ANSI.sub("", term).replace("\r", "\n")
    m = re.search(rf"^{re.escape(what)}: (\d+\.\d) (MiB|KiB|B) in (\d+\.\d\d) s \((\d+\.\d) MiB/s\)(.*)$", plain, re.M)
    assert m, f"no summary line for {what!r} in {plain!r}"
    return m


@pytest.mark.timeout(400)
def test_restore_verify_export_and_sync_draw_bars_on_a_terminal_and_keep_json_clean(tmp_path):
    data = cg_data(tmp_path, SIZE, names=("a",), resync_mib_s=4)
    run_cli(data, "vdisk", "create", "z", "--size", str(SIZE))  # joins cg1 later, holding data
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        for off in range(0, SIZE, 1 << 20):
            h.pwrite(bytes([off >> 20 | 1]) * 65536, off)
        run_cli(data, "bookmark", "cg1", "b1")

        # restore: bar and summary on the terminal, the JSON document alone on stdout
        rc, out, term = under_pty(data, "restore", "a", "--bookmark", "b1", "--to", str(tmp_path / "a.raw"), "--json")
        assert rc == 0, term
        doc = json.loads(out)
        assert doc["size"] == SIZE and doc["file"] == str(tmp_path / "a.raw")
        m = summary(term, "restore a")
        assert (m.group(1), m.group(2)) == ("8.0", "MiB") and float(m.group(3)) > 0, m.group(0)
        assert "\x1b[" in term and "100.0%" in ANSI.sub("", term), term  # rich drew a bar that reached its end

        # the same without a terminal: nothing on stderr with --json, a plain summary without
        p = run_cli(data, "restore", "a", "--bookmark", "b1", "--to", str(tmp_path / "b.raw"), "--json")
        assert json.loads(p.stdout) == {**doc, "file": str(tmp_path / "b.raw")} and p.stderr == ""
        p = run_cli(data, "restore", "a", "--bookmark", "b1", "--to", str(tmp_path / "c.raw"))
        assert p.stdout.startswith("restored a at seq") and "\x1b[" not in p.stderr
        summary(p.stderr, "restore a")
        # --progress forces the bar without a terminal
        p = run_cli(data, "--progress", "restore", "a", "--bookmark", "b1", "--to", str(tmp_path / "d.raw"), "--json")
        assert json.loads(p.stdout)["size"] == SIZE and "\x1b[" in p.stderr
        summary(p.stderr, "restore a")
        assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "d.raw").read_bytes()

        # verify: the pass over every byte, then its verdict in the summary
        rc, out, term = under_pty(data, "verify", "cg1", "--json")
        assert rc == 0 and json.loads(out)["bytes_compared"] == SIZE, (out, term)
        m = summary(term, "verify cg1")
        assert m.group(1) == "8.0" and m.group(5) == ", clean", m.group(0)

        # image export: the appliance serves it from its index, at once: a summary with its ready time
        rc, out, term = under_pty(data, "image", "export", "cg1", "--bookmark", "b1", "--json")
        assert rc == 0, term
        exp = json.loads(out)
        assert re.search(r"image export cg1: \d+\.\d\d s, ready in", ANSI.sub("", term)), term
        run_cli(data, "image", "close", exp["id"])

        # cg add --wait: z holds 8 MiB, its initial sync at 4 MiB/s is followed to protected
        hz = nbd_connect(up.uri("z"))
        for off in range(0, SIZE, 1 << 20):
            hz.pwrite(b"\x5a" * (1 << 20), off)
        hz.flush()
        rc, out, term = under_pty(data, "cg", "add", "cg1", "z", "--wait", "--timeout", "120")
        assert rc == 0 and "joins consistency group cg1: initializing" in out, (out, term)
        m = summary(term, "sync cg1")
        assert m.group(5) == ", protected" and m.group(1) == "8.0", m.group(0)
        assert "initializing z" in ANSI.sub("", term), term  # the bar said what it follows
        st = json.loads(run_cli(data, "status", "--json").stdout)
        assert {v["name"]: v["state"] for c in st["cgs"] for v in c["vdisks"]}["z"] == "protected"
        # wait on a protected CG returns at once, having waited for nothing
        w = json.loads(run_cli(data, "wait", "cg1", "--json").stdout)
        assert w["waited_for"] == [] and w["vdisks"] == ["a", "z"]
        h.shutdown()
        hz.shutdown()
    p = run_cli(data, "wait", "cg1", check=False)
    assert p.returncode == 1 and "no running host" in p.stderr and len(p.stderr.strip().splitlines()) == 1

    # image export preparation without an appliance: the standalone server's
    # journal scan is reported through the progress callback, up to its total
    seen: list[tuple[int, int]] = []
    info = images.export(data, "cg1", Selector(bookmark="b1"), progress=lambda d, t: seen.append((d, t)))
    try:
        assert seen and seen[-1][0] == seen[-1][1] > 0, seen
        assert all(d <= t for d, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    finally:
        images.close(data, info["id"])
