"""Distribution: a CG's journal applied in seq order to replica images,
keeping undo data (RecoverPoint's do/undo).

Theory of operation
===================
`Distributor` applies the journal in seq order to one image per vdisk
(``Layout.replica(cg) / vdisk+<id>.img``, sealed at rest when the keyring has
an active key: `nicsplit.storage.image`); before a step touches the images
it appends the bytes each record replaces to the undo log (write-ahead,
fsynced), then writes and fsyncs the images, then atomically persists
``applied_seq``.  `undo_to(seq)` rolls the replica back to an earlier PIT by
laying the undo entries newer than it over the images in reverse order.
Records are found through the block index (`nicsplit.recovery.blockindex`)
and read like the PIT reader reads them (`nicsplit.recovery.reader`).
docs/recovery.md §4–5 give the formats and invariants.

Rules
-----
1. Nothing here writes a journal file or a production vdisk.
2. Undo before do: an undo entry is durable before the image bytes it
   describes change.  Hence at open, the undo entries after the persisted
   ``undo_end`` belong to the step that was interrupted; laying them back in
   reverse order returns the images exactly to ``applied_seq`` (harmless when
   the images had not been touched yet), after which the tail is cut.
3. ``state.json`` is replaced atomically (tmp, fsync, rename, fsync dir) and
   only after the images and the undo log were fsynced.
4. A rollback first persists its intent (``rollback_to``); applying undo
   entries newest first is idempotent, so a crash mid-rollback is finished at
   the next open.
5. Failpoints (`Distributor.failpoint`) are called at every step of the
   protocol above; tests raise from them to cut the protocol anywhere.
6. Images are keyed by vdisk id (``vdisk+ID.img``, `nicsplit.core.layout.
   vdisk_file`), never by name: a vdisk deleted and created again under its
   name is a new vdisk with a new, empty image. At open, the old layout's
   ``NAME.img`` (and sidecars) are renamed to their id's file; a name that
   several of the replica's vdisks had (their writes went into one shared
   file) makes the replica untrustworthy: it is discarded and rebuilt from
   the journal (and the base images, if retention trimmed it).

Example::

    d = Distributor(journal_dir, Layout(data).replica("cg1"), vdisks_of_cg)
    while d.step(256): pass
"""

from __future__ import annotations

import bisect
import json
import logging
import operator
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nicsplit.core import failpoints as _failpoints
from nicsplit.core.fsutil import fsync_dir, punch_hole
from nicsplit.core.layout import VDISK_FILE_PREFIX, migrate_name_keyed, vdisk_file
from nicsplit.core.records import BLOCK_SIZE, Op
from nicsplit.recovery.base import BaseImages, base_of_journal
from nicsplit.recovery.blockindex import BlockIndex, ReplicaError, shared_index
from nicsplit.recovery.coalesce import IMAGE, aligned, plan
from nicsplit.recovery.reader import RecordSource, VdiskLike
from nicsplit.recovery.undolog import (
    STATE_VERSIONS, UNDO_HEAD, STATE_VERSION, UID_SIZE, UNDO_DATA, UNDO_IMAGE, UNDO_MAGIC, UNDO_SEALED, UNDO_ZEROS,
    body_len, build_entries, crc_len, Kept, undo_key_usage,
)
from nicsplit.storage import atrest
from nicsplit.storage.blob import BlobSealer
from nicsplit.storage.image import Image, open_image
from nicsplit.storage.rekey import REKEY_SUFFIX
from nicsplit.storage.sealing import TAGS_SUFFIX
from nicsplit.storage.sealing import SealedError, pwritev_all
from nicsplit.core.crc32 import crc32

_FP = _failpoints.ACTIVE  # armed failpoints (nicsplit.core.failpoints)

log = logging.getLogger("nicsplit.recovery.replica")

__all__ = ["Distributor", "DistributorStatistics", "undo_key_usage", "UNDO_MAGIC", "UNDO_DATA", "UNDO_ZEROS",
           "UNDO_SEALED", "UNDO_IMAGE", "STATE_VERSION"]

@dataclass(frozen=True, slots=True)
class DistributorStatistics:
    applied_seq: int
    undo_floor: int  # the oldest seq the replica can be rolled back to
    undo_entries: int
    undo_bytes: int
    records_applied: int  # since open
    records_skipped: int  # records of vdisks not in this replica (since open)
    recovered_entries: int  # undo entries laid back at open (an interrupted step or rollback)


