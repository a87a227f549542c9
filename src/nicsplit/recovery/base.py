"""Base images: each vdisk of a CG as it was at the oldest retained point in time.

When retention trims the oldest journal segments (`nicsplit.recovery.retention`),
their records are first applied here, so the image at any retained PIT S is
still exact: per block, the newest journal record <= S, else the base.

Layout::

    DATA/appliance/base/<cg>/v<vdisk id>.img   sparse image of the vdisk's size: sealed
                                               (AES-GCM per 4 KiB block, with its .tags
                                               sidecar) when at-rest encryption is on,
                                               raw otherwise (`nicsplit.storage.image`)
    DATA/appliance/base/<cg>/state.json        {"version": 1, "seq", "time_ns", "first_segment"}

``seq`` is the newest seq applied (the base *is* the image at that seq);
``first_segment`` the oldest journal segment still needed (every older one
was applied and may be deleted).

Rules
-----
1. `apply` writes the records in seq order, fsyncs every image it touched,
   and only then replaces state.json atomically. Re-applying records the
   base already holds, in order, gives the same bytes (writes are absolute),
   so a crash before the state is persisted is repaired by applying the
   same segments again; a crash after it leaves only segment files to
   delete (`first_segment` says which).
2. A missing image reads as zeros (a vdisk nothing was trimmed for yet).
3. Only the appliance's retention writes here, under the journal's writer
   lock; readers open images read-only.
4. A re-apply after a crash also repairs a sealed block torn by it (data
   and tag entry out of step, `sealed` rule 1) when the re-applied records
   cover the block whole; `apply` rewrites whole blocks only through
   `Image.pwrite`, which reads a partly covered block first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from nicsplit.storage import atrest
from nicsplit.storage.image import Image, open_image
from nicsplit.core.records import Op
from nicsplit.core.fsutil import atomic_write, fsync_dir
from nicsplit.core.layout import Layout

VERSION = 1


class BaseError(Exception):
    """A base directory that cannot be used: one clear line."""


@dataclass(frozen=True, slots=True)
class BaseState:
    seq: int = 0
    time_ns: int = 0
    first_segment: int = 1


def base_of_journal(journal_dir: str | Path) -> Path:
    """The base directory of the CG whose journal is ``journal_dir``: where
    `Layout.base` is when `Layout.journal` is ``journal_dir``, relative to
    their appliance directory (tests place that anywhere)."""
    jd = Path(journal_dir)
    return jd.parent.parent / Layout(".").bases.name / jd.name


def read_state(path: str | Path) -> BaseState:
    f = Path(path) / "state.json"
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        return BaseState()
    except (OSError, ValueError) as e:
        raise BaseError(f"{f}: unreadable ({e})") from None
    if raw.get("version") != VERSION:
        raise BaseError(f"{f}: version {raw.get('version')!r} not supported")
    return BaseState(int(raw["seq"]), int(raw["time_ns"]), int(raw["first_segment"]))


class BaseImages:
    def __init__(self, path: str | Path, sizes: dict[int, int], *, writable: bool = False,
                 keyring: "atrest.Keyring | None | str" = "auto") -> None:
        """``sizes``: vdisk id -> size in bytes, for every vdisk of the CG.
        ``keyring``: for sealed images; "auto" = the data directory's."""
        self.path = Path(path)
        self.sizes = dict(sizes)
        self.writable = writable
        self.state = read_state(self.path)
        self.keyring: Any = atrest.keyring_for_images(self.path) if keyring == "auto" else keyring
        self._imgs: dict[int, Image] = {}

    def image_path(self, vid: int) -> Path:
        return self.path / f"v{vid}.img"

    def _img(self, vid: int, create: bool) -> Image | None:
        img = self._imgs.get(vid)
        if img is not None:
            return img
        try:
            img = open_image(self.image_path(vid), self.sizes[vid], self.keyring, writable=self.writable,
                             create=create and self.writable)
        except FileNotFoundError:
            return None
        self._imgs[vid] = img
        return img

    @property
    def seq(self) -> int:
        return self.state.seq

    def pread(self, vid: int, offset: int, length: int) -> bytes:
        """Bytes of the base image (zeros where nothing was applied, rule 2)."""
        img = self._img(vid, False)
        return bytes(length) if img is None else img.pread(offset, length)

    def extents(self, vid: int, offset: int, length: int) -> list[tuple[int, int]]:
        """Ranges of the base image that may hold data (holes read as zeros)."""
        img = self._img(vid, False)
        return [] if img is None else img.extents(offset, length)

    def apply(self, records: Iterable[tuple[int, int, int, int, int, bytes | None]], *, seq: int, time_ns: int,
              first_segment: int) -> int:
        """Apply (seq, vdisk id, op, offset, length, payload) records, oldest
        first, then persist the new state (rule 1). Returns records applied."""
        if not self.writable:
            raise BaseError(f"{self.path}: opened read-only")
        self.path.mkdir(parents=True, exist_ok=True)
        touched: dict[int, Image] = {}
        n = 0
        for rseq, vid, op, off, length, payload in records:
            if vid not in self.sizes:
                continue  # a vdisk no longer in the CG: nothing to keep for it
            if off + length > self.sizes[vid]:
                raise BaseError(f"record seq {rseq}: {off}+{length} is past the end of vdisk id {vid}")
            img = self._img(vid, True)
            assert img is not None
            if op == Op.WRITE:
                if payload is None or len(payload) != length:
                    raise BaseError(f"record seq {rseq}: payload of {0 if payload is None else len(payload)} "
                                    f"bytes for a {length}-byte write")
                img.pwrite(payload, off)
            elif op in (Op.ZERO, Op.TRIM):
                img.zero(off, length)
            else:
                continue
            touched[vid] = img
            n += 1
        for img in touched.values():
            img.fsync()
        if touched:
            fsync_dir(self.path)  # new image files
        state = BaseState(max(seq, self.state.seq), max(time_ns, self.state.time_ns),
                          max(first_segment, self.state.first_segment))
        atomic_write(self.path / "state.json", json.dumps({"version": VERSION, "seq": state.seq,
                                                           "time_ns": state.time_ns,
                                                           "first_segment": state.first_segment}).encode(), 0o600)
        self.state = state
        return n

    def images(self) -> dict[int, Image]:
        """Every existing image, opened (for key usage and rekeying)."""
        for vid in self.sizes:
            self._img(vid, False)
        return dict(self._imgs)

    def close(self) -> None:
        for img in self._imgs.values():
            img.close()
        self._imgs.clear()

    def __enter__(self) -> "BaseImages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
