"""Online verify: production against the journal's latest point in time,
block by block, while writes go on (``nicsplit verify CG [--repair]``).

Theory of operation
===================
Production is read through the running host (it owns the vdisks while it
runs): NBD READs on its exports (`nicsplit.recovery.nbdclient`), the very
bytes a client reads. The replica side is the CG's image at a PIT read from
the journal (`nicsplit.recovery.reader.PitReader`): what a restore, an
image or failover (the replica images are distributed from the same
records) gives back. Both are cut into 4 KiB blocks and compared by
fingerprint (xxh3-128, `nicsplit.wire.frames.fingerprint`), ``chunk`` bytes
(1 MiB) at a time, so memory stays bounded whatever the vdisk's size.

Writes keep arriving, so one comparison is not proof:

1. *Pass.* Ask the host for a barrier in the CG's stream (the card acks
   it; every write acknowledged before has a lower seq), wait until the
   journal holds the first consistent PIT S at or after it, and compare
   every block of production with the image at S. A block that differs is
   a *candidate*: a real difference, or a write that raced the pass.
2. *Re-check* (up to ``rounds`` times, candidates only). Read the
   candidates from production (r1), take a new barrier and wait for its PIT
   S', read the candidates at S' (p), read production again (r2).
   - r1 == r2 == p: the block is equal (the pass saw a write in flight).
   - r1 == r2 != p: *differing*. A write that landed before r1 took its seq
     before the barrier, so it is in S'; one that landed between r1 and r2
     changes r1 != r2. Only a write that took its seq before the barrier and
     reached the datastore only after r2 (longer than the journal took to
     reach S') could fake it.
   - r1 != r2: written meanwhile; checked again in the next round, and
     reported as *unsettled* when every round saw it change.

A CG that is marking or resyncing has no consistent PIT to compare with:
the host refuses the barrier and verify says why (wait for the resync).

Repair (``--repair``): the differing ranges are marked dirty on the host
(control command ``mark``), so the vdisk enters marking and its automatic
resync (`nicsplit.host.resync`) copies them from production into the
stream like any marked region; once the vdisk is protected again, verify
runs again. Production is the reference: repair makes the journal (and so
every later PIT and the replica) equal to production, never the reverse.

Example::

    report = verify_cg(cfg, "cg1")
    report.differing  # [Difference(vdisk="a", offset=8192, length=4096)]
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nicsplit.core import ctl
from nicsplit.core.config import Config
from nicsplit.core.layout import Layout
from nicsplit.core.records import BLOCK_SIZE
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.nbdclient import NbdClient, NbdError
from nicsplit.recovery.reader import PitReader
from nicsplit.recovery.restore import host_uri
from nicsplit.recovery.select import cg_vdisks, check_cg, wait_for_pit
from nicsplit.wire.frames import fingerprint

__all__ = ["Difference", "VerifyReport", "verify_cg", "repair_cg", "verify_and_repair", "CHUNK"]

# 1 MiB per comparison step: 256 fingerprints a side, a few ms of reading;
# the only buffers verify holds are two of these.
CHUNK = 1 << 20
# A candidate block is re-checked this many times before it is called
# unsettled (each round costs one barrier and a journal round trip).
ROUNDS = 3
# Ranges per `mark` request: 1,000 of at most ~45 bytes of JSON each stay
# well under the 64 KiB line a control socket reads (asyncio's default limit).
MARK_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Difference:
    """A run of 4 KiB blocks of ``vdisk`` that differ (or kept changing)."""
    vdisk: str
    offset: int
    length: int

    def to_json(self) -> dict[str, Any]:
        return {"vdisk": self.vdisk, "offset": self.offset, "length": self.length}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    cg: str
    seq: int                 # the PIT the pass compared with
    vdisks: list[str]
    bytes_compared: int
    differing: list[Difference]
    unsettled: list[Difference]  # written during every re-check round
    seconds: float
    rechecked: int           # blocks the pass found different, then re-checked
    repaired: list[Difference] | None = field(default=None)  # with --repair: what the first run found

    @property
    def clean(self) -> bool:
        return not self.differing and not self.unsettled

    def to_json(self) -> dict[str, Any]:
        out = {"cg": self.cg, "seq": self.seq, "vdisks": self.vdisks, "bytes_compared": self.bytes_compared,
               "differing": [d.to_json() for d in self.differing],
               "unsettled": [d.to_json() for d in self.unsettled], "rechecked": self.rechecked,
               "seconds": round(self.seconds, 3)}
        if self.repaired is not None:
            out["repaired"] = [d.to_json() for d in self.repaired]
        return out


# -- the host: production, barriers, marking ---------------------------------------------


def _host(cfg: Config, cmd: dict, what: str, timeout: float = 10.0) -> dict:
    reply = ctl.request(Layout(cfg.data).host_sock, cmd, timeout=timeout)
    if reply is None:
        raise RecoveryError(f"{what}: the host did not answer on {Layout(cfg.data).host_sock} (is it running? "
                            "verify reads production through it: nicsplit up)")
    if not reply.get("ok"):
        raise RecoveryError(f"{what}: {reply.get('error')}")
    return reply


def _barrier_pit(cfg: Config, cg: str, jd: Path, idx: BlockIndex | None, timeout: float) -> tuple[BlockIndex, int]:
    """A barrier, then the first consistent PIT at or after it once journaled."""
    at = int(_host(cfg, {"cmd": "barrier", "cg": cg}, f"cannot verify {cg}")["seq"])
    if idx is None:
        deadline = time.monotonic() + timeout
        while not jd.is_dir():  # the CG's first batch is on its way
            if time.monotonic() >= deadline:
                raise RecoveryError(f"consistency group {cg} has no journal yet (is the card shipping? "
                                    "see 'nicsplit status')")
            time.sleep(0.01)  # polling the file system: the appliance has no push channel to us
        idx = BlockIndex(jd)
    return idx, wait_for_pit(idx.pits, at, timeout).seq


# -- fingerprints ------------------------------------------------------------------------


def _blocks(offset: int, data: bytes) -> list[tuple[int, bytes]]:
    """(block offset, fingerprint) of each 4 KiB block of ``data`` read at ``offset``."""
    mv = memoryview(data)
    return [(offset + i, fingerprint(mv[i:i + BLOCK_SIZE])) for i in range(0, len(data), BLOCK_SIZE)]


def _runs(blocks: list[int], size: int) -> list[tuple[int, int]]:
    """Sorted block offsets merged into (offset, length) runs, clipped to ``size``."""
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        n = min(BLOCK_SIZE, size - b)
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((b, n))
    return out


def _pieces(runs: list[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    """Runs cut into reads of at most ``chunk`` bytes (block aligned)."""
    out = []
    for off, n in runs:
        for o in range(off, off + n, chunk):
            out.append((o, min(chunk, off + n - o)))
    return out


def _fps(read: Callable[[int, int], bytes], runs: list[tuple[int, int]], chunk: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for off, n in _pieces(runs, chunk):
        out.update(_blocks(off, read(off, n)))
    return out


# -- verify ------------------------------------------------------------------------------


def verify_cg(cfg: Config, cg: str, *, chunk: int = CHUNK, rounds: int = ROUNDS, timeout: float = 60.0,
              progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Compare every vdisk of ``cg`` in production with the journal's image
    at a PIT taken now (module docstring); the differing runs of blocks.
    ``progress(done, total)`` follows the pass (bytes of all the vdisks)."""
    if chunk <= 0 or chunk % BLOCK_SIZE:
        raise RecoveryError(f"verify chunk {chunk} is not a positive multiple of {BLOCK_SIZE}")
    t0 = time.monotonic()
    vds = cg_vdisks(cfg, cg)
    jd = check_cg(cfg.data, cg)
    st = _host(cfg, {"cmd": "status"}, f"cannot verify {cg}")["status"]
    if cg in st.get("fenced", []):
        raise RecoveryError(f"consistency group {cg} is failed over to the appliance: production is the "
                            "appliance's copy, there is nothing to compare (fail back first)")
    idx, seq = _barrier_pit(cfg, cg, jd, None, timeout)
    first_seq = seq
    compared = 0
    cand: dict[str, list[int]] = {}
    with contextlib.ExitStack() as stack:
        prod: dict[str, NbdClient] = {}
        for v in vds:
            try:
                prod[v.name] = stack.enter_context(
                    NbdClient(host_uri(st.get("addresses", []), v.name), readonly_ok=True))
            except (NbdError, OSError) as e:
                raise RecoveryError(f"cannot read vdisk {v.name} from the host: {e}") from None
        # 1. The pass: everything, at PIT seq.
        reader = stack.enter_context(PitReader(jd, vds, seq, index=idx))
        total = sum(v.size for v in vds)
        for v in vds:
            c = prod[v.name]
            for off in range(0, v.size, chunk):
                n = min(chunk, v.size - off)
                a, b = c.read(off, n), reader.pread(v.id, off, n)
                compared += n
                if progress:
                    progress(compared, total)
                if a != b:
                    cand.setdefault(v.name, []).extend(
                        o for (o, fa), (_, fb) in zip(_blocks(off, a), _blocks(off, b)) if fa != fb)
        # 2. Re-check rounds: candidates only.
        rechecked = sum(len(bl) for bl in cand.values())
        size = {v.name: v.size for v in vds}
        vid = {v.name: v.id for v in vds}
        differing: dict[str, list[int]] = {}
        for _ in range(rounds):
            cand = {k: bl for k, bl in cand.items() if bl}
            if not cand:
                break
            runs = {k: _runs(bl, size[k]) for k, bl in cand.items()}
            r1 = {k: _fps(prod[k].read, runs[k], chunk) for k in runs}
            idx, seq = _barrier_pit(cfg, cg, jd, idx, timeout)
            with PitReader(jd, vds, seq, index=idx) as rd:
                p = {k: _fps(lambda o, n, i=vid[k]: rd.pread(i, o, n), runs[k], chunk) for k in runs}
            r2 = {k: _fps(prod[k].read, runs[k], chunk) for k in runs}
            nxt: dict[str, list[int]] = {}
            for k in runs:
                for b in cand[k]:
                    if r1[k][b] != r2[k][b]:
                        nxt.setdefault(k, []).append(b)  # written meanwhile: again
                    elif r2[k][b] != p[k][b]:
                        differing.setdefault(k, []).append(b)
            cand = nxt
    order = [v.name for v in vds]

    def report(blocks: dict[str, list[int]]) -> list[Difference]:
        return [Difference(k, o, n) for k in order for o, n in _runs(blocks.get(k, []), size[k])]

    return VerifyReport(cg, first_seq, order, compared, report(differing), report(cand),
                        time.monotonic() - t0, rechecked)