IMAGE_SIDECARS = (TAGS_SUFFIX, REKEY_SUFFIX)  # files beside a sealed image that move with it


# A run of writes to coalesce is cut at this many bytes (a step is at most
# STEP_BYTES anyway): the joined copy stays small.
RUN_BYTES = 4 << 20


def _read_runs(imgs: dict[int, Image], spans: list[tuple[int, int, int]]) -> list[memoryview]:
    """The current bytes of each (vdisk id, start, end) in ``spans``, read
    with one pread per run of consecutive spans of one image that touch or
    overlap the run so far (a sequential stream: one read for the step)."""
    out: list[memoryview] = []
    i = 0
    while i < len(spans):
        vid, r0, r1 = spans[i]
        j = i + 1
        while j < len(spans) and spans[j][0] == vid and r0 <= spans[j][1] <= r1 and \
                max(r1, spans[j][2]) - r0 <= RUN_BYTES:
            r1 = max(r1, spans[j][2])
            j += 1
        buf = memoryview(imgs[vid].pread(r0, r1 - r0))
        out.extend(buf[a0 - r0 : a1 - r0] for _, a0, a1 in spans[i:j])
        i = j
    return out


def _runs(changes: Iterable[tuple[int, int, int, bytes | None]]) -> Iterator[tuple[int, int, int, bytes | None]]:
    """``changes`` in order, consecutive data writes that continue each other
    on one image joined into one (zeroing stays as it is: it punches holes)."""
    run: list[bytes] = []
    rvid = rstart = rend = -1
    for vid, off, length, data in changes:
        if data is not None and run and vid == rvid and off == rend and rend - rstart + length <= RUN_BYTES:
            run.append(data)
            rend += length
            continue
        if run:
            yield rvid, rstart, rend - rstart, run[0] if len(run) == 1 else b"".join(run)
            run = []
        if data is None:
            yield vid, off, length, None
            continue
        run, rvid, rstart, rend = [data], vid, off, off + length
    if run:
        yield rvid, rstart, rend - rstart, run[0] if len(run) == 1 else b"".join(run)


