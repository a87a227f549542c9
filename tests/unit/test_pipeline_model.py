"""Rule-based model of the card pipeline: random interleavings of writes,
outcomes, time, deliveries, lost acks and disconnects (Hypothesis, seeded).

Checked after every step: nothing failed is journaled, each CG's journal is
strictly increasing in seq, nothing is released before it is durable or
dropped. Checked at the end (all outcomes given, link up, drained): the
journal is exactly the committed writes in seq order, each once, with its
payload after dedup expansion (merge off) — or, with merge on, replaying the
journal gives the same images as replaying the committed writes; and every
payload was released exactly once.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nicsplit.card.pipeline import CardPipeline, PipelineConfig
from nicsplit.testing.pipeline import FakeAppliance, FakeCatalog, FakeEndpoint, committed, failed, write
from nicsplit.core.records import Op, Status, WFlag
from nicsplit.wire.frames import PROTOCOL_VERSION, Hello

KEY = bytes(range(32))
MS = 1_000_000
VDISKS = {1: ("cgA", "a1", 1 << 20), 2: ("cgA", "a2", 1 << 20), 3: ("cgB", "b1", 1 << 20)}
CG_ID = {"cgA": 1, "cgB": 2}
POOL = [bytes([i]) * 4096 for i in range(6)]  # few distinct blocks: dedup hits are common
SETTINGS = settings(max_examples=150, stateful_step_count=60, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class PipelineModel(RuleBasedStateMachine):
    merge_window_ms = 0.0

    @initialize(window=st.integers(1, 4), batch_records=st.integers(1, 5), known=st.integers(1, 8))
    def setup(self, window, batch_records, known):
        self.ep = FakeEndpoint()
        self.lost = []
        self.p = CardPipeline(
            FakeCatalog(VDISKS), release=self.ep.release, on_lost=self.lost.append, key=KEY,
            config=PipelineConfig(ship_window=window, batch_records=batch_records, batch_delay_us=2000,
                                  batch_max_ready=2, dedup_known_max=known, merge_window_ms=self.merge_window_ms,
                                  outcome_timeout_ms=1e9, hold_max_writes=10_000),
        )
        self.p.add_cgs(["cgA", "cgB"])
        self.app = FakeAppliance(KEY)
        self.inflight: list[bytes] = []
        self.connected = False
        self.t = 0
        self.io = 0
        self.seq = {"cgA": 0, "cgB": 0}
        self.writes = {}  # io_id → AugmentedWrite
        self.status = {}  # io_id → Status
        self.undecided: list[int] = []

    # -- helpers ---------------------------------------------------------------

    def _run(self, *entries):
        self.ep.push(*entries)
        self.p.feed(self.ep.poll(), self.t)
        self.p.tick(self.t)

    # -- rules -----------------------------------------------------------------

    @rule(vdisk=st.sampled_from(sorted(VDISKS)), block=st.integers(0, 7),
          parts=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=3), tail=st.integers(0, 100),
          op=st.sampled_from([Op.WRITE] * 6 + [Op.ZERO, Op.TRIM, Op.BARRIER]), fua=st.booleans())
    def a_write(self, vdisk, block, parts, tail, op, fua):
        cg = VDISKS[vdisk][0]
        self.seq[cg] += 1
        self.io += 1
        data = b"".join(POOL[i] for i in parts) + bytes([self.io & 0xFF]) * tail
        if op == Op.WRITE:
            w = write(self.io, self.seq[cg], cg_id=CG_ID[cg], vdisk_id=vdisk, offset=block * 4096, data=data,
                      flags=WFlag.FUA if fua else WFlag.NONE, ts=self.io)
        else:
            w = write(self.io, self.seq[cg], cg_id=CG_ID[cg], vdisk_id=vdisk, op=op, ts=self.io,
                      offset=0 if op == Op.BARRIER else block * 4096, length=0 if op == Op.BARRIER else 8192)
        self.writes[w.io_id] = w
        self.undecided.append(w.io_id)
        self._run(w)

    @precondition(lambda self: self.undecided)
    @rule(pick=st.integers(0, 1 << 16), ok=st.sampled_from([True, True, True, False]))
    def an_outcome(self, pick, ok):
        io = self.undecided.pop(pick % len(self.undecided))
        self.status[io] = Status.COMMITTED if ok else Status.FAILED
        self._run(committed(io) if ok else failed(io))

    @rule(ms=st.integers(0, 5))
    def time_passes(self, ms):
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
    def deliver(self, n, lose_acks):
        """The appliance receives n frames; with lose_acks the link dies before
        its acks reach the card (TCP loses nothing on a live connection)."""
        frames, self.inflight[:n] = self.inflight[:n], []
        for f in frames:
            for ack in self.app.receive(f):
                if not lose_acks:
                    self.p.window.on_ack(ack)
        if lose_acks:
            self.disconnect()
        self._run()

    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self):
        self.inflight.clear()  # frames on the wire are gone
        self.connected = False
        self.p.window.disconnected()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def journal_is_ordered_and_has_no_phantoms(self):
        if not hasattr(self, "app"):
            return
        for cg in ("cgA", "cgB"):
            seqs = [r.seq for r in self.app.records(cg)]
            assert seqs == sorted(set(seqs)), seqs
        for j in self.app.journal:
            assert self.status.get(j.record.io_id) == Status.COMMITTED  # P3

    @invariant()
    def released_only_when_dropped_or_durable(self):
        if not hasattr(self, "app"):
            return
        journaled = {j.record.io_id for j in self.app.journal}
        for io in self.ep.released:
            assert self.status.get(io) == Status.FAILED or io in journaled or self.merge_window_ms, io
        assert len(self.ep.released) == len(set(self.ep.released))

    def teardown(self):
        if not hasattr(self, "app"):
            return
        for io in list(self.undecided):
            self.status[io] = Status.COMMITTED
            self._run(committed(io))
        self.undecided.clear()
        if not self.connected:
            self.connect()
        for _ in range(1000):
            self.t += 3 * MS
            self.p.drain(self.t)
            if not self.inflight and self.p.drained():
                break
            self.deliver(len(self.inflight) or 1, False)
        assert self.p.drained(), self.p.statistics()
        assert self.lost == []
        assert not self.ep.held  # every payload released exactly once (the fake raises on twice)
        for cg in ("cgA", "cgB"):
            want = [w for io, w in sorted(self.writes.items()) if VDISKS[w.vdisk_id][0] == cg
                    and self.status[io] == Status.COMMITTED]
            got = self.app.records(cg)
            if not self.merge_window_ms:
                assert [(r.seq, r.io_id) for r in got] == [(w.cg_seq, w.io_id) for w in want]
                for r, w in zip(got, want):
                    assert (r.vdisk_id, r.op, r.offset, r.length) == (w.vdisk_id, w.op, w.voffset, w.length)
                    assert r.data == (bytes(w.data) if w.op == Op.WRITE else b"")
            else:
                assert replay(got) == replay_writes(want)
                assert {r.seq for r in got} <= {w.cg_seq for w in want}


def replay(records):
    images = {}
    for r in records:
        img = images.setdefault(r.vdisk_id, bytearray(64 * 4096))
        if r.op == Op.WRITE:
            img[r.offset:r.offset + r.length] = r.data
        elif r.op in (Op.ZERO, Op.TRIM):
            img[r.offset:r.offset + r.length] = bytes(r.length)
    return images


def replay_writes(writes):
    from nicsplit.wire.frames import Record
    return replay([Record(w.cg_seq, w.io_id, w.vdisk_id, int(w.op), 0, w.voffset, w.length, 0,
                          bytes(w.data) if w.op == Op.WRITE else b"") for w in writes])


class MergingPipelineModel(PipelineModel):
    merge_window_ms = 3.0


TestPipelineModel = PipelineModel.TestCase
TestPipelineModel.settings = SETTINGS
TestMergingPipelineModel = MergingPipelineModel.TestCase
TestMergingPipelineModel.settings = SETTINGS
