"""The pipeline worker's endpoint on the ring transport: `HandoffEndpoint`
reads what the acker (`nicsplit.card.transports.ring_acker`) checked and
acked from the handoff queue (`nicsplit.card.handoff`), hands the pipeline
`AugmentedWrite`s whose payloads are views of the hidden volume, and frees
them (`release`) by finishing handoff positions; the handoff floor moves the
ring's ``DATA_HEAD``. It offers the same calls as `RingEndpoint`, so
`nicsplit.card.process.CardProcess` runs on either.

Payload checksums are verified here, not by the acker (keeping a hash of the
whole payload off the ack path, see `nicsplit.card.transports.ring_acker`):
a write whose payload does not match its descriptor's checksum was acked
but is never handed to the pipeline. It goes to the lost log through
``on_refused`` (set by `CardProcess`) *before* its payload space is freed,
so the host, which reads the released watermark first and the log after,
marks and resyncs its region from production; its seq is skipped in hold
like a refused write's, after it is given to the pipeline in ``gaps`` so
that later writes of its CG carry ``WFlag.GAP`` until its region is
covered again (`nicsplit.card.pipeline.hold`: PITs after it are not
offered as consistent before the resync). Counted as ``bad_checksum`` in `statistics`, in the
handoff queue's header (`H.BAD_CSUM`), so the count survives worker restarts.

An endpoint that verifies checksums must have somewhere to report such a
write (P1: an acked write is never dropped silently): ``on_refused`` is
given at construction (the worker passes the card's lost log; `CardProcess`
may put its own lost-log writer in its place) and can never be None while
verifying. Without it the endpoint refuses to exist (``ValueError``) rather
than free a bad payload with only a log line.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from time import monotonic_ns
from typing import Callable

from xxhash import xxh3_64_intdigest as xxh3

from nicsplit.card.handoff import H, NAPPING, POLLING, REAL_HALF, REFUSED, RELEASED, SLEEPING, Handoff
from nicsplit.card.hidden import HiddenVolume
from nicsplit.card.transports.ring_shared import (
    DATA_HEAD, DF_CSUM, K_OUTCOME, K_WRITE, M32, OPS, STATUSES, WFLAGS, reason_name,
)
from nicsplit.card.transports.shadow_match import HalfMatcher
from nicsplit.core.records import AugmentedWrite, Outcome
from nicsplit.wire import nvme as N
from nicsplit.wire import ring as R

__all__ = ["HandoffEndpoint"]

log = logging.getLogger("nicsplit.card.transports.ring")

desc_iter = R.DESC.iter_unpack  # handoff slots are DESC.size (64) bytes apart
assert R.DESC.size == 64

# An Outcome per write from `poll`, built without the frozen dataclass's
# __init__ (a Python call and two object.__setattr__ calls, ~2 µs on a loaded
# core): its slots set directly, the same object.
new_outcome = Outcome.__new__
set_io, set_status = Outcome.io_id.__set__, Outcome.status.__set__  # type: ignore[attr-defined]

# An AugmentedWrite per write from `poll` the same way: its __init__ is a
# Python call with ten arguments (~0.3 µs); `__new__` and ten slot stores in
# the poll's own loop cost half that. The stores must name every field:
new_write = AugmentedWrite.__new__
assert [f.name for f in fields(AugmentedWrite)] == [
    "io_id", "cg_id", "cg_seq", "vdisk_id", "op", "flags", "voffset", "length", "timestamp_ns", "data"]

_P, _C, _F = H.PRODUCED // 8, H.CONSUMED // 8, H.FLOOR // 8
_WSTATE, _FULL, _WHB, _DX = H.WSTATE // 8, H.FULL // 8, H.WHEARTBEAT // 8, H.DATA_EXPECT // 8
_NAPU, _BADC = H.NAP_UNTIL // 8, H.BAD_CSUM // 8

Refused = Callable[[int, int, int, int, str], None]  # (io_id, vdisk_id, offset, length, reason)


class HandoffEndpoint:
    def __init__(self, handoff: Handoff, volume_path: str, volume_uid: str, wake_fd: int, *,
                 on_refused: Refused | None = None, verify_checksums: bool = True, transport: str = "ring",
                 match_timeout_ms: float = 5000) -> None:
        self.handoff = handoff
        self._hv = HiddenVolume.attach(volume_path, volume_uid)
        # nvme-pi's acker (`nvme_acker.NvmeAcker`) hands off ring descriptors
        # too; its payload positions wrap at the namespace's end, and it counts
        # PI errors, which this endpoint reports.
        self._nvme = transport == "nvme-pi"
        # shadow's acker (`shadow_acker.ShadowAcker`) hands off each real
        # half's outcome (flagged REAL_HALF): the halves are counted here.
        self.match = HalfMatcher(match_timeout_ms) if transport == "shadow" else None
        self._verify = verify_checksums and self._hv.identity.csum_alg == R.CsumAlg.XXH3_LOW32
        # The acker reports its refusals; this one reports payloads that fail their checksum (lost log).
        # Required while verifying: checked by the setter, here and on every later assignment.
        self._on_refused: Refused | None = None
        try:
            self.on_refused = on_refused
        except ValueError:
            self._hv.close()
            raise
        self._data = self._hv.data
        self._ctr = self._hv.counters
        self._dsize = self._hv.geometry.data_size
        if self._nvme:
            self._dsize = N.namespace_blocks(self._dsize) * N.EXT
        self._wake_fd = wake_fd
        self.card_pid = self._hv.identity.card_pid  # the acker, which created the volume
        self._held: dict[int, int] = {}  # io_id -> handoff position of its payload
        self._n_dup = 0
        # (cg_id, cg_seq) of writes the acker refused since the last take: hold
        # skips those seqs at once (`Hold.skip`) instead of waiting them out
        self.skipped: list[tuple[int, int]] = []
        # (cg_id, cg_seq, vdisk_id, offset, length) of acked writes found bad since the last take: the
        # pipeline flags its CG's later writes GAP until their region is covered (`Hold.open_gap`)
        self.gaps: list[tuple[int, int, int, int, int]] = []

    @property
    def on_refused(self) -> Refused | None:
        """``(io_id, vdisk_id, offset, length, reason)``: where a payload
        found bad after its ack is reported (the card's lost log)."""
        return self._on_refused

    @on_refused.setter
    def on_refused(self, fn: Refused | None) -> None:
        if fn is None and self._verify:
            raise ValueError("HandoffEndpoint verifies payload checksums but has no on_refused (the card's lost "
                             "log): a payload found bad after its ack would be dropped without a trace (P1); pass "
                             "on_refused, or verify_checksums=False")
        self._on_refused = fn

    def poll(self, max_entries: int = 256) -> list[AugmentedWrite | Outcome]:
        ho = self.handoff
        hc = ho.c
        pos = hc[_C]
        end = hc[_P]
        if end == pos:
            return []
        if end - pos > max_entries:
            end = pos + max_entries
        slots, flags, mask = ho.slots, ho.flags, ho.mask
        data, size, held = self._data, self._dsize, self._held
        out: list[AugmentedWrite | Outcome] = []
        append = out.append
        verify, skipped = self._verify, self.skipped
        match = self.match
        now = monotonic_ns() if match is not None else 0
        first = pos & mask
        last = first + (end - pos)  # slots first..last-1, in at most two runs (the queue wraps)
        runs = (slots[first << 6: last << 6],) if last <= ho.n else (
            slots[first << 6:], slots[: (last - ho.n) << 6])
        for run in runs:  # descriptors read in bulk: no call per slot
            for (kind, wflags, dflags, status, length, io_id, cg_seq, cg_id, vdisk_id, voffset, ts, data_pos,
                 csum, _seq) in desc_iter(run):
                s = pos & mask
                if kind == K_OUTCOME:
                    flags[s] = RELEASED
                    o = new_outcome(Outcome)
                    set_io(o, io_id)
                    set_status(o, STATUSES[status])
                    append(o)
                    if match is not None:
                        if dflags & REAL_HALF:
                            match.real(io_id, now)
                        else:
                            match.outcome(io_id, not status)
                elif flags[s] & REFUSED:
                    flags[s] = REFUSED | RELEASED  # only its payload space to free, in order
                    skipped.append((cg_id, cg_seq))
                elif kind == K_WRITE:
                    off = data_pos % size
                    payload = data[off: off + length]  # one view: hashed here, handed on
                    if io_id in held:
                        self._n_dup += 1
                        log.error("ring: io %d handed off twice while held: the second copy is ignored", io_id)
                        flags[s] = RELEASED
                    elif verify and dflags & DF_CSUM and xxh3(payload) & M32 != csum:
                        self._bad_payload(io_id, vdisk_id, voffset, length, data_pos)
                        flags[s] = REFUSED | RELEASED  # freed in order, after the lost log has it
                        self.gaps.append((cg_id, cg_seq, vdisk_id, voffset, length))  # before its skip
                        skipped.append((cg_id, cg_seq))
                    else:
                        held[io_id] = pos
                        w = new_write(AugmentedWrite)  # = AugmentedWrite(io_id, ..., payload), no __init__ call
                        w.io_id = io_id
                        w.cg_id = cg_id
                        w.cg_seq = cg_seq
                        w.vdisk_id = vdisk_id
                        w.op = OPS[kind]
                        w.flags = WFLAGS[wflags]
                        w.voffset = voffset
                        w.length = length
                        w.timestamp_ns = ts
                        w.data = payload
                        append(w)
                        if match is not None:
                            match.fake(io_id, now)
                else:  # ZERO / TRIM / BARRIER: no payload to hold
                    flags[s] = RELEASED
                    append(AugmentedWrite(io_id, cg_id, cg_seq, vdisk_id, OPS[kind], WFLAGS[wflags], voffset,
                                          length, ts, None))
                pos += 1
        hc[_C] = pos
        if hc[_F] < pos and flags[hc[_F] & mask] & RELEASED:
            ho.advance_floor(pos, self._set_head)
        return out

    def _bad_payload(self, io_id: int, vdisk_id: int, voffset: int, length: int, data_pos: int) -> None:
        """An acked write whose payload does not match its checksum: never
        shipped; the host learns it from the lost log and resyncs the region."""
        self.handoff.c[_BADC] += 1  # in the shared header: the card's total across worker restarts
        log.error("ring: io %d (vdisk %d, %d bytes at %d, payload at %d) was acked but its payload does not "
                  "match its checksum: not shipped, its region goes to the lost log", io_id, vdisk_id, length,
                  voffset, data_pos)
        self._on_refused(io_id, vdisk_id, voffset, length, reason_name(R.AckReason.BAD_CHECKSUM))  # type: ignore[misc]

    def release(self, io_id: int) -> None:
        try:
            pos = self._held.pop(io_id)
        except KeyError:
            raise KeyError(f"ring: io {io_id} is not held by the card (never received, or released twice)") from None
        ho = self.handoff
        ho.flags[pos & ho.mask] |= RELEASED
        if pos == ho.c[_F]:
            ho.advance_floor(ho.c[_C], self._set_head)

    def release_many(self, io_ids: list[int]) -> None:
        """`release` for many (a durable batch's writes): the floor moves once."""
        held, ho = self._held, self.handoff
        flags, mask = ho.flags, ho.mask
        pop = held.pop
        try:
            for io_id in io_ids:
                flags[pop(io_id) & mask] |= RELEASED
        except KeyError:
            raise KeyError(f"ring: io {io_id} is not held by the card (never received, or released twice)") from None
        finally:
            c = ho.c
            if c[_F] < c[_C] and flags[c[_F] & mask] & RELEASED:
                ho.advance_floor(c[_C], self._set_head)

    def _set_head(self, end: int) -> None:
        self._ctr[DATA_HEAD] = end

    def fill(self) -> float:
        """How full the card's memory for acked, unfinished writes is: the
        ring's data area or the handoff queue, whichever is fuller (both
        free only from their oldest unfinished write)."""
        c = self.handoff.c
        return max(max(0, c[_DX] - self._ctr[DATA_HEAD]) / self._dsize, (c[_P] - c[_F]) / self.handoff.n)

    def set_full(self, full: bool) -> None:
        """Ask the acker to refuse writes (FULL) while nothing can take them."""
        self.handoff.c[_FULL] = 1 if full else 0

    def heartbeat(self) -> None:
        now = self.handoff.c[_WHB] = monotonic_ns()
        if self.match is not None:
            self.match.expire(now)

    def set_sleeping(self, sleeping: bool) -> None:
        self.handoff.c[_WSTATE] = SLEEPING if sleeping else POLLING

    def set_napping(self, until_ns: int) -> None:
        """A timer sleep of the worker until ``until_ns`` (0: over): no ring
        needed, and its unread entries are not "behind" until then."""
        c = self.handoff.c
        if until_ns:
            c[_NAPU] = until_ns
            c[_WSTATE] = NAPPING
        else:
            c[_WSTATE] = POLLING

    def doorbell_fd(self) -> int:
        return self._wake_fd

    def pending(self) -> bool:
        c = self.handoff.c
        return c[_P] != c[_C]

    def statistics(self) -> dict:
        """The ring endpoint's statistics as the acker last stored them (the
        same keys as `RingEndpoint.statistics`), plus the handoff queue."""
        c, ho = self._ctr, self.handoff
        g = ho.get
        return {
            "entries": c[R.CardCounter.ENTRIES], "writes": c[R.CardCounter.WRITES],
            "outcomes": c[R.CardCounter.OUTCOMES], "bad": g(H.BAD), "bytes": c[R.CardCounter.BYTES],
            "sleeps": c[R.CardCounter.SLEEPS], "wakeups": c[R.CardCounter.WAKEUPS],
            "released": c[DATA_HEAD], "held": len(self._held),
            "held_bytes": max(0, g(H.DATA_EXPECT) - c[DATA_HEAD]), "cq_full": g(H.CQ_FULL),
            "refused_full": g(H.REFUSED_FULL), "host_pid": g(H.HOST_PID),
            "handoff": dict(ho.statistics(), duplicates=self._n_dup),
        } | ({"guard_errors": g(H.GUARD_ERRORS), "pi_errors": g(H.PI_ERRORS)} if self._nvme else {}) | (
            dict(self.match.statistics(), device_errors=g(H.DEV_ERRORS), device_bytes=g(H.DEV_BYTES))
            if self.match is not None else {})

    def close(self) -> None:
        self._held.clear()
        self._data = None
        self._ctr = None
        self._hv.close()