class Distributor:
    """Applies a CG's journal to replica images, keeping undo data.  One
    instance per replica directory; not thread-safe (one distribution task)."""

    def __init__(self, journal_dir: str | Path, replica_dir: str | Path, vdisks: Iterable[VdiskLike], *,
                 index: BlockIndex | None = None, journal: Any | None = None,
                 failpoint: Callable[[str], None] | None = None, refresh: bool = True,
                 keyring: Any = "auto", handoff: Any | None = None) -> None:
        """``refresh=False``: the index's owner refreshes it (the appliance,
        after each group commit, while no append runs); steps never do.
        ``keyring``: seals new images and undo entries (at-rest encryption);
        "auto" = the data directory's keyring.  ``handoff``: payloads ingest
        just journaled (`distribution.PayloadHandoff`), taken before reading."""
        self.journal_dir = Path(journal_dir)
        self.dir = Path(replica_dir)
        self._refresh = refresh
        self.vdisks = {v.id: v for v in vdisks}
        self.index = index if index is not None else shared_index(self.journal_dir)
        self.failpoint = failpoint
        self._src = RecordSource(self.journal_dir, journal)
        self._handoff = handoff
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if created:
            fsync_dir(self.dir.parent)
        self._migrate()
        self.keyring = atrest.keyring_for_images(self.dir) if keyring == "auto" else keyring
        self._sealer = BlobSealer(self.keyring, b"replica undo")
        self._imgs: dict[int, Image] = {}
        for v in self.vdisks.values():
            # sparse; a grown vdisk grows its image
            self._imgs[v.id] = open_image(self.image_path(v), v.size, self.keyring, writable=True, create=True)
        self._undo_path = self.dir / "undo.log"
        (self.dir / "undo.log.rekey").unlink(missing_ok=True)  # a rekey cut before its rename: the log is intact
        self._undo = os.open(self._undo_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fsync_dir(self.dir)
        self._undo_seq = array("Q")  # per undo entry: seq ...
        self._undo_off = array("Q")  # ... and offset in undo.log
        self._applied = self._skipped = self._recovered = 0
        st = self._read_state()
        self.applied_seq: int = st["applied_seq"]
        self.undo_floor: int = st["undo_floor"]
        self._undo_end: int = st["undo_end"]
        self._undo_start: int = st.get("undo_start", 0)  # entries before it were trimmed (a hole)
        self._recover(st.get("rollback_to"))
        if self.applied_seq == 0 and self._undo_end == 0:
            self._seed_from_base()

    def _seed_from_base(self) -> None:
        """A new replica of a journal that retention trimmed starts from the
        base images (the records up to the base seq are gone): copy their
        data, fsync, then persist applied_seq = the base seq. A crash before
        that re-seeds at the next open (the copy overwrites what it wrote)."""
        with BaseImages(base_of_journal(self.journal_dir),
                        {v.id: v.size for v in self.vdisks.values()}) as base:
            if not base.seq:
                return
            for vid, img in self._imgs.items():
                for off, length in base.extents(vid, 0, self.vdisks[vid].size):
                    for at in range(off, off + length, 4 << 20):
                        n = min(4 << 20, off + length - at)
                        img.pwrite(base.pread(vid, at, n), at)
                img.fsync()
            self.undo_floor = base.seq
            self._write_state(base.seq, 0)
            self.applied_seq = base.seq
            log.info("replica %s: seeded from the base images at seq %d (the journal before it was trimmed)",
                     self.dir, base.seq)

    # -- files -------------------------------------------------------------------------

    def image_path(self, v: VdiskLike) -> Path:
        return vdisk_file(self.dir, v.id, ".img")

    def _migrate(self) -> None:
        """Rule 6: the old name-keyed images to id-keyed ones; a replica whose
        image one name shared between vdisks is discarded (rebuilt)."""
        shared = migrate_name_keyed(self.dir, self.vdisks.values(), ".img", IMAGE_SIDECARS)
        if not shared:
            return
        log.warning("replica %s: vdisks %s were deleted and created again under their names while the replica "
                    "kept one image per name; their images mixed both vdisks' data: discarding the replica and "
                    "rebuilding it from the journal", self.dir, ", ".join(shared))
        doomed = {f"{n}.img{t}" for n in shared for t in ("", *IMAGE_SIDECARS)}
        for p in self.dir.iterdir():
            if p.name in doomed or p.name.startswith(VDISK_FILE_PREFIX) or \
                    p.name in ("undo.log", "undo.log.rekey", "state.json", "state.json.tmp"):
                p.unlink()
        fsync_dir(self.dir)

    def _read_state(self) -> dict:
        p = self.dir / "state.json"
        try:
            st = json.loads(p.read_text())
        except FileNotFoundError:
            return {"applied_seq": 0, "undo_end": 0, "undo_floor": 0, "rollback_to": None, "undo_start": 0}
        except ValueError as e:
            raise ReplicaError(f"{p}: unreadable ({e})") from None
        if st.get("version") not in STATE_VERSIONS:
            raise ReplicaError(f"{p}: version {st.get('version')!r} not supported")
        return st

    def _write_state(self, applied: int, undo_end: int, rollback_to: int | None = None) -> None:
        p = self.dir / "state.json"
        tmp = self.dir / "state.json.tmp"
        body = json.dumps({"version": STATE_VERSION, "applied_seq": applied, "undo_end": undo_end,
                           "undo_floor": self.undo_floor, "rollback_to": rollback_to,
                           "undo_start": self._undo_start})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, p)
        fsync_dir(self.dir)

    def _fp(self, name: str) -> None:
        if self.failpoint is not None:
            self.failpoint(name)
        if _FP:
            _failpoints.hit("replica." + name)

    def images(self) -> dict[int, Image]:
        """The replica images by vdisk id (for key usage and rekeying)."""
        return dict(self._imgs)

    def close(self) -> None:
        for img in self._imgs.values():
            img.close()
        self._imgs.clear()
        if self._undo >= 0:
            os.close(self._undo)
            self._undo = -1
        self._src.close()

    def __enter__(self) -> "Distributor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- undo log -------------------------------------------------------------------------

    def _scan_undo(self, start: int, end: int | None) -> tuple[list[tuple[int, int]], int]:
        """(seq, offset) of the valid entries in [start, end) (to the first
        invalid one when ``end`` is None) and the offset after the last."""
        size = os.fstat(self._undo).st_size
        stop = size if end is None else end
        out = []
        pos = start
        while pos + UNDO_HEAD.size <= stop:
            head = os.pread(self._undo, UNDO_HEAD.size, pos)
            magic, kind, seq, vid, off, length, crc = UNDO_HEAD.unpack(head)
            n = body_len(kind, length)
            if magic != UNDO_MAGIC or n is None or pos + UNDO_HEAD.size + n > stop:
                if end is not None:
                    raise ReplicaError(f"{self._undo_path}: bad undo entry at offset {pos} (before undo_end {end})")
                break
            out.append((seq, pos))
            pos += UNDO_HEAD.size + n
        return out, pos

    def _read_undo(self, pos: int) -> tuple[int, int, int, int, Any]:
        """(seq, vdisk, offset, length, the replaced bytes: bytes, None for
        zeros, a `Kept` for an UNDO_IMAGE entry) of the entry at ``pos``."""
        head = os.pread(self._undo, UNDO_HEAD.size, pos)
        magic, kind, seq, vid, off, length, crc = UNDO_HEAD.unpack(head)
        n = body_len(kind, length)
        data = os.pread(self._undo, n, pos + UNDO_HEAD.size) if n else b""
        if magic != UNDO_MAGIC or n is None or len(data) != n or \
                crc32(memoryview(data)[: crc_len(kind, n, length)], crc32(head[:36])) != crc:
            raise ReplicaError(f"{self._undo_path}: undo entry at offset {pos} fails its check")
        if kind == UNDO_ZEROS:
            return seq, vid, off, length, None
        if kind == UNDO_IMAGE:
            v = memoryview(data)
            e = n - length
            return seq, vid, off, length, Kept(bytes(v[:UID_SIZE]), v[UID_SIZE:e], v[e:])
        if kind == UNDO_SEALED:
            try:
                data = self._sealer.open(data, head[:36])
            except SealedError as e:
                raise ReplicaError(f"{self._undo_path}: undo entry at offset {pos}: {e}") from None
        return seq, vid, off, length, data

    def _lay_back(self, offsets: list[int]) -> None:
        """Apply the undo entries at ``offsets`` newest first, fsync images.
        Replaced bytes go through `_apply` (runs joined); an UNDO_IMAGE
        entry's blocks are put back as stored, after the newer changes before
        it were written (order matters where entries overlap)."""
        point = "undo-entry-applied"
        touched: dict[int, Image] = {}
        changes: list[tuple[int, int, int, bytes | None]] = []
        for pos in reversed(offsets):
            _, vid, off, length, data = self._read_undo(pos)
            img = self._imgs.get(vid)
            if img is None:
                raise ReplicaError(f"{self._undo_path}: undo entry for vdisk id {vid}, which this replica lacks")
            if not isinstance(data, Kept):
                changes.append((vid, off, length, data))
                continue
            self._apply(changes, point, touched)
            changes = []
            if getattr(img, "uid", None) != data.uid:
                raise ReplicaError(f"{self._undo_path}: undo entry at offset {pos} keeps blocks of another "
                                   f"image than {img.path} (it was created again)")
            try:
                for i, entry, ct in data.blocks():
                    img.write_stored_block(off // BLOCK_SIZE + i, entry, ct)
            except SealedError as e:
                raise ReplicaError(f"{self._undo_path}: undo entry at offset {pos}: {e}") from None
            touched[vid] = img
            self._fp(point)
        self._apply(changes, point, touched)
        for img in touched.values():
            img.fsync()

    def _write_images(self, changes: Iterable[tuple[int, int, int, bytes | None]], point: str) -> None:
        """`_apply` the changes, then fsync the images written."""
        touched: dict[int, Image] = {}
        self._apply(changes, point, touched)
        for img in touched.values():
            img.fsync()

    def _apply(self, changes: Iterable[tuple[int, int, int, bytes | None]], point: str,
               touched: dict[int, Image]) -> None:
        """Write each (vdisk id, offset, length, data; None: zeros) to its
        image in order, passing fault point ``point`` after each, adding the
        images written to ``touched``.  Consecutive writes that continue each
        other (same image, the next starts where the previous ended) go as
        one write (`_runs`): one pwrite of the data and one of the tags."""
        for vid, off, length, data in _runs(changes):
            img = self._imgs[vid]
            if data is None:
                img.zero(off, length)
            else:
                img.pwrite(data, off)
            touched[vid] = img
            self._fp(point)

    def _recover(self, rollback_to: int | None) -> None:
        if self._undo_start:
            punch_hole(self._undo, 0, self._undo_start)  # a trim cut between its state and its punch
        entries, end = self._scan_undo(self._undo_start, self._undo_end)
        if rollback_to is not None:  # rule 4: finish an interrupted rollback
            self._undo_seq.extend(s for s, _ in entries)
            self._undo_off.extend(o for _, o in entries)
            log.warning("replica %s: finishing an interrupted rollback to seq %d", self.dir, rollback_to)
            self.undo_to(rollback_to)
            return
        tail, _ = self._scan_undo(self._undo_end, None)
        if tail:  # rule 2: a step was interrupted after its undo entries were written
            log.warning("replica %s: laying back %d undo entries of an interrupted step (applied seq %d)",
                        self.dir, len(tail), self.applied_seq)
            self._lay_back([o for _, o in tail])
            self._recovered += len(tail)
        if os.fstat(self._undo).st_size != self._undo_end:
            os.ftruncate(self._undo, self._undo_end)
            os.fsync(self._undo)
        self._undo_seq.extend(s for s, _ in entries)
        self._undo_off.extend(o for _, o in entries)

    # -- at-rest keys ---------------------------------------------------------------------

    def key_usage(self) -> dict[str, dict[int, int]]:
        """Which at-rest keys the replica needs: {"image_blocks": {key id:
        blocks}, "undo_entries": {key id: entries}} (sealed ones only)."""
        blocks: dict[int, int] = {}
        for img in self._imgs.values():
            for k, n in img.key_usage().items():
                blocks[k] = blocks.get(k, 0) + n
        return {"image_blocks": blocks,
                "undo_entries": undo_key_usage(self._undo_path, self._undo_end, self._undo_start)}

    def rekey(self) -> tuple[int, int]:
        """Re-seal under the active key every image block and undo entry
        sealed under another (after a key rotation), so the old key can be
        retired.  Returns (blocks, undo entries) re-sealed.  Between steps only
        (the distribution thread calls it)."""
        blocks = sum(img.rekey() for img in self._imgs.values() if img.sealed)
        return blocks, self._rekey_undo()

    def _rekey_undo(self) -> int:
        """Undo entries are re-sealed into a copy of the log, which replaces
        it atomically (same sizes, so every offset stays valid)."""
        active = self.keyring.active if self.keyring is not None else None
        use = undo_key_usage(self._undo_path, self._undo_end, self._undo_start)
        if active is None or not any(k != active for k in use):
            return 0
        tmp = self.dir / "undo.log.rekey"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        n = 0
        try:
            pos = self._undo_start  # a trimmed prefix stays a hole in the copy too
            while pos < self._undo_end:
                head = os.pread(self._undo, UNDO_HEAD.size, pos)
                _, kind, _, vid, off, length, _ = UNDO_HEAD.unpack(head)
                size = body_len(kind, length) or 0
                body = os.pread(self._undo, size, pos + UNDO_HEAD.size) if size else b""
                if kind == UNDO_SEALED and struct.unpack_from(">I", body)[0] != active:
                    data = self._read_undo(pos)[4]
                    body = self._sealer.seal(data, head[:36])
                    head = head[:36] + struct.pack(">I", crc32(body, crc32(head[:36])))
                    n += 1
                elif kind == UNDO_IMAGE and vid in self._imgs:
                    kept = self._read_undo(pos)[4]
                    if kept.key_ids() - {active}:
                        img = self._imgs[vid]
                        ents, cts = [], []
                        for i, entry, ct in kept.blocks():
                            if entry[:4] == b"\0\0\0\0":
                                ents.append(bytes(entry))
                                cts.append(bytes(ct))
                                continue
                            e2, c2 = img.reseal_stored_block(off // BLOCK_SIZE + i, entry, ct)
                            ents.append(e2)
                            cts.append(c2)
                        body = b"".join([kept.uid, *ents, *cts])
                        crc = crc32(body[: crc_len(kind, size, length)], crc32(head[:36]))
                        head = head[:36] + struct.pack(">I", crc)
                        n += 1
                os.pwrite(out, head + body, pos)
                pos += UNDO_HEAD.size + size
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, self._undo_path)
        fsync_dir(self.dir)
        old, self._undo = self._undo, os.open(self._undo_path, os.O_RDWR | os.O_CLOEXEC)
        os.close(old)
        return n

    # -- do / undo ------------------------------------------------------------------------

    def pending(self, upto_seq: int | None = None) -> int:
        """Indexed records not applied yet (those with seq <= ``upto_seq``)."""
        if self._refresh:
            self.index.refresh()
        end = len(self.index.rec_seq) if upto_seq is None else self.index.ordinal_upto(upto_seq) + 1
        return max(0, end - (self.index.ordinal_upto(self.applied_seq) + 1))

    def step(self, max_records: int = 256, upto_seq: int | None = None, max_bytes: int | None = None) -> int:
        """Apply up to ``max_records`` journaled records (undo first, rule 2);
        returns how many were applied (0 = caught up).  With ``upto_seq``
        nothing after that seq is applied (the appliance passes the journal's
        durable seq; failover a PIT), and once every record up to it is
        applied, ``applied_seq`` becomes ``upto_seq`` itself (when indexed).
        ``max_bytes`` bounds the payload bytes of one step too (at least one
        record), so a step of large records stays short."""
        ix = self.index
        if self._refresh:
            ix.refresh()
        nrec, pit_seq = ix.extent()
        if upto_seq is not None:
            if upto_seq <= self.applied_seq:
                return 0  # going back is undo_to's job
            nrec = min(nrec, ix.ordinal_upto(upto_seq) + 1)
            pit_seq = min(pit_seq, upto_seq)
        first = ix.ordinal_upto(self.applied_seq) + 1
        last = min(first + max_records, nrec)
        if max_bytes is not None and first < last:
            total, cut = 0, first
            while cut < last and (cut == first or total + ix.rec_len[cut] <= max_bytes):
                total += ix.rec_len[cut]
                cut += 1
            last = cut
        if first >= last:
            if pit_seq > self.applied_seq:  # only barriers since: the replica is at that PIT already
                self._write_state(pit_seq, self._undo_end)
                self.applied_seq = pit_seq
            return 0
        # The step's records as columns (array slices), not per-record lookups.
        vids = ix.rec_vdisk[first:last]
        vset = set(vids)
        if vset <= self._imgs.keys():  # every record is of this replica's vdisks (the common case)
            mine = list(range(first, last))
            seqs, offs, lens, ops = ix.rec_seq[first:last], ix.rec_off[first:last], ix.rec_len[first:last], \
                ix.rec_op[first:last]
        else:
            mine = [o for o in range(first, last) if ix.rec_vdisk[o] in self._imgs]
            vids, seqs, offs, lens, ops = ([col[o] for o in mine] for col in
                                           (ix.rec_vdisk, ix.rec_seq, ix.rec_off, ix.rec_len, ix.rec_op))
            vset = set(vids)
        self._skipped += (last - first) - len(mine)
        payloads = self._payloads(mine)
        if len(vset) == 1:
            sizes = [self.vdisks[vids[0]].size] * len(vids)
        else:
            sizes = [self.vdisks[v].size for v in vids]
        ends = list(map(operator.add, offs, lens))
        if any(map(operator.gt, ends, sizes)):
            i = next(i for i, (e, z) in enumerate(zip(ends, sizes)) if e > z)
            raise ReplicaError(f"record seq {seqs[i]}: {offs[i]}+{lens[i]} is past the end of vdisk "
                               f"{self.vdisks[vids[i]].name} ({sizes[i]} bytes)")
        # Every record covers whole blocks: the coalesced path (`coalesce`).
        rmod = BLOCK_SIZE.__rmod__
        whole = all(lens) and not any(map(rmod, offs)) and \
            (not any(map(rmod, lens)) or all(map(aligned, offs, lens, sizes)))
        final: dict[int, dict[int, Any]] | None = None
        if whole:
            undo, nundo, final = self._plan_whole(list(zip(seqs, vids, offs, lens, payloads)), ops)
        else:
            buf, todo = self._plan_records(mine, payloads)
            undo, nundo = [buf], len(buf)
        end = self._undo_end + nundo
        if nundo:
            pwritev_all(self._undo, undo, self._undo_end)  # kept ciphertext: no copy
            self._fp("undo-written")
            os.fsync(self._undo)
            self._fp("undo-synced")
            if final is None:
                self._write_images(todo, "image-written")
            else:
                for vid, blocks in final.items():
                    self._imgs[vid].write_blocks(sorted(blocks.items()), self._image_written)
                for vid in final:
                    self._imgs[vid].fsync()
            self._fp("images-synced")
        # Through the end of the index, the replica is at the newest PIT, even
        # when that batch ended with barriers (which the index does not hold).
        seq = pit_seq if last == nrec else ix.rec_seq[last - 1]
        self._write_state(seq, end)
        self._fp("state-persisted")
        self.applied_seq = seq
        self._undo_end = end
        self._applied += len(mine)
        return last - first

    def _payloads(self, mine: list[int]) -> list[Any]:
        """The payloads of records ``mine`` (ordinals): what the handoff
        holds, the rest read from the journal."""
        ix = self.index
        if self._handoff is None:
            return self._src.read_many([(ix.rec_seg[o], ix.rec_pos[o], ix.rec_seq[o], ix.rec_len[o]) for o in mine])
        got = self._handoff.take([ix.rec_seq[o] for o in mine])
        miss = [i for i, p in enumerate(got) if p is None]
        if miss:
            read = self._src.read_many([(ix.rec_seg[o], ix.rec_pos[o], ix.rec_seq[o], ix.rec_len[o])
                                        for o in (mine[i] for i in miss)])
            for i, p in zip(miss, read):
                got[i] = p
        return got

    def _image_written(self) -> None:
        self._fp("image-written")

    def _plan_whole(self, recs: list[tuple[int, int, int, int, Any]], ops: Any) -> tuple[list[Any], int, dict]:
        """Undo entries (`undolog.build_entries`: the buffers to write in
        order, their total bytes) and the final block contents of a step
        whose records all cover whole blocks (`coalesce.plan`).  A record whose blocks of a
        sealed image were not written earlier in the step keeps them as the
        image stores them (UNDO_IMAGE: no block opened, nothing sealed);
        other pre-images are sealed like before (UNDO_SEALED).  ``recs``:
        (seq, vdisk, offset, length, payload) per record, ``ops`` their ops."""
        write = Op.WRITE
        if ops.count(write) != len(ops):  # zeroes and trims: no payload (None: zeros)
            recs = [r if op == write else (*r[:4], None) for r, op in zip(recs, ops)]
        stored = frozenset(vid for vid, img in self._imgs.items() if img.sealed)
        pres, final = plan(recs, self._imgs, stored)
        kept: dict[tuple[int, int], Any] = {}  # (vdisk, block) -> (entry, ciphertext) | None (unwritten)
        if stored:
            want: dict[int, list[int]] = {}
            for (_, vid, off, length, _), pre in zip(recs, pres):
                if pre is IMAGE:
                    want.setdefault(vid, []).extend(range(off // BLOCK_SIZE, -(-(off + length) // BLOCK_SIZE)))
            for vid, blocks in want.items():
                blocks.sort()
                kept.update(zip([(vid, b) for b in blocks], self._imgs[vid].read_stored_blocks(blocks)))
        uids = {vid: self._imgs[vid].uid for vid in stored}  # type: ignore[attr-defined]
        parts, nbytes, offs = build_entries(recs, pres, kept, uids, self._sealer.sealing_cipher(), self._undo_end)
        self._undo_seq.extend(r[0] for r in recs)
        self._undo_off.extend(offs)
        return parts, nbytes, final

    def _plan_records(self, mine: list[int], payloads: list[bytes]
                      ) -> tuple[bytearray, list[tuple[int, int, int, bytes | None]]]:
        """Undo entries of a step record by record (any alignment), and the
        writes to make after them: (vdisk, offset, length, payload|None)."""
        ix = self.index
        # Pre-images, seen through the earlier records of this step (not applied yet).
        todo: list[tuple[int, int, int, bytes | None, int]] = []  # (seq, vdisk, offset, payload|None, length)
        # (vdisk, 4 KiB block) -> indexes in todo of this step's records touching it, so a
        # record's pre-image sees only the earlier ones that overlap it (not all of them: O(n²)).
        touch: dict[tuple[int, int], list[int]] = {}
        undo = bytearray()
        spans = []  # per record: its whole 4 KiB blocks [a0, a1)
        for o in mine:
            vid, off, length = ix.rec_vdisk[o], ix.rec_off[o], ix.rec_len[o]
            v = self.vdisks[vid]
            # The pre-image covers whole 4 KiB blocks: laying it back rewrites
            # them whole, which also repairs a sealed block that a crash tore
            # mid-step (data and tag entry out of step: it cannot be read).
            spans.append((vid, off - off % BLOCK_SIZE, min(v.size, -(-(off + length) // BLOCK_SIZE) * BLOCK_SIZE)))
        olds = _read_runs(self._imgs, spans)  # one read per run of touching records, before anything is written
        for o, payload, (vid, a0, a1), old in zip(mine, payloads, spans, olds):
            seq, off, length = ix.rec_seq[o], ix.rec_off[o], ix.rec_len[o]
            pre = bytearray(old)
            blocks = range(off // BLOCK_SIZE, (off + length - 1) // BLOCK_SIZE + 1)
            earlier: set[int] = set()
            for b in blocks:
                hit = touch.get((vid, b))
                if hit:
                    earlier.update(hit)
            for i in sorted(earlier):  # oldest first: the newest overlapping record wins
                _, _, poff, pdata, plen = todo[i]
                s, e = max(a0, poff), min(a1, poff + plen)
                if s < e:
                    pre[s - a0 : e - a0] = pdata[s - poff : e - poff] if pdata is not None else bytes(e - s)
            zeros = pre.count(0) == len(pre)
            kind = UNDO_ZEROS if zeros else (UNDO_SEALED if self._sealer.sealing else UNDO_DATA)
            head = UNDO_HEAD.pack(UNDO_MAGIC, kind, seq, vid, a0, a1 - a0, 0)[:36]
            body = b"" if zeros else (self._sealer.seal(pre, head) if kind == UNDO_SEALED else bytes(pre))
            assert kind != UNDO_SEALED or len(body) == len(pre) + BlobSealer.SEALED_OVERHEAD
            self._undo_seq.append(seq)
            self._undo_off.append(self._undo_end + len(undo))
            undo += head + struct.pack(">I", crc32(body, crc32(head))) + body
            for b in blocks:
                touch.setdefault((vid, b), []).append(len(todo))
            todo.append((seq, vid, off, payload if ix.rec_op[o] == Op.WRITE else None, length))
        return undo, [(vid, off, length, payload) for _, vid, off, payload, length in todo]

    def catch_up(self, max_records: int = 256, upto_seq: int | None = None) -> int:
        n = 0
        while (k := self.step(max_records, upto_seq)):
            n += k
        return n

    def goto(self, seq: int, max_records: int = 256) -> None:
        """Bring the images to exactly PIT ``seq``: roll back with the undo
        log, or apply forward up to it (failover)."""
        if seq < self.applied_seq:
            self.undo_to(seq)
            return
        self.catch_up(max_records, seq)
        if self.applied_seq != seq:
            raise ReplicaError(f"cannot bring the replica to seq {seq}: the journal's records end at "
                               f"seq {self.applied_seq}")

    def trim_undo(self, upto_seq: int) -> int:
        """Forget the undo entries of records <= ``upto_seq`` (retention
        trimmed the journal up to there, so no PIT before it can be asked
        for): the floor rises to it, the state says where the log now
        starts, then the prefix is punched out of the file (offsets stay;
        a crash before the punch only delays freeing the space).  Returns
        the entries dropped."""
        upto = min(upto_seq, self.applied_seq)
        if upto <= self.undo_floor:
            return 0
        i = bisect.bisect_right(self._undo_seq, upto)
        cut = self._undo_off[i] if i < len(self._undo_off) else self._undo_end
        self.undo_floor = upto
        self._undo_start = cut
        self._write_state(self.applied_seq, self._undo_end)
        self._fp("undo-trim-persisted")
        punch_hole(self._undo, 0, cut)
        del self._undo_seq[:i]
        del self._undo_off[:i]
        return i

    def undo_to(self, seq: int) -> int:
        """Roll the replica images back to PIT ``seq`` (<= applied_seq) with the
        undo log (rule 4); later `step`s re-apply from there.  Returns the
        number of undo entries laid back."""
        if seq > self.applied_seq:
            raise ReplicaError(f"cannot roll back to seq {seq}: the replica is at seq {self.applied_seq}")
        if seq < self.undo_floor:
            raise ReplicaError(f"cannot roll back to seq {seq}: undo data starts after seq {self.undo_floor}")
        i = bisect.bisect_right(self._undo_seq, seq)
        offs = list(self._undo_off[i:])
        cut = offs[0] if offs else self._undo_end
        self._write_state(self.applied_seq, self._undo_end, rollback_to=seq)
        self._fp("rollback-intent")
        self._lay_back(offs)
        self._write_state(seq, cut)
        self._fp("rollback-persisted")
        os.ftruncate(self._undo, cut)
        os.fsync(self._undo)
        del self._undo_seq[i:]
        del self._undo_off[i:]
        self.applied_seq, self._undo_end = seq, cut
        return len(offs)

    def read(self, vdisk_id: int, offset: int, length: int) -> bytes:
        """Bytes of the replica image (at ``applied_seq``)."""
        return self._imgs[vdisk_id].pread(offset, length)

    def statistics(self) -> DistributorStatistics:
        return DistributorStatistics(self.applied_seq, self.undo_floor, len(self._undo_seq), self._undo_end,
                                     self._applied, self._skipped, self._recovered)
