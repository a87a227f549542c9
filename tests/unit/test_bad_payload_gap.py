"""A write the card acked and then found unshippable (its payload failed its
checksum after the ack) leaves the journal without it until the host reads
the lost log and resyncs the region. Until then no PIT after it may be
offered as consistent (P5): hold flags every later write of its CG
``WFlag.GAP`` (the appliance lists a PIT whose last record carries it
``consistent=False, gap=True``) until committed writes after it have covered
the region again; the write completing the cover is a consistent PIT again."""

from __future__ import annotations

import pytest

from nicsplit.card.pipeline import CardPipeline, PipelineConfig
from nicsplit.card.pipeline.hold import Hold
from nicsplit.card.pipeline.items import Resolved
from nicsplit.core.records import Op, Outcome, Status, WFlag
from nicsplit.testing.pipeline import FakeAppliance, FakeCatalog, FakeEndpoint, write
from nicsplit.wire.frames import PROTOCOL_VERSION, Hello

pytestmark = pytest.mark.unit

CG = 1
T0 = 1_000_000_000
KEY = bytes(range(32))
BS = 4096


def held(h: Hold, io: int, seq: int, vdisk: int, offset: int, op: Op = Op.WRITE) -> None:
    w = write(io, seq, cg_id=CG, vdisk_id=vdisk, offset=offset, data=bytes(BS), op=op, length=BS)
    h.add(Resolved(w, "cg", "a", BS if op == Op.WRITE else 0), T0)
    h.outcome(Outcome(io, Status.COMMITTED), T0)


def gap_flags(h: Hold) -> dict[int, bool]:
    out = {}
    while (r := h.pop_ready()) is not None:
        out[r.write.cg_seq] = bool(r.write.flags & WFlag.GAP)
    return out


def test_writes_after_a_bad_payload_carry_gap_until_its_region_is_covered():
    h = Hold(on_lost=lambda w: None, release=lambda io: None)
    held(h, 1, 1, 1, 0)
    # seq 2 (vdisk 1, 8 KiB at 0) was acked, then its payload failed its checksum
    held(h, 3, 3, 1, 0)  # covers the first half
    held(h, 4, 4, 2, 4096)  # another vdisk: covers nothing
    held(h, 5, 5, 1, 12288)  # beside the region: covers nothing
    held(h, 6, 6, 1, 0, Op.TRIM)  # a trim restores no content
    assert gap_flags(h) == {1: False}  # 3.. wait for seq 2
    h.open_gap(CG, 2, 1, 0, 2 * BS)
    h.skip(CG, 2, T0)
    assert gap_flags(h) == {3: True, 4: True, 5: True, 6: True}
    assert h.statistics().gaps_open == 1
    held(h, 7, 7, 1, BS)  # covers the rest: its PIT has the whole region again
    held(h, 8, 8, 1, 0)
    assert gap_flags(h) == {7: False, 8: False}
    st = h.statistics()
    assert st.gaps_open == 0 and st.gap_flagged == 4


def test_a_cover_from_before_the_bad_write_does_not_count():
    """Only writes after the lost one restore its region: an earlier one
    still waiting in hold covers nothing (seq order, not arrival order)."""
    h = Hold(on_lost=lambda w: None, release=lambda io: None)
    held(h, 1, 1, 1, 0)
    h.open_gap(CG, 5, 1, 0, BS)
    assert gap_flags(h) == {1: False}  # before the gap
    held(h, 2, 2, 1, 0)  # the region, but before seq 5
    h.skip(CG, 3, T0)
    h.skip(CG, 4, T0)
    h.skip(CG, 5, T0)
    held(h, 6, 6, 1, 2 * BS)
    held(h, 7, 7, 1, 0, Op.ZERO)  # a ZERO after it restores it
    assert gap_flags(h) == {2: False, 6: True, 7: False}


def test_the_shipped_records_carry_gap_after_a_bad_payload():
    """Through the pipeline (direct path) to the appliance's journal records."""
    ep = FakeEndpoint()
    p = CardPipeline(FakeCatalog({1: ("cgA", "a1", 1 << 22)}), release=ep.release, on_lost=lambda w: None,
                     key=KEY, config=PipelineConfig())
    p.add_cgs(["cgA"])
    app = FakeAppliance(KEY)
    app.connect()
    wire: list[bytes] = []
    p.window.connected(app.hello(Hello("c", PROTOCOL_VERSION, p.cgs())).resume, wire.append)
    for io, off in ((1, 0), (3, BS), (4, 0)):
        ep.push(write(io, io, cg_id=CG, vdisk_id=1, offset=off, data=bytes([io]) * BS),
                Outcome(io, Status.COMMITTED))
    p.feed(ep.poll(100), T0)
    gaps = [(CG, 2, 1, 0, BS)]  # seq 2: 4 KiB at 0, bad after its ack
    p.open_gaps(gaps)
    assert gaps == []
    p.skip([(CG, 2)], T0)
    p.drain(T0)
    for f in wire:
        for ack in app.receive(f):
            p.window.on_ack(ack)
    flags = {r.seq: bool(r.flags & WFlag.GAP) for r in app.records("cgA")}
    assert flags == {1: False, 3: True, 4: False}
