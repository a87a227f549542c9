"""Failpoints (nicsplit.core.failpoints): the specification grammar, the
probability and count, seeded reproducibility, counts shared through a
directory, and that an unarmed point does nothing."""

from __future__ import annotations

import errno
import re
import time
from pathlib import Path

import pytest

from nicsplit.core import failpoints as fp
from nicsplit.testing.procs import wait_for
from nicsplit.testing.soak import FAILPOINTS


@pytest.fixture(autouse=True)
def disarmed():
    fp.configure({})
    yield
    fp.configure({})


def test_unarmed_points_do_nothing_and_the_dict_is_empty():
    assert fp.ACTIVE == {}
    fp.hit("appliance.after-append")  # no error, no effect


def test_grammar():
    pts = fp.parse("a=kill, b.c=25%2*error(ENOSPC),d-e=delay(5),f=1*stop,g=off,h=error(5)")
    assert (pts["a"].action, pts["a"].pct, pts["a"].count) == ("kill", 100.0, None)
    assert (pts["b.c"].action, pts["b.c"].arg, pts["b.c"].pct, pts["b.c"].count) == ("error", errno.ENOSPC, 25.0, 2)
    assert (pts["d-e"].action, pts["d-e"].arg) == ("delay", 5)
    assert (pts["f"].action, pts["f"].count) == ("stop", 1)
    assert pts["g"].action == "off" and pts["h"].arg == 5


@pytest.mark.parametrize("bad", ["a", "a=explode", "a=delay", "a=delay(x)", "a=error(NOPE)", "a=kill(3)",
                                 "A=kill", "a=150%kill", "=kill"])
def test_bad_specifications_are_refused_naming_the_item(bad):
    with pytest.raises(fp.FailpointError) as e:
        fp.configure({fp.ENV: bad})
    assert bad in str(e.value)
    assert fp.ACTIVE == {}


def test_error_fires_count_times_then_stops():
    fp.configure({fp.ENV: "x=2*error(ENOSPC)"})
    for _ in range(2):
        with pytest.raises(OSError) as e:
            fp.hit("x")
        assert e.value.errno == errno.ENOSPC and "failpoint x" in str(e.value)
    fp.hit("x")  # spent
    fp.hit("y")  # not armed


def test_delay_sleeps():
    fp.configure({fp.ENV: "x=delay(30)"})
    t0 = time.monotonic()
    fp.hit("x")
    assert time.monotonic() - t0 >= 0.03


def test_probability_is_seeded_and_reproducible():
    def pattern(seed: int) -> list[bool]:
        fp.configure({fp.ENV: "x=30%error(5)", fp.SEED_ENV: str(seed)})
        out = []
        for _ in range(200):
            try:
                fp.hit("x")
                out.append(False)
            except OSError:
                out.append(True)
        return out

    a, b, c = pattern(7), pattern(7), pattern(8)
    assert a == b and a != c
    assert 30 <= sum(a) <= 90, sum(a)  # about 30% of 200


def test_a_shared_directory_spends_the_count_across_processes(tmp_path):
    env = {fp.ENV: "x=1*error(5)", fp.DIR_ENV: str(tmp_path)}
    fp.configure(env)
    with pytest.raises(OSError):
        fp.hit("x")
    assert (tmp_path / "x.0").exists()
    fp.configure(env)  # as a restarted process would: a fresh point, the same directory
    fp.hit("x")  # spent by the first one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.0"]


def test_the_armed_file_arms_points_in_a_running_process(tmp_path):
    env = {fp.DIR_ENV: str(tmp_path)}
    fp.configure(env)
    assert fp.ACTIVE == {}
    (tmp_path / fp.ARMED_FILE).write_text("x=1*error(EIO)\n")
    fp.configure(env, keep_same=True)
    assert fp.ACTIVE["x"].count == 1
    with pytest.raises(OSError):
        fp.hit("x")
    fp.configure(env, keep_same=True)  # the same file: the point keeps its state (spent)
    fp.hit("x")
    fp.configure(env, watch=True)  # the watcher re-reads the file when it changes
    (tmp_path / "new").write_text("y=delay(1)")
    (tmp_path / "new").rename(tmp_path / fp.ARMED_FILE)
    wait_for(lambda: "y" in fp.ACTIVE and "x" not in fp.ACTIVE, 10, "the watcher arming y")


def test_every_documented_point_is_in_the_code_and_every_point_is_documented():
    root = Path(__file__).resolve().parents[2]
    src = "\n".join(p.read_text() for p in (root / "src" / "nicsplit").rglob("*.py"))
    in_code = set(re.findall(r'_fp\.hit\("([a-z0-9._-]+)"\)', src))
    in_code |= {"replica." + n for n in re.findall(r'self\._fp\("([a-z-]+)"\)', (root / "src/nicsplit/recovery/replica.py").read_text())}
    in_code |= {"replica.image-written"}  # passed as the point of _write_images
    doc = (root / "docs" / "faults.md").read_text()
    table = doc[doc.index("### The points"):doc.index("## The fault soak")]
    documented = {n for row in table.splitlines() if row.startswith("| `")
                  for n in re.findall(r"`([a-z0-9._-]+)`", row.split("|")[1])}
    assert documented == in_code, (documented ^ in_code)
    assert set(FAILPOINTS) <= in_code