def repair_cg(cfg: Config, cg: str, differing: list[Difference], *, timeout: float = 120.0) -> None:
    """Mark ``differing`` dirty on the host and wait until the CG's vdisks
    are protected again (their resync copied production into the stream)."""
    by: dict[str, list[list[int]]] = {}
    for d in differing:
        by.setdefault(d.vdisk, []).append([d.offset, d.length])
    for name, ranges in by.items():
        for i in range(0, len(ranges), MARK_BATCH):
            _host(cfg, {"cmd": "mark", "vdisk": name, "ranges": ranges[i:i + MARK_BATCH]}, f"cannot repair {name}")
    names = set(by)
    deadline = time.monotonic() + timeout
    while True:
        st = _host(cfg, {"cmd": "status"}, f"cannot repair {cg}")["status"]
        left = [f"{v['name']} ({v.get('state')}, {v.get('dirty_bytes', 0)} bytes dirty)"
                for v in st.get("vdisks", []) if v.get("name") in names and v.get("state") != "protected"]
        if not left:
            return
        if time.monotonic() >= deadline:
            raise RecoveryError(f"repair of {cg} did not finish within {timeout:g} s: {', '.join(left)} "
                                "(is the card attached? see 'nicsplit status')")
        time.sleep(0.05)  # polling the host's status: it has no push channel to us


def verify_and_repair(cfg: Config, cg: str, *, timeout: float = 120.0, **kw: Any) -> VerifyReport:
    """Verify; resync what differs; verify again. The second report, with
    ``repaired`` the first one's differing runs."""
    t0 = time.monotonic()
    first = verify_cg(cfg, cg, timeout=timeout, **kw)
    if not first.differing:
        return VerifyReport(**{**_fields(first), "repaired": []})
    repair_cg(cfg, cg, first.differing, timeout=timeout)
    again = verify_cg(cfg, cg, timeout=timeout, **kw)
    return VerifyReport(**{**_fields(again), "repaired": first.differing, "seconds": time.monotonic() - t0})


def _fields(r: VerifyReport) -> dict[str, Any]:
    return {k: getattr(r, k) for k in VerifyReport.__slots__}
