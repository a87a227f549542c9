"""Ring transport across processes: the demo echo card as a real subprocess."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest
import xxhash

from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.testing.echocard import EchoCard, echo_cards
from nicsplit.testing.procs import wait_for

MS = 1_000_000


def assert_ready(card: EchoCard) -> EchoCard:
    assert card.ready["event"] == "ready" and card.ready["pid"] == card.proc.pid
    return card


@pytest.fixture
def card_factory(tmp_path):
    with echo_cards(tmp_path) as start:
        yield lambda *args: assert_ready(start(*args))


def test_ten_thousand_splits_acked_with_intact_payloads(card_factory, rng):
    card = card_factory("--digest", "--data-size", str(4 << 20), "--sq-entries", "64")
    volume = card.ready["volume"]
    st = os.stat(volume)
    assert stat.S_IMODE(st.st_mode) == 0o600 and Path(volume).name.startswith("nicsplit-hv-")
    sp = RingSplitter.connect(card.socket)
    expect = xxhash.xxh64()
    sizes = [512, 4096, 4096, 4096, 4096, 8192, 65536]
    pool = rng.randbytes(1 << 20)  # payloads are seeded random slices of this pool
    n_writes = total = 0
    try:
        for i in range(10_000):
            io_id = i + 1
            k = rng.random()
            if k < 0.9:
                size = rng.choice(sizes) if rng.random() < 0.9 else rng.randrange(1, 200_000)
                off = rng.randrange(len(pool) - size)
                data = io_id.to_bytes(8, "little")[: size] + pool[off + 8: off + size]
                w = AugmentedWrite(io_id, 1, i + 1, 2, Op.WRITE, WFlag.FUA if k < 0.05 else WFlag.NONE,
                                   rng.randrange(1 << 40), len(data), time.time_ns(), data)
                expect.update(io_id.to_bytes(8, "little"))
                expect.update(data)
                n_writes += 1
                total += len(data)
            else:
                op = rng.choice([Op.ZERO, Op.TRIM, Op.BARRIER])
                w = AugmentedWrite(io_id, 1, i + 1, 2, op, WFlag.NONE, 0, 0 if op == Op.BARRIER else 4096,
                                   time.time_ns())
            # a generous timeout: this checks correctness, not speed, on a shared machine
            assert sp.split(w, timeout_ns=5_000 * MS), (i, sp.statistics(), card.log())
            assert sp.post_outcome(io_id, Status.COMMITTED) or sp.statistics().full_sq
        s = sp.statistics()
        assert s.acked == s.submitted == 10_000 and s.rejected == s.timeouts == 0 and s.bytes == total
    finally:
        sp.close()
    stats = card.stop()
    assert stats["writes"] == 10_000 and stats["bad"] == 0, stats  # the card verified every checksum
    assert stats["bytes"] == total and stats["held"] == 0
    assert stats["digest"] == expect.hexdigest()  # every payload, in order, byte for byte
    assert not os.path.exists(volume) and not os.path.exists(card.socket)  # clean shutdown unlinks


def test_kill_9_card_split_returns_false_within_timeout(card_factory):
    card = card_factory("--data-size", str(1 << 20), "--sq-entries", "64")
    sp = RingSplitter.connect(card.socket)
    payload = os.urandom(4096)
    try:
        for i in range(100):
            w = AugmentedWrite(i + 1, 1, i + 1, 1, Op.WRITE, WFlag.NONE, 0, 4096, time.time_ns(), payload)
            assert sp.split(w, timeout_ns=5_000 * MS)
        assert sp.healthy()
        os.kill(card.proc.pid, signal.SIGKILL)
        card.proc.wait()
        worst = 0
        for i in range(100, 300):
            w = AugmentedWrite(i + 1, 1, i + 1, 1, Op.WRITE, WFlag.NONE, 0, 4096, time.time_ns(), payload)
            t0 = time.monotonic_ns()
            assert sp.split(w, timeout_ns=1 * MS) is False
            worst = max(worst, time.monotonic_ns() - t0)
            assert sp.post_outcome(i + 1, Status.COMMITTED) is False or i == 100
        # generous bound (tests must not assert speed): the point is that it returns
        assert worst < 50 * MS, f"split took {worst / MS:.1f} ms with a 1 ms timeout"
        assert not sp.healthy()
        s = sp.statistics()
        assert s.timeouts <= 1 and s.unhealthy >= 199
    finally:
        sp.close()
    # the dead card left its volume; the next card on this machine removes it
    volume = card.ready["volume"]
    assert os.path.exists(volume)
    nxt = card_factory("--data-size", str(1 << 20), "--sq-entries", "8")
    assert not os.path.exists(volume)
    nxt.stop()


def test_doorbell_path_across_processes(card_factory):
    """With no idle spell the card sleeps between writes: every write is
    delivered by the doorbell, none times out."""
    card = card_factory("--idle-us", "0", "--data-size", str(1 << 20), "--sq-entries", "64")
    sp = RingSplitter.connect(card.socket)
    state = sp._hv.counters
    from nicsplit.wire import ring as R

    try:
        for i in range(30):
            wait_for(lambda: state[R.Counter.CARD_STATE] == R.CardState.SLEEPING, 5, "the card to sleep",
                     interval=0.001)
            w = AugmentedWrite(i + 1, 1, i + 1, 1, Op.WRITE, WFlag.NONE, 0, 4096, time.time_ns(), b"d" * 4096)
            assert sp.split(w, timeout_ns=5_000 * MS)
        s = sp.statistics()
        assert s.doorbells >= 30 and s.acked == 30
    finally:
        sp.close()
    stats = card.stop()
    assert stats["wakeups"] >= 1 and stats["writes"] == 30


def test_card_restart_gets_a_new_volume(card_factory, tmp_path):
    a = card_factory("--data-size", str(1 << 20), "--sq-entries", "8")
    sp = RingSplitter.connect(a.socket)
    first = sp.volume_path
    sp.close()
    a.stop()
    assert not os.path.exists(first)
    b = assert_ready(EchoCard(a.run_dir, "--data-size", str(1 << 20), "--sq-entries", "8"))
    try:
        sp = RingSplitter.connect(b.socket)
        assert sp.volume_path != first
        w = AugmentedWrite(1, 1, 1, 1, Op.WRITE, WFlag.NONE, 0, 10, time.time_ns(), b"0123456789")
        assert sp.split(w, timeout_ns=5_000 * MS)
        sp.close()
        b.stop()
    finally:
        b.kill()
