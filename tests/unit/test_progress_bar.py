"""The CLI's progress bar (`nicsplit.cli.progress.Bar`) without a terminal:
no bar, and the summary line on stderr unless the output is --json; with
--progress the bar is drawn (ANSI) even though stderr is not a terminal."""

from __future__ import annotations

import argparse

import pytest

from nicsplit.cli.progress import Bar, human_bytes, summary_line


def test_summary_line_formats_bytes_time_and_rate():
    assert summary_line("restore a", 8 << 20, 0.5) == "restore a: 8.0 MiB in 0.50 s (16.0 MiB/s)"
    assert summary_line("verify cg1", 3 << 30, 12.0) == "verify cg1: 3.0 GiB in 12.00 s (256.0 MiB/s)"
    assert summary_line("x", 0, 0.0) == "x: 0 B in 0.00 s (0.0 MiB/s)"
    assert [human_bytes(n) for n in (512, 1536, 5 << 40)] == ["512 B", "1.5 KiB", "5.0 TiB"]


def test_without_a_terminal_text_mode_prints_only_the_summary(capsys):
    with Bar(argparse.Namespace(json=False), "restore a") as bar:
        bar.update(1 << 20, 4 << 20)
        bar.update(4 << 20, 4 << 20)
        bar.extra = "clean"
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("restore a: 4.0 MiB in ") and err.endswith(", clean\n") and "\x1b[" not in err


def test_json_without_a_terminal_is_silent_and_errors_print_no_summary(capsys):
    with Bar(argparse.Namespace(json=True), "restore a") as bar:
        bar.update(4 << 20, 4 << 20)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(RuntimeError):
        with Bar(argparse.Namespace(json=False), "restore a") as bar:
            bar.update(1, 2)
            raise RuntimeError("the operation failed")
    assert capsys.readouterr() == ("", "")


def test_progress_forces_the_bar_and_an_operation_without_bytes_reports_its_time(capsys):
    with Bar(argparse.Namespace(json=True, progress=True), "sync cg1") as bar:
        bar.update(2 << 20, 8 << 20, "sync cg1: initializing z (25%)")
        bar.update(8 << 20, 8 << 20)
    out, err = capsys.readouterr()
    assert out == "" and "\x1b[" in err and "initializing z (25%)" in err and "sync cg1: 8.0 MiB in" in err
    with Bar(argparse.Namespace(json=False), "image export cg1") as bar:
        bar.extra = "ready in 0.12 s"
    assert capsys.readouterr().err.startswith("image export cg1: 0.")
