"""Issue 11, "a Hypothesis state machine over the in-process pipeline": host
writes → the card pipeline (`CardPipeline`, FakeEndpoint) → batches over a
link that can drop → a REAL appliance journal (`Journal` on the power-cut
filesystem `CrashFilesystem`) → distribution (replaying the journal onto a
replica). Between test_pipeline_model (a fake appliance, no crashes) and the
e2e tests (whole processes), this one crashes the parts:

* the appliance loses power (unsynced bytes dropped or torn) and reopens;
* the card crashes: its memory is gone (a fresh pipeline; batch ids start
  at 1 again, as a restarted card's do); every write it had not confirmed
  (payload not released) is marked dirty by the host, which resyncs those
  regions later by writing their current production content again.

Invariants after every step:
* every write the card confirmed (released after a durable ack) is in the
  journal, byte for byte;
* the journal holds only committed host writes (no failed write, nothing
  invented), in strictly increasing seq;
* a committed write below the journal's last seq that the journal lacks was
  marked dirty (a gap is never silent);
* replaying the journal gives the production images as of its last seq when
  it has no gap (the distribution step, checked against the model).
At the end (link up, everything resynced and drained): replay == production.

Seeded: Hypothesis runs derandomized (examples derived from the test name);
a failure prints the steps and a reproduce blob.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nicsplit.card.pipeline import CardPipeline, PipelineConfig
from nicsplit.core.records import Op
from nicsplit.journal.writer import Journal
from nicsplit.testing.appliance import CrashFilesystem
from nicsplit.testing.pipeline import FakeCatalog, FakeEndpoint, committed, failed, write
from nicsplit.wire.frames import (
    NEED_DATA, PROTOCOL_VERSION, Ack, Batch, FrameDecoder, Hello, HelloAck, batch_aad, decode_records,
)
from nicsplit.wire.envelope import unseal

KEY = bytes(range(32))
MS = 1_000_000
BS = 4096
BLOCKS = 8
VDISKS = {1: ("cgA", "a1", BLOCKS * BS), 2: ("cgA", "a2", BLOCKS * BS)}
POOL = [bytes([i + 1]) * BS for i in range(5)]  # few distinct blocks: dedup references are common
SETTINGS = settings(max_examples=60, stateful_step_count=50, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class JournalAppliance:
    """The appliance's ingest rules around a real `Journal` (sans-IO, one
    CG): Hello → resume = the journal's last seq; each batch frame is
    unsealed, decoded and appended (durable when append returns), then acked
    with the fingerprints the journal now holds."""

    def __init__(self) -> None:
        self.fs = CrashFilesystem()
        self.crashes = 0
        self._open()

    def _open(self) -> None:
        self.j = Journal.open(Path("/j/cgA"), fs=self.fs, segment_size=48 << 10, keyring=None)
        self.dec = FrameDecoder()

    def connect(self) -> None:
        self.dec = FrameDecoder()

    def hello(self, hello: Hello) -> HelloAck:
        return HelloAck("app", PROTOCOL_VERSION, {cg: self.j.last_seq for cg in hello.cgs})

    def receive(self, data: bytes) -> list[Ack]:
        self.dec.receive_data(data)
        acks = []
        while (f := self.dec.next_event()) is not NEED_DATA:
            if isinstance(f, Batch):
                records = decode_records(unseal(f.body, KEY, batch_aad(replace(f, body=b""))))
                res = self.j.append_batch(f, records)
                acks.append(Ack(f.batch_id, f.cg, res.last_seq, True, res.known))
        return acks

    def power_cut(self, mode: str, rng: random.Random) -> None:
        # No close(): it would sync. The old Journal is abandoned as a dead process's is.
        self.fs = self.fs.power_cut(mode, rng)
        self.crashes += 1
        self._open()

    def records(self):
        return list(self.j.records())


def replay(records) -> dict[int, bytearray]:
    img = {v: bytearray(BLOCKS * BS) for v in VDISKS}
    for r, payload in records:
        if r.op == Op.WRITE:
            img[r.vdisk_id][r.offset:r.offset + r.length] = payload
        elif r.op == Op.ZERO:
            img[r.vdisk_id][r.offset:r.offset + r.length] = bytes(r.length)
    return img


class PipelineCrashes(RuleBasedStateMachine):
    @initialize(window=st.integers(1, 4), batch_records=st.integers(1, 4), seed=st.integers(0, 1 << 32))
    def setup(self, window, batch_records, seed):
        self.rng = random.Random(seed)
        self.cfg = PipelineConfig(ship_window=window, batch_records=batch_records, batch_delay_us=2000,
                                  batch_max_ready=2, dedup_known_max=8, outcome_timeout_ms=1e9,
                                  hold_max_writes=10_000)
        self.app = JournalAppliance()
        self.prod = {v: bytearray(BLOCKS * BS) for v in VDISKS}
        self.seq = 0
        self.io = 0
        self.host: dict[int, tuple] = {}  # seq → (io, vdisk, offset, data or None for ZERO, committed)
        self.io_seq: dict[int, int] = {}
        self.marked_ios: set[int] = set()  # writes the host marked dirty (their region is resynced)
        self.dirty: set[tuple[int, int]] = set()  # (vdisk, block) to resync
        self.confirmed: set[int] = set()  # io ids the card released after a durable ack
        self.card_crashes = 0
        self.t = 0
        self._new_card()

    def _new_card(self) -> None:
        self.ep = FakeEndpoint()
        self.p = CardPipeline(FakeCatalog(VDISKS), release=self._released, on_lost=self._lost, key=KEY,
                              config=self.cfg)
        self.p.add_cgs(["cgA"])
        self.inflight: list[bytes] = []
        self.connected = False
        self.unconfirmed: set[int] = set()  # io ids given to this card, not yet released

    def _released(self, io: int) -> None:
        self.ep.release(io)
        self.unconfirmed.discard(io)
        seq = self.io_seq[io]
        if self.host[seq][4]:
            self.confirmed.add(io)

    def _lost(self, w) -> None:
        raise AssertionError(f"the pipeline lost write io {w.io_id} with no crash")

    def _run(self, *entries) -> None:
        self.ep.push(*entries)
        self.p.feed(self.ep.poll(), self.t)
        self.p.tick(self.t)

    def _write(self, vdisk: int, block: int, data: bytes | None, nblocks: int, ok: bool) -> None:
        self.seq += 1
        self.io += 1
        off = block * BS
        if data is None:
            w = write(self.io, self.seq, vdisk_id=vdisk, op=Op.ZERO, offset=off, length=nblocks * BS, ts=self.io)
        else:
            w = write(self.io, self.seq, vdisk_id=vdisk, offset=off, data=data, ts=self.io)
        self.host[self.seq] = (self.io, vdisk, off, data, ok, nblocks * BS)
        self.io_seq[self.io] = self.seq
        self.unconfirmed.add(self.io)
        if ok:  # the datastore took it: production changes
            self.prod[vdisk][off:off + nblocks * BS] = data if data is not None else bytes(nblocks * BS)
        self._run(w, committed(self.io) if ok else failed(self.io))

    # -- rules -----------------------------------------------------------------

    @rule(vdisk=st.sampled_from(sorted(VDISKS)), block=st.integers(0, BLOCKS - 2),
          parts=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=2),
          zero=st.sampled_from([False] * 5 + [True]), ok=st.sampled_from([True] * 5 + [False]))
    def host_write(self, vdisk, block, parts, zero, ok):
        data = None if zero else b"".join(POOL[i] for i in parts)
        self._write(vdisk, block, data, len(parts), ok)

    @rule(ms=st.integers(0, 5))
    def card_pump(self, ms):
        self.t += ms * MS
        self._run()

    @precondition(lambda self: not self.connected)
    @rule()
    def connect(self):
        self.app.connect()
        self.connected = True
        self.p.window.connected(self.app.hello(Hello("card", PROTOCOL_VERSION, self.p.cgs())).resume,
                                self.inflight.append)
        self._run()

    @precondition(lambda self: self.connected)
    @rule(n=st.integers(1, 4), lose_acks=st.booleans())
    def ship(self, n, lose_acks):
        """Batches close (their delay passes) and n frames reach the appliance;
        with lose_acks the link dies before the acks come back."""
        self.t += 3 * MS
        self._run()
        frames, self.inflight[:n] = self.inflight[:n], []
        for f in frames:
            for ack in self.app.receive(f):
                if not lose_acks:
                    self.p.window.on_ack(ack)
        if lose_acks:
            self.link_down()
        self._run()

    @precondition(lambda self: self.connected)
    @rule()
    def link_down(self):
        self.inflight.clear()
        self.connected = False
        self.p.window.disconnected()

    @precondition(lambda self: self.app.j.last_seq > 0)  # crashes where they can lose something
    @rule(mode=st.sampled_from(["drop", "tear", "keep"]))
    def appliance_crash(self, mode):
        if self.connected:
            self.link_down()
        self.app.power_cut(mode, self.rng)

    @precondition(lambda self: self.unconfirmed)
    @rule()
    def card_crash(self):
        """The card's memory is gone; the host marks what it never confirmed."""
        for io in sorted(self.unconfirmed):
            _, vdisk, off, _, ok, length = self.host[self.io_seq[io]]
            if ok:
                self.marked_ios.add(io)
                self.dirty |= {(vdisk, b) for b in range(off // BS, (off + length) // BS)}
        self.card_crashes += 1
        self._new_card()

    @precondition(lambda self: self.dirty)
    @rule()
    def resync(self):
        """The host copies each dirty block's production content through the card again."""
        todo, self.dirty = sorted(self.dirty), set()
        for vdisk, block in todo:
            self._write(vdisk, block, bytes(self.prod[vdisk][block * BS:(block + 1) * BS]), 1, True)

    @rule()
    def distribution_step(self):
        """Replay the journal (what distribution applies to the replica) and
        compare with the model where the journal has no gap."""
        recs = self.app.records()
        last = self.app.j.last_seq
        missing = [s for s in range(1, last + 1) if self.host.get(s, (0,) * 5)[4] and s not in {r.seq for r, _ in recs}]
        if not missing:
            want = {v: bytearray(BLOCKS * BS) for v in VDISKS}
            for s in range(1, last + 1):
                _, vdisk, off, data, ok, length = self.host[s]
                if ok:
                    want[vdisk][off:off + length] = data if data is not None else bytes(length)
            assert replay(recs) == want, f"the replica at seq {last} is not production as of seq {last}"

    # -- invariants ------------------------------------------------------------

    @invariant()
    def confirmed_writes_are_journaled_and_nothing_else_is(self):
        if not hasattr(self, "app"):
            return
        recs = self.app.records()
        seqs = [r.seq for r, _ in recs]
        assert seqs == sorted(set(seqs)), f"journal out of order: {seqs}"
        journaled = {}
        for r, payload in recs:
            assert r.seq in self.host, f"phantom record seq {r.seq}"
            io, vdisk, off, data, ok, length = self.host[r.seq]
            assert ok, f"a failed write (seq {r.seq}) was journaled"
            assert (r.io_id, r.vdisk_id, r.offset, r.length) == (io, vdisk, off, length), r
            assert payload == (data if data is not None else b""), f"seq {r.seq}: payload differs"
            journaled[io] = r.seq
        lost = self.confirmed - set(journaled)
        assert not lost, f"confirmed writes missing from the journal: {sorted(lost)}"
        last = self.app.j.last_seq
        for s in range(1, last + 1):
            io, _, _, _, ok, _ = self.host.get(s, (None, 0, 0, None, False, 0))
            if ok and io not in journaled:
                assert io in self.marked_ios, f"seq {s} is missing from the journal and was never marked"

    def teardown(self):
        if not hasattr(self, "app"):
            return
        for _ in range(50):
            if self.dirty:
                self.resync()
            if not self.connected:
                self.connect()
            for _ in range(200):
                self.t += 3 * MS
                self.p.drain(self.t)
                if not self.inflight and self.p.drained():
                    break
                self.ship(len(self.inflight) or 1, False)
            if not self.dirty and self.p.drained():
                break
        assert self.p.drained() and not self.dirty, self.p.statistics()
        assert not self.ep.held  # every payload released exactly once (the fake raises on twice)
        assert replay(self.app.records()) == self.prod, "after resync the replica is not production"


PipelineCrashes.TestCase.settings = SETTINGS
test_pipeline_with_crashes = PipelineCrashes.TestCase
