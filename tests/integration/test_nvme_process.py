"""nvme-pi transport across processes: the echo card (`ring_echo --transport
nvme-pi`) as a real subprocess, the host half in the test process, both
over real shared memory."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import xxhash

from nicsplit.card.transports.base import open_splitter
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.testing.echocard import EchoCard, echo_cards

MS = 1_000_000


@pytest.fixture
def card_factory(tmp_path):
    with echo_cards(tmp_path) as start:
        yield lambda transport="nvme-pi", *args: start("--transport", transport, *args)


def workload(seed: int, n: int):
    """A deterministic stream of writes (unaligned, multi-block, FUA) and non-data ops."""
    rng = random.Random(seed)
    pool = rng.randbytes(1 << 20)
    for i in range(n):
        io_id = i + 1
        k = rng.random()
        if k < 0.85:
            size = rng.choice([1, 512, 4096, 4096, 4096, 5000, 8192, 65536, 131072 + 7])
            off = rng.randrange(len(pool) - size)
            voffset = rng.choice([4096 * rng.randrange(1 << 28), rng.randrange(1 << 40)])
            yield AugmentedWrite(io_id, 1, io_id, rng.randrange(1, 300), Op.WRITE,
                                 WFlag.FUA if k < 0.05 else WFlag.NONE, voffset, size, 1_000 + i, pool[off: off + size])
        else:
            op = rng.choice([Op.ZERO, Op.TRIM, Op.BARRIER])
            yield AugmentedWrite(io_id, 1, io_id, 3, op, WFlag.NONE, 4096 * rng.randrange(1000),
                                 0 if op == Op.BARRIER else 4096 * rng.randrange(1, 64), 1_000 + i)


def expected_digests(seed: int, n: int) -> tuple[str, str]:
    payload, identity = xxhash.xxh64(), xxhash.xxh64()
    for w in workload(seed, n):
        identity.update(b"%d %d %d %d %d;" % (w.io_id, w.vdisk_id, w.op, w.voffset, w.length))
        if w.op == Op.WRITE:
            payload.update(w.io_id.to_bytes(8, "little"))
            payload.update(w.data)
    return payload.hexdigest(), identity.hexdigest()


def drive(card: EchoCard, transport: str, seed: int, n: int) -> dict:
    sp = open_splitter(transport, card.socket)
    try:
        for w in workload(seed, n):
            # a generous timeout: this checks correctness, not speed, on a shared machine
            assert sp.split(w, timeout_ns=5_000 * MS), (w.io_id, sp.statistics(), card.log())
            assert sp.post_outcome(w.io_id, Status.COMMITTED)
        s = sp.statistics()
        assert s.acked == s.submitted == n and s.rejected == s.timeouts == 0
    finally:
        sp.close()
    return card.stop()


def test_ordered_identical_records_on_nvme_pi_and_ring(card_factory, seed):
    """The same deterministic stream through both transports: the card sees
    every write's identity (vdisk, op, virtual offset, length) and payload,
    in order, byte for byte, and the two transports agree exactly."""
    n = 3000
    want_payload, want_identity = expected_digests(seed, n)
    got = {}
    for transport in ("nvme-pi", "ring"):
        card = card_factory(transport, "--digest", "--data-size", str(4 << 20), "--sq-entries", "64")
        st = drive(card, transport, seed, n)
        assert st["bad"] == 0 and st["held"] == 0, st
        got[transport] = (st["digest"], st["identity"], st["writes"], st["outcomes"])
    assert got["nvme-pi"] == got["ring"]
    assert got["nvme-pi"][:2] == (want_payload, want_identity)
    assert got["nvme-pi"][2:] == (n, n)


def test_guard_corruption_across_processes_fails_the_split_and_is_counted(card_factory, rng):
    card = card_factory("nvme-pi", "--data-size", str(1 << 20), "--sq-entries", "16")
    sp = open_splitter("nvme-pi", card.socket)
    try:
        ok = [AugmentedWrite(i, 1, i, 4, Op.WRITE, WFlag.NONE, 4096 * i, 8192, i, rng.randbytes(8192))
              for i in range(1, 4)]
        assert sp.split(ok[0], timeout_ns=5_000 * MS)

        def flip(data, off, nb):
            data[off + 4104 + 77] ^= 0x01  # a data byte of block 1 (blocks are 4104 bytes), after its PI

        sp.fault_after_pi = flip
        assert sp.split(ok[1], timeout_ns=5_000 * MS) is False
        sp.fault_after_pi = None
        assert sp.split(ok[2], timeout_ns=5_000 * MS)
        s = sp.statistics()
        assert (s.acked, s.rejected, s.guard_errors, s.refused_status) == (2, 1, 1, 0x282)
    finally:
        sp.close()
    st = card.stop()
    assert st["guard_errors"] == 1 and st["bad"] == 1 and st["writes"] == 2, st


def test_a_card_that_stops_acking_fails_splits_within_the_timeout(card_factory):
    card = card_factory("nvme-pi", "--data-size", str(1 << 20), "--sq-entries", "64")
    sp = open_splitter("nvme-pi", card.socket)
    payload = os.urandom(4096)
    try:
        for i in range(50):
            w = AugmentedWrite(i + 1, 1, i + 1, 1, Op.WRITE, WFlag.NONE, 0, 4096, i, payload)
            assert sp.split(w, timeout_ns=5_000 * MS)
        os.kill(card.proc.pid, signal.SIGSTOP)
        worst = 0
        for i in range(50, 60):
            w = AugmentedWrite(i + 1, 1, i + 1, 1, Op.WRITE, WFlag.NONE, 0, 4096, i, payload)
            t0 = time.monotonic_ns()
            assert sp.split(w, timeout_ns=20 * MS) is False
            worst = max(worst, time.monotonic_ns() - t0)
        # generous bound (tests must not assert speed): the point is that it returns
        assert worst < 1_000 * MS, f"split took {worst / MS:.1f} ms with a 20 ms timeout"
        assert sp.statistics().timeouts == 10
        os.kill(card.proc.pid, signal.SIGCONT)
        w = AugmentedWrite(100, 1, 100, 1, Op.WRITE, WFlag.NONE, 0, 4096, 100, payload)
        assert sp.split(w, timeout_ns=5_000 * MS)  # the card caught up: the stopped writes' acks came late
        assert sp.statistics().late_acks == 10
    finally:
        sp.close()
    assert card.stop()["writes"] == 61
