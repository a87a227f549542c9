"""Images at rest (`nicsplit.storage`: image, sealed, rekey, blob): plain and sealed images
against a byte model, no plaintext on disk, tampering and torn blocks, wrong
and missing keys, rotation and rekey, a rekey cut anywhere by a crash (the
rekey log), plain images when encryption is off, extents, resize, concurrent
writers, and the blob sealer of the undo log."""

from __future__ import annotations

import collections
import io
import logging
import os
import random
import shutil
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable

import pytest

from nicsplit.storage import atrest, rekey, sealed, sealing
from nicsplit.storage.blob import BlobSealer
from nicsplit.storage.image import Image, open_image
from nicsplit.storage.rekey import rekey_path
from nicsplit.storage.sealing import BS, ENTRY_SIZE, HEADER_SIZE, RUN_BLOCKS, SealedError, tags_path

# A plaintext no cipher output would contain: 4 KiB of a repeated marker.
MARKER = b"NICSPLIT-PLAINTEXT-MARKER:"
PATTERN = (MARKER * 200)[:BS]


@pytest.fixture
def kr(tmp_path: Path) -> atrest.Keyring:
    return atrest.Keyring.create(tmp_path / "at-rest.key")


def entry(path: Path, blk: int) -> tuple[int, bytes]:
    """(key id, raw 32-byte entry) of block ``blk`` in the sidecar of ``path``."""
    raw = tags_path(path).read_bytes()[HEADER_SIZE + blk * ENTRY_SIZE : HEADER_SIZE + (blk + 1) * ENTRY_SIZE]
    return int.from_bytes(raw[:4], "big"), raw


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place (a tamperer, or a crash)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def check_extents(img: Image, model: bytearray, lo: int, hi: int) -> None:
    """Extents are ordered, merged, inside [lo, hi), and cover every non-zero byte."""
    ext = img.extents(lo, hi - lo)
    pos = lo
    for off, n in ext:
        assert lo <= off and n > 0 and off + n <= hi
        assert off > pos or (off == pos == lo), f"extents {ext} unordered or not merged"
        assert not any(model[pos:off]), f"data outside the extents {ext} in [{pos}, {off})"
        if img.sealed:  # 4 KiB-granular, clipped to the request and the size
            assert off == lo or off % BS == 0
            assert off + n == hi or (off + n) % BS == 0
        pos = off + n
    assert not any(model[pos:hi])


# -- the reference model ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [3 * RUN_BLOCKS * BS // 2 + 5 * BS, 2 * RUN_BLOCKS * BS + 5 * BS + 512],
                         ids=["aligned", "short-last-block"])
@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_random_ops_match_a_byte_model(tmp_path: Path, kr: atrest.Keyring, rng: random.Random, kind: str,
                                       size: int):
    path = tmp_path / "disk.img"
    keyring = kr if kind == "sealed" else None
    model = bytearray(size)
    img = open_image(path, size, keyring, writable=True, create=True)
    assert img.sealed == (kind == "sealed") and img.size == size

    def span() -> tuple[int, int]:
        r = rng.random()
        if r < 0.1:  # large: crosses a run boundary (RUN_BLOCKS)
            n = rng.randrange(RUN_BLOCKS * BS // 2, RUN_BLOCKS * BS + 3 * BS)
        elif r < 0.4:  # whole blocks
            n = rng.randrange(1, 9) * BS
            off = rng.randrange(0, size // BS - 8) * BS
            return off, n
        else:  # anything: inside a block, across one or two boundaries
            n = rng.randrange(0, 3 * BS)
        n = min(n, size)
        if rng.random() < 0.1:  # at the very end (the short last block)
            return size - n, n
        return rng.randrange(0, size - n + 1), n

    try:
        for step in range(300):
            op = rng.random()
            off, n = span()
            if op < 0.45:
                data = rng.randbytes(n) if rng.random() < 0.8 else (PATTERN * (n // BS + 1))[:n]
                img.pwrite(data, off)
                model[off : off + n] = data
            elif op < 0.65:
                img.zero(off, n)
                model[off : off + n] = bytes(n)
            elif op < 0.95:
                assert img.pread(off, n) == model[off : off + n], f"step {step}: pread({off}, {n})"
            else:  # reopen: the kind is the sidecar's say
                img.fsync()
                img.close()
                img = open_image(path, size, kr, writable=True)
                assert img.sealed == (kind == "sealed")
            if step % 50 == 0:
                check_extents(img, model, 0, size)
                a, b = sorted(rng.randrange(0, size + 1) for _ in range(2))
                check_extents(img, model, a, b)
        assert img.pread(0, size) == model
        check_extents(img, model, 0, size)
    finally:
        img.close()
    with open_image(path, size, kr, writable=False) as ro:
        assert ro.pread(0, size) == model


def test_zero_deallocates_whole_blocks(tmp_path: Path, kr: atrest.Keyring):
    path = tmp_path / "disk.img"
    with open_image(path, 64 * BS, kr, writable=True, create=True) as img:
        img.pwrite(os.urandom(64 * BS), 0)
        img.fsync()
        full = os.stat(path).st_blocks
        img.zero(BS + 100, 40 * BS)  # whole blocks 2..40 go; blocks 1 and 41 are rewritten
        img.fsync()
        assert os.stat(path).st_blocks <= full - 39 * BS // 512
        assert entry(path, 1)[0] == 1 and entry(path, 2)[0] == 0 and entry(path, 41)[0] == 1
        assert img.pread(BS + 100, 40 * BS) == bytes(40 * BS)
        # a partial zero that leaves a block all zeros clears it like a whole-block zero
        img.zero(0, BS + 100)
        assert entry(path, 0)[0] == 0 and entry(path, 1)[0] == 0
        assert img.extents(0, 64 * BS) == [(41 * BS, 23 * BS)]


# -- confidentiality and integrity ----------------------------------------------------------------


def test_no_plaintext_on_disk(tmp_path: Path, kr: atrest.Keyring):
    size = 40 * BS + 512
    s, p = tmp_path / "s.img", tmp_path / "p.img"
    for path, keyring in ((s, kr), (p, None)):
        with open_image(path, size, keyring, writable=True, create=True) as img:
            img.pwrite(PATTERN * 8, 0)  # aligned run
            img.pwrite(PATTERN * 3, 10 * BS + 777)  # unaligned: read-modify-write
            img.pwrite(PATTERN[:512] + PATTERN[:512], size - 1024)  # the short last block
            img.fsync()
            assert img.pread(0, 8 * BS) == PATTERN * 8
    assert MARKER in p.read_bytes()  # the check can fail
    for f in (s, tags_path(s)):
        raw = f.read_bytes()
        assert MARKER[:12] not in raw and MARKER[-12:] not in raw, f"plaintext in {f.name}"
    # every write got its own nonce
    nonces = [entry(s, b)[1][4:16] for b in range(41) if entry(s, b)[0]]
    assert len(nonces) > 10 and len(set(nonces)) == len(nonces)


def test_flipped_byte_fails_only_that_block(tmp_path: Path, kr: atrest.Keyring):
    path = tmp_path / "disk.img"
    blocks = [bytes([i]) * BS for i in range(1, 9)]
    with open_image(path, 8 * BS, kr, writable=True, create=True) as img:
        img.pwrite(b"".join(blocks), 0)
    poke(path, 3 * BS + 1234, bytes([path.read_bytes()[3 * BS + 1234] ^ 0x40]))  # ciphertext
    kid, raw = entry(path, 5)
    poke(tags_path(path), HEADER_SIZE + 5 * ENTRY_SIZE + 20, bytes([raw[20] ^ 1]))  # the tag
    with open_image(path, 8 * BS, kr, writable=True) as img:
        for b in range(8):
            if b in (3, 5):
                with pytest.raises(SealedError, match=rf"^block {b} of .*disk\.img fails authentication"):
                    img.pread(b * BS + 10, 10)
            else:
                assert img.pread(b * BS, BS) == blocks[b]
        with pytest.raises(SealedError, match="block 3 "):
            img.pread(0, 8 * BS)
        with pytest.raises(SealedError):  # a partial write reads the block first
            img.pwrite(b"x", 3 * BS)
        img.pwrite(blocks[3], 3 * BS)  # a whole-block write repairs it
        img.zero(5 * BS, BS)
        assert img.pread(0, 8 * BS) == b"".join(blocks[:5]) + bytes(BS) + b"".join(blocks[6:])


def test_moved_blocks_fail_authentication(tmp_path: Path, kr: atrest.Keyring):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open_image(p, 4 * BS, kr, writable=True, create=True) as img:
            img.pwrite(b"".join(bytes([i]) * BS for i in range(1, 5)), 0)
    # swap blocks 1 and 2 of a, data and entries together: each pair is intact, but misplaced
    data, tags = bytearray(a.read_bytes()), bytearray(tags_path(a).read_bytes())
    data[BS : 2 * BS], data[2 * BS : 3 * BS] = data[2 * BS : 3 * BS], data[BS : 2 * BS]
    e1, e2 = HEADER_SIZE + ENTRY_SIZE, HEADER_SIZE + 2 * ENTRY_SIZE
    tags[e1 : e1 + ENTRY_SIZE], tags[e2 : e2 + ENTRY_SIZE] = tags[e2 : e2 + ENTRY_SIZE], tags[e1 : e1 + ENTRY_SIZE]
    poke(a, 0, bytes(data))
    poke(tags_path(a), 0, bytes(tags))
    # block 3 of b, copied to block 3 of a: same place, same key, another image
    poke(a, 3 * BS, b.read_bytes()[3 * BS :])
    poke(tags_path(a), HEADER_SIZE + 3 * ENTRY_SIZE, entry(b, 3)[1])
    with open_image(a, 4 * BS, kr, writable=False) as img:
        assert img.pread(0, BS) == bytes([1]) * BS
        for blk in (1, 2, 3):
            with pytest.raises(SealedError, match=f"block {blk} of"):
                img.pread(blk * BS, BS)


def test_torn_write_is_detected_and_repaired_by_rewriting(tmp_path: Path, kr: atrest.Keyring):
    """A crash between the data and the entry of a write (rule 1)."""
    path = tmp_path / "disk.img"
    with open_image(path, 4 * BS, kr, writable=True, create=True) as img:
        img.pwrite(b"a" * 2 * BS, 0)
        old = entry(path, 1)[1]
        img.pwrite(b"b" * 2 * BS, 0)
    poke(tags_path(path), HEADER_SIZE + ENTRY_SIZE, old)  # block 1: new data, old entry
    with open_image(path, 4 * BS, kr, writable=True) as img:
        assert img.pread(0, BS) == b"b" * BS
        with pytest.raises(SealedError, match="torn by a crash"):
            img.pread(BS, BS)
        img.pwrite(b"b" * 2 * BS, 0)  # re-applying the write repairs it
        assert img.pread(0, 2 * BS) == b"b" * 2 * BS


def test_damaged_sidecar_header(tmp_path: Path, kr: atrest.Keyring):
    path = tmp_path / "disk.img"
    open_image(path, 4 * BS, kr, writable=True, create=True).close()
    poke(tags_path(path), 10, b"\xff")
    with pytest.raises(SealedError, match=r"disk\.img .*fails its CRC"):
        open_image(path, 4 * BS, kr, writable=False)
    poke(tags_path(path), 0, b"XXXX")
    with pytest.raises(SealedError, match="magic"):
        open_image(path, 4 * BS, kr, writable=False)


# -- keys -----------------------------------------------------------------------------------------


def test_wrong_or_missing_key(tmp_path: Path, kr: atrest.Keyring):
    path = tmp_path / "disk.img"
    with open_image(path, 8 * BS, kr, writable=True, create=True) as img:
        img.pwrite(PATTERN, 0)
    with pytest.raises(SealedError, match=r"^.*disk\.img is sealed .* no at-rest keyring was given$"):
        open_image(path, 8 * BS, None, writable=False)
    other = atrest.Keyring.create(tmp_path / "other" / "at-rest.key")  # also key 1, other bytes
    with open_image(path, 8 * BS, other, writable=False) as img:
        assert img.pread(BS, BS) == bytes(BS)  # unwritten blocks need no key
        with pytest.raises(SealedError, match="block 0 of .* sealed under another key"):
            img.pread(0, BS)
    # key 1 retired from the keyring (wrongly: the image still uses it)
    atrest.rotate(kr.path)
    atrest.retire(kr.path, 1, {})
    with open_image(path, 8 * BS, atrest.Keyring.load(kr.path), writable=False) as img:
        with pytest.raises(SealedError, match=r"block 0 of .* sealed under at-rest key 1, which is not in the "
                                              r"keyring .* \(it holds 2\)"):
            img.pread(0, 100)
    # a keyring with no keys at all
    atrest.ensure(kr.path, False)
    atrest.retire(kr.path, 2, {})
    with pytest.raises(SealedError, match="holds no keys"):
        open_image(path, 8 * BS, atrest.Keyring.load(kr.path), writable=False)


def test_rotation_then_rekey(tmp_path: Path, kr: atrest.Keyring, rng: random.Random,
                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rekey, "PIECE_BLOCKS", 200)  # several pieces, each of several runs
    path = tmp_path / "disk.img"
    size = RUN_BLOCKS * BS + 40 * BS + 512  # rekey goes run by run, to the short last block
    model = bytearray(size)
    img = open_image(path, size, kr, writable=True, create=True)
    for _ in range(60):
        off, n = rng.randrange(size - 3 * BS), rng.randrange(1, 3 * BS)
        data = rng.randbytes(n)
        img.pwrite(data, off)
        model[off : off + n] = data
    img.pwrite(b"z" * 512, size - 512)
    model[-512:] = b"z" * 512
    img.pwrite(b"o" * BS, 0)
    model[:BS] = b"o" * BS
    under1 = img.key_usage()[1]
    assert img.key_usage() == {1: under1}

    new, old = atrest.rotate(kr.path)
    assert (new, old) == (2, 1)
    kr.refresh()  # what the image does itself at most once per second
    img.pwrite(b"n" * BS, 0)  # block 0: now under key 2
    model[:BS] = b"n" * BS
    assert entry(path, 0)[0] == 2
    usage = img.key_usage()
    assert usage == {1: under1 - 1, 2: 1}

    seen: list[tuple[int, int]] = []
    rewritten = img.rekey(progress=lambda done, total: seen.append((done, total)))
    assert rewritten == usage[1]
    total = -(-size // BS)
    assert seen[-1] == (total, total) and len(seen) >= 3 and seen == sorted(seen)  # one call per piece
    assert img.key_usage() == {2: under1}
    assert not rekey_path(path).exists()  # the log is gone once the rekey is done
    assert img.rekey() == 0
    assert img.pread(0, size) == model
    img.close()
    # key 1 retired: everything still reads
    atrest.retire(kr.path, 1, {})
    with open_image(path, size, atrest.Keyring.load(kr.path), writable=False) as ro:
        assert ro.pread(0, size) == model


# -- rekey cut by a crash (the rekey log) -------------------------------------------------------

LOG_HEAD = struct.Struct(">4sH16sQQII")  # the rekey log's header, as the module docstring has it
CUTS = ["rekey-log-synced", "rekey-data-written", "rekey-entries-written", "rekey-synced"]


class Crash(Exception):
    """Where a failpoint "kills" the process."""


def crash_at(monkeypatch: pytest.MonkeyPatch, where: str, nth: int = 1,
             hook: Callable[[str], None] | None = None) -> collections.Counter[str]:
    """Make the ``nth`` pass of rekey through failpoint ``where`` raise `Crash`;
    ``hook(name)`` first at every failpoint.  Returns the passes counted."""
    seen: collections.Counter[str] = collections.Counter()

    def fp(name: str) -> None:
        if hook is not None:
            hook(name)
        seen[name] += 1
        if name == where and seen[name] == nth:
            raise Crash(f"{name} #{nth}")

    monkeypatch.setattr(rekey, "failpoint", fp)
    return seen


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 24 blocks locked 8 at a time: a small image has several of each."""
    monkeypatch.setattr(rekey, "PIECE_BLOCKS", 24)
    monkeypatch.setattr(rekey, "RUN_BLOCKS", 8)
    monkeypatch.setattr(sealed, "RUN_BLOCKS", 8)


def rotated(path: Path, kr: atrest.Keyring, rng: random.Random, size: int = 100 * BS + 512) -> bytearray:
    """A closed sealed image to rekey: mostly under key 1, with holes, some
    blocks already under key 2 (the active key now), and a short last block.
    Returns its bytes."""
    model = bytearray(size)
    with open_image(path, size, kr, writable=True, create=True) as img:
        data = rng.randbytes(size)
        img.pwrite(data, 0)
        model[:] = data
        for blk in (5, 6, 7, 40, 41, 70):  # holes: entries cleared
            img.zero(blk * BS, BS)
            model[blk * BS : (blk + 1) * BS] = bytes(BS)
        atrest.rotate(kr.path)
        kr.refresh()
        for blk in (10, 30, 31, 55):  # already under key 2: a rekey leaves them alone
            new = rng.randbytes(BS)
            img.pwrite(new, blk * BS)
            model[blk * BS : (blk + 1) * BS] = new
        assert img.key_usage() == {1: 101 - 6 - 4, 2: 4}
        img.fsync()
    return model


def rekey_done(path: Path, kr: atrest.Keyring, model: bytearray, caplog: pytest.LogCaptureFixture,
               recovered: str, blocks: int = 101 - 6) -> None:
    """Reopen writable (recovering, with a warning that says ``recovered``), check
    every byte, rekey to the end, check again: all ``blocks`` under key 2, no log."""
    size = len(model)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nicsplit.storage.rekey"):
        img = open_image(path, size, kr, writable=True)
    try:
        assert recovered in caplog.text
        assert not rekey_path(path).exists()
        assert img.pread(0, size) == model
        img.rekey()
        assert img.key_usage() == {2: blocks}
        assert img.pread(0, size) == model
    finally:
        img.close()
    assert not rekey_path(path).exists()
    with open_image(path, size, kr, writable=False) as ro:
        assert ro.pread(0, size) == model


def snapshots(path: Path) -> tuple[dict[str, bytes], Callable[[str], None]]:
    """A failpoint hook keeping the data file and sidecar as they are when each
    piece's log is durable: what a power loss may go back to until the next fsync."""
    snap: dict[str, bytes] = {}

    def hook(name: str) -> None:
        if name == "rekey-log-synced":
            snap["data"], snap["tags"] = path.read_bytes(), tags_path(path).read_bytes()

    return snap, hook


# Which file a power loss sends back to its last fsynced state: a killed
# process loses nothing; the page cache may have written back either file
# (only between the log's fsync and the piece's: before, nothing changed,
# after, nothing is unsynced).
CRASHES = [(where, "killed") for where in CUTS] + [
    (where, lost) for where in ("rekey-data-written", "rekey-entries-written") for lost in ("data-lost", "entries-lost")]


@pytest.mark.parametrize("nth", [1, 4], ids=["first", "later"])
@pytest.mark.parametrize("where,power", CRASHES)
def test_rekey_cut_anywhere_loses_nothing(tmp_path: Path, kr: atrest.Keyring, rng: random.Random,
                                          monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                          small_pieces: None, where: str, power: str, nth: int):
    path = tmp_path / "disk.img"
    model = rotated(path, kr, rng)
    snap, hook = snapshots(path)
    seen = crash_at(monkeypatch, where, nth, hook)
    img = open_image(path, len(model), kr, writable=True)
    with pytest.raises(Crash):
        img.rekey()
    img.close()  # no fsync: the crash
    monkeypatch.setattr(rekey, "failpoint", None)
    assert seen[where] == nth and rekey_path(path).stat().st_size > 0
    if power == "data-lost":
        path.write_bytes(snap["data"])
    elif power == "entries-lost":
        tags_path(path).write_bytes(snap["tags"])
    # a reader meanwhile reads every byte right, and the old key still counts
    with open_image(path, len(model), kr, writable=False) as ro:
        assert ro.pread(0, len(model)) == model
        assert 1 in ro.key_usage()
    rekey_done(path, kr, model, caplog, "recovered a rekey cut by a crash")


def test_torn_blocks_read_from_the_log_until_recovered(tmp_path: Path, kr: atrest.Keyring, rng: random.Random,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture, small_pieces: None):
    """A cut between the data and the entries of a piece: its blocks are torn
    (the check can fail without the log), yet read right from the log, in
    the image whose rekey raised and in a reader; the next rekey repairs them."""
    path = tmp_path / "disk.img"
    model = rotated(path, kr, rng)
    crash_at(monkeypatch, "rekey-data-written", 2)
    img = open_image(path, len(model), kr, writable=True)
    try:
        with pytest.raises(Crash):
            img.rekey()
        monkeypatch.setattr(rekey, "failpoint", None)
        # without the log: torn
        bare = tmp_path / "bare"
        bare.mkdir()
        shutil.copy(path, bare / path.name)
        shutil.copy(tags_path(path), bare / tags_path(path).name)
        with open_image(bare / path.name, len(model), kr, writable=False) as ro:
            with pytest.raises(SealedError, match="fails authentication: .*torn by a crash"):
                ro.pread(0, len(model))
        with open_image(path, len(model), kr, writable=False) as ro:
            assert ro.pread(0, len(model)) == model
        assert img.pread(0, len(model)) == model  # the image whose rekey raised
        part = rng.randbytes(100)
        img.pwrite(part, 9 * BS + 7)  # a read-modify-write of a torn block reads it from the log too
        model[9 * BS + 7 : 9 * BS + 107] = part
        with caplog.at_level(logging.WARNING, logger="nicsplit.storage.rekey"):
            img.rekey()  # recovers first
        assert "recovered a rekey cut by a crash" in caplog.text
        assert img.key_usage() == {2: 101 - 6} and img.pread(0, len(model)) == model
        assert not rekey_path(path).exists()
    finally:
        img.close()


@pytest.mark.parametrize("damage", ["cut-short", "flipped-byte", "another-image", "void"])
def test_a_damaged_or_void_rekey_log_is_deleted(tmp_path: Path, kr: atrest.Keyring, rng: random.Random,
                                                monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                small_pieces: None, damage: str):
    """A log that is not whole was being written when the crash came, before
    its fsync: its piece is untouched, so the log is just deleted."""
    path = tmp_path / "disk.img"
    model = rotated(path, kr, rng)
    crash_at(monkeypatch, "rekey-log-synced", 2)
    img = open_image(path, len(model), kr, writable=True)
    with pytest.raises(Crash):
        img.rekey()
    img.close()
    monkeypatch.setattr(rekey, "failpoint", None)
    rpath = rekey_path(path)
    raw = bytearray(rpath.read_bytes())
    if damage == "cut-short":
        raw = raw[: len(raw) // 2]
    elif damage == "flipped-byte":
        raw[len(raw) - 100] ^= 1
    elif damage == "another-image":  # a whole log, CRC and all, but of another image's uid
        raw[6:22] = os.urandom(16)
        raw[42:46] = zlib.crc32(raw[46:], zlib.crc32(raw[:42])).to_bytes(4, "big")
    else:  # what rekey leaves of a piece's log once the piece is durable
        raw[:46] = bytes(46)
    rpath.write_bytes(raw)
    with open_image(path, len(model), kr, writable=False) as ro:
        assert ro.pread(0, len(model)) == model
    rekey_done(path, kr, model, caplog, "" if damage == "void" else "deleted the rekey log")
    if damage == "void":
        assert "rekey" not in caplog.text  # an ordinary leftover: nothing to say


def test_rekey_log_format(tmp_path: Path, kr: atrest.Keyring, rng: random.Random, monkeypatch: pytest.MonkeyPatch,
                          small_pieces: None):
    """The log as the module docstring lays it out: old entries of the blocks
    re-sealed (zeros for the others), then their old ciphertext, as on disk;
    durable, with its directory entry, before the piece changes."""
    path = tmp_path / "disk.img"
    model = rotated(path, kr, rng)
    synced_dirs: list[Path] = []
    real_fsync_dir = rekey.fsync_dir
    monkeypatch.setattr(rekey, "fsync_dir", lambda d: (synced_dirs.append(Path(d)), real_fsync_dir(d)))
    logs: list[bytes] = []

    def hook(name: str) -> None:
        if name == "rekey-log-synced":
            raw = rekey_path(path).read_bytes()
            logs.append(raw)
            first, count = LOG_HEAD.unpack_from(raw)[4:6]
            d, t = slice(first * BS, (first + count) * BS), slice(HEADER_SIZE + first * 32, HEADER_SIZE + (first + count) * 32)
            assert (path.read_bytes()[d], tags_path(path).read_bytes()[t]) == (before[0][d], before[1][t])  # untouched yet

    before = (path.read_bytes(), tags_path(path).read_bytes())
    crash_at(monkeypatch, "none", hook=hook)
    with open_image(path, len(model), kr, writable=True) as img:
        dirs_at_open = len(synced_dirs)
        img.rekey()
    assert synced_dirs[dirs_at_open:] == [tmp_path]  # once, for the new file
    uid = before[1][6:22]
    data, tags = before
    covered = []
    for raw in logs:
        magic, version, log_uid, size, first, count, crc = LOG_HEAD.unpack_from(raw)
        assert (magic, version, log_uid, size) == (b"NSRK", 1, uid, len(model))
        assert 0 < count <= 24 and crc == zlib.crc32(raw[46:], zlib.crc32(raw[:42]))
        ents = raw[46 : 46 + count * ENTRY_SIZE]
        cts = raw[46 + count * ENTRY_SIZE :]
        slot = 0
        for i in range(count):
            blk = first + i
            e = ents[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE]
            on_disk = tags[HEADER_SIZE + blk * ENTRY_SIZE : HEADER_SIZE + (blk + 1) * ENTRY_SIZE]
            if int.from_bytes(on_disk[:4], "big") == 1:  # re-sealed: logged as it was
                assert e == on_disk
                assert cts[slot * BS : (slot + 1) * BS] == data[blk * BS : (blk + 1) * BS].ljust(BS, b"\0")
                covered.append(blk)
                slot += 1
            else:  # a hole, or under key 2 already: not logged
                assert e == bytes(ENTRY_SIZE)
        assert len(cts) == slot * BS
    assert covered == [b for b in range(101) if int.from_bytes(tags[HEADER_SIZE + b * 32 :][:4], "big") == 1]


def test_key_usage_counts_the_old_key_of_a_pending_log(tmp_path: Path, kr: atrest.Keyring, rng: random.Random,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture, small_pieces: None):
    """Cut after the last piece is durable but before its log is void: every
    live block is under key 2, yet key 1 must not be retired yet."""
    path = tmp_path / "disk.img"
    model = rotated(path, kr, rng)
    seen = crash_at(monkeypatch, "none")
    with open_image(path, len(model), kr, writable=True) as img:  # a dry run counts the pieces
        shutil.copy(path, tmp_path / "keep")
        shutil.copy(tags_path(path), tmp_path / "keep.tags")
        img.rekey()
    shutil.copy(tmp_path / "keep", path)
    shutil.copy(tmp_path / "keep.tags", tags_path(path))
    crash_at(monkeypatch, "rekey-synced", seen["rekey-synced"])
    img = open_image(path, len(model), kr, writable=True)
    with pytest.raises(Crash):
        img.rekey()
    monkeypatch.setattr(rekey, "failpoint", None)
    try:
        usage = img.key_usage()
        assert usage[2] == 101 - 6 and 0 < usage[1] <= 24  # live: all key 2; logged: the last piece
    finally:
        img.close()
    assert all(entry(path, b)[0] in (0, 2) for b in range(101))
    with open_image(path, len(model), kr, writable=False) as ro:
        assert ro.key_usage() == usage
        assert ro.pread(0, len(model)) == model
    rekey_done(path, kr, model, caplog, "0 torn block(s) laid back")


def test_recovery_keeps_writes_made_after_the_log(tmp_path: Path, kr: atrest.Keyring, rng: random.Random,
                                                  monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                  small_pieces: None):
    """Only torn blocks are laid back: a block written or zeroed (and fsynced
    by its writer) after its piece was logged keeps the newer contents."""
    path = tmp_path / "disk.img"
    model = rotated(path, kr, rng)
    img = open_image(path, len(model), kr, writable=True)
    snap: dict[str, bytes] = {}
    new = rng.randbytes(BS)

    def hook(name: str) -> None:
        if name == "rekey-log-synced" and not snap:  # the first piece: blocks 0..23
            img.pwrite(new, 3 * BS)
            img.zero(12 * BS, BS)
            img.fsync()
            snap["data"], snap["tags"] = path.read_bytes(), tags_path(path).read_bytes()

    crash_at(monkeypatch, "rekey-entries-written", 3, hook)  # the first piece's last run
    model[3 * BS : 4 * BS] = new
    model[12 * BS : 13 * BS] = bytes(BS)
    with pytest.raises(Crash):
        img.rekey()
    img.close()
    monkeypatch.setattr(rekey, "failpoint", None)
    path.write_bytes(snap["data"])  # the power loss: every block re-sealed in that piece is torn
    with open_image(path, len(model), kr, writable=False) as ro:
        assert ro.pread(0, len(model)) == model
    rekey_done(path, kr, model, caplog, "6 torn block(s) laid back", blocks=101 - 7)


def test_rekey_with_concurrent_writers(tmp_path: Path, kr: atrest.Keyring, rng: random.Random, seed: int,
                                       small_pieces: None):
    path = tmp_path / "disk.img"
    model = rotated(path, kr, rng)
    img = open_image(path, len(model), kr, writable=True)
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(t: int) -> None:
        r = random.Random(seed * 10 + t)
        try:
            while not stop.is_set():
                blk = r.randrange(100)
                with lock:  # the model and the image change together
                    if r.random() < 0.2:
                        img.zero(blk * BS, BS)
                        model[blk * BS : (blk + 1) * BS] = bytes(BS)
                    else:
                        data = r.randbytes(r.randrange(1, BS))
                        at = blk * BS + r.randrange(BS - len(data) + 1)
                        img.pwrite(data, at)
                        model[at : at + len(data)] = data
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for th in ths:
        th.start()
    try:
        img.rekey()
        img.rekey()
    finally:
        stop.set()
        for th in ths:
            th.join()
    try:
        assert not errors, errors
        assert set(img.key_usage()) <= {2}
        assert img.pread(0, len(model)) == model
    finally:
        img.close()


def test_rotation_reaches_an_open_image_within_a_second(tmp_path: Path, kr: atrest.Keyring,
                                                         monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "disk.img"
    with open_image(path, 4 * BS, kr, writable=True, create=True) as img:
        img.pwrite(b"a" * BS, 0)
        atrest.rotate(kr.path)  # another process: this Keyring object is not told
        monkeypatch.setattr(sealing, "_REFRESH_S", 0.0)  # instead of waiting a second
        img.pwrite(b"b" * BS, BS)
        assert img.key_usage() == {1: 1, 2: 1}


def test_a_sealed_image_stays_sealed_when_encryption_is_turned_off(tmp_path: Path, kr: atrest.Keyring):
    path = tmp_path / "disk.img"
    open_image(path, 4 * BS, kr, writable=True, create=True).close()
    atrest.rotate(kr.path)
    off = atrest.ensure(kr.path, False)
    assert off is not None and off.active is None
    with open_image(path, 4 * BS, off, writable=True) as img:
        assert img.sealed
        img.pwrite(PATTERN, 0)
        assert img.key_usage() == {2: 1}  # the newest key
    assert MARKER not in path.read_bytes()


def test_plain_images_when_no_active_key(tmp_path: Path, kr: atrest.Keyring):
    with open_image(tmp_path / "a.img", 4 * BS, None, writable=True, create=True) as img:
        assert not img.sealed and img.key_usage() == {} and img.rekey() == 0
        img.pwrite(PATTERN, BS)
        assert isinstance(img.fileno(), int)
    assert not tags_path(tmp_path / "a.img").exists() and MARKER in (tmp_path / "a.img").read_bytes()
    off = atrest.ensure(kr.path, False)
    with open_image(tmp_path / "b.img", 4 * BS, off, writable=True, create=True) as img:
        assert not img.sealed
    assert not tags_path(tmp_path / "b.img").exists()
    # an image written in clear before encryption was turned on keeps working in clear
    on = atrest.ensure(kr.path, True)
    with open_image(tmp_path / "a.img", 4 * BS, on, writable=True, create=True) as img:
        assert not img.sealed and img.pread(BS, BS) == PATTERN
    with open_image(tmp_path / "c.img", 4 * BS, on, writable=True, create=True) as img:
        assert img.sealed
        with pytest.raises(io.UnsupportedOperation, match="sealed"):
            img.fileno()


def test_create_after_a_crash_between_sidecar_and_data_file(tmp_path: Path, kr: atrest.Keyring):
    path = tmp_path / "disk.img"
    tags_path(path).write_bytes(b"stale")
    with open_image(path, 4 * BS, kr, writable=True, create=True) as img:
        assert img.sealed
    path.unlink()
    with open_image(path, 4 * BS, None, writable=True, create=True) as img:
        assert not img.sealed
    assert not tags_path(path).exists()  # or the next open would take it for sealed


# -- extents, resize, bounds --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_extents(tmp_path: Path, kr: atrest.Keyring, kind: str):
    with open_image(tmp_path / "d.img", 64 * BS, kr if kind == "sealed" else None, writable=True,
                    create=True) as img:
        assert img.extents(0, 64 * BS) == []
        img.pwrite(b"x" * 10, 3 * BS + 100)
        img.pwrite(b"y" * 2 * BS, 4 * BS)
        img.pwrite(b"z", 40 * BS)
        if kind == "sealed":
            assert img.extents(0, 64 * BS) == [(3 * BS, 3 * BS), (40 * BS, BS)]
            assert img.extents(3 * BS + 50, 2 * BS) == [(3 * BS + 50, 2 * BS)]
            assert img.extents(10 * BS, 30 * BS) == []
        ext = img.extents(0, 64 * BS)
        assert any(o <= 3 * BS + 100 and 4 * BS + 2 * BS <= o + n for o, n in ext)
        img.zero(0, 64 * BS)
        assert img.extents(0, 64 * BS) == []


@pytest.mark.parametrize("kind", ["plain", "sealed"])
@pytest.mark.parametrize("old,new", [(8 * BS, 20 * BS), (8 * BS + 512, 9 * BS + 1024), (8 * BS + 512, 30 * BS),
                                     (20 * BS, 5 * BS + 2048), (9 * BS + 512, 9 * BS + 100)])
def test_resize(tmp_path: Path, kr: atrest.Keyring, rng: random.Random, kind: str, old: int, new: int):
    path = tmp_path / "d.img"
    keyring = kr if kind == "sealed" else None
    data = rng.randbytes(old)
    with open_image(path, old, keyring, writable=True, create=True) as img:
        img.pwrite(data, 0)
        img.resize(new)
        assert img.size == new and os.stat(path).st_size == new
        want = data[:new].ljust(new, b"\0")
        assert img.pread(0, new) == want
        with pytest.raises(ValueError, match="outside the image"):
            img.pread(new - 1, 2)
        img.pwrite(b"q" * 100, new - 100)  # the (new) last block takes writes
        want = want[:-100] + b"q" * 100
    with open_image(path, new, keyring, writable=False) as img:
        assert img.size == new and img.pread(0, new) == want
    # a writable open with another size resizes (a grown vdisk grows its image)
    with open_image(path, new + BS + 512, keyring, writable=True) as img:
        assert img.pread(0, new + BS + 512) == want + bytes(BS + 512)
    with open_image(path, new + BS + 512, keyring, writable=False) as img:
        assert img.pread(0, new + BS + 512) == want + bytes(BS + 512)


@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_read_only_open_of_another_size(tmp_path: Path, kr: atrest.Keyring, kind: str):
    path = tmp_path / "d.img"
    keyring = kr if kind == "sealed" else None
    with open_image(path, 3 * BS + 512, keyring, writable=True, create=True) as img:
        img.pwrite(b"w" * (3 * BS + 512), 0)
    with open_image(path, 6 * BS, keyring, writable=False) as img:  # the vdisk grew; nothing written there yet
        assert img.pread(0, 6 * BS) == b"w" * (3 * BS + 512) + bytes(3 * BS - 512)
        with pytest.raises(io.UnsupportedOperation, match="read-only"):
            img.pwrite(b"x", 0)
        with pytest.raises(io.UnsupportedOperation, match="read-only"):
            img.zero(0, 1)
    assert os.stat(path).st_size == 3 * BS + 512


@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_bounds(tmp_path: Path, kr: atrest.Keyring, kind: str):
    with open_image(tmp_path / "d.img", 4 * BS, kr if kind == "sealed" else None, writable=True,
                    create=True) as img:
        for bad in ((-1, 1), (0, 4 * BS + 1), (4 * BS, 1), (5, -1)):
            with pytest.raises(ValueError, match=r"d\.img: range .* is outside the image \(size 16384\)"):
                img.pread(*bad)
            with pytest.raises(ValueError):
                img.zero(*bad)
        with pytest.raises(ValueError):
            img.pwrite(b"xx", 4 * BS - 1)
        assert img.pread(4 * BS, 0) == b"" and img.extents(4 * BS, 0) == []
        img.pwrite(b"", 4 * BS)
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.img", 4 * BS, kr, writable=False)


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_concurrent_writers_and_readers(tmp_path: Path, kr: atrest.Keyring, seed: int, kind: str):
    nthreads, nblocks = 6, 96
    size = nblocks * BS
    final: dict[int, bytes] = {}  # block -> last content its owner wrote
    errors: list[BaseException] = []
    stop = threading.Event()
    img = open_image(tmp_path / "d.img", size, kr if kind == "sealed" else None, writable=True, create=True)

    def writer(t: int) -> None:
        r = random.Random(seed * 100 + t)
        mine = [b for b in range(nblocks - 4) if b % nthreads == t]  # the last 4 are the halves'
        try:
            for _ in range(150):
                b = r.choice(mine)
                if r.random() < 0.5:
                    data = r.randbytes(BS)
                    img.pwrite(data, b * BS)
                else:  # two unaligned writes into one block: read-modify-write
                    cur = bytearray(final.get(b, bytes(BS)))
                    at = r.randrange(BS - 100)
                    part = r.randbytes(r.randrange(1, 100))
                    img.pwrite(part, b * BS + at)
                    cur[at : at + len(part)] = part
                    data = bytes(cur)
                final[b] = data
                assert img.pread(b * BS, BS) == data
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def halves(t: int) -> None:
        """Two threads writing the two halves of the same blocks (not whole blocks)."""
        r = random.Random(seed * 1000 + t)
        try:
            for i in range(200):
                b = nblocks - 1 - r.randrange(4)
                img.pwrite(bytes([t + 1]) * (BS // 2), b * BS + t * (BS // 2))
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                img.pread(0, size)  # never a spurious failure for a block being written
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    ths += [threading.Thread(target=halves, args=(t,)) for t in range(2)]
    rd = [threading.Thread(target=reader) for _ in range(2)]
    for th in ths + rd:
        th.start()
    for th in ths:
        th.join()
    stop.set()
    for th in rd:
        th.join()
    try:
        assert not errors, errors
        for b in range(nblocks - 4):
            assert img.pread(b * BS, BS) == final.get(b, bytes(BS)), f"block {b}"
        for b in range(nblocks - 4, nblocks):  # both halves survived each other's read-modify-write
            got = img.pread(b * BS, BS)
            assert got in (bytes(BS), b"\x01" * (BS // 2) + bytes(BS // 2), bytes(BS // 2) + b"\x02" * (BS // 2),
                           b"\x01" * (BS // 2) + b"\x02" * (BS // 2))
        assert any(img.pread(b * BS, BS) == b"\x01" * (BS // 2) + b"\x02" * (BS // 2)
                   for b in range(nblocks - 4, nblocks))
    finally:
        img.close()


def test_a_read_that_sees_a_block_mid_change_is_redone_under_the_lock(tmp_path: Path, kr: atrest.Keyring,
                                                                       monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "d.img"
    with open_image(path, 4 * BS, kr, writable=True, create=True) as img:
        img.pwrite(b"k" * 4 * BS, 0)
        real = img._decrypt_run  # type: ignore[attr-defined]
        calls: list[bool] = []

        def flaky(c0: int, c1: int, strict: bool):
            calls.append(strict)
            if not strict:
                raise sealed._Retry
            assert img._lock.locked()  # type: ignore[attr-defined]
            return real(c0, c1, strict)

        monkeypatch.setattr(img, "_decrypt_run", flaky)
        assert img.pread(100, 2 * BS) == b"k" * 2 * BS
        assert calls == [False, True]


# -- blobs ----------------------------------------------------------------------------------------


def test_blob_sealer(tmp_path: Path, kr: atrest.Keyring):
    s = BlobSealer(kr, b"replica undo")
    assert s.sealing
    blob = s.seal(PATTERN, b"at 4096")
    assert len(blob) == len(PATTERN) + BlobSealer.overhead(True) == len(PATTERN) + 32
    assert MARKER not in blob and int.from_bytes(blob[:4], "big") == 1
    assert s.open(blob, b"at 4096") == PATTERN
    assert s.seal(b"", b"") and s.open(s.seal(b"", b""), b"") == b""
    with pytest.raises(SealedError, match="replica undo blob fails authentication"):
        s.open(blob, b"at 8192")  # moved
    with pytest.raises(SealedError, match="fails authentication"):
        s.open(blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], b"at 4096")
    with pytest.raises(SealedError, match="fails authentication"):  # another purpose, another subkey
        BlobSealer(kr, b"something else").open(blob, b"at 4096")
    with pytest.raises(SealedError, match="truncated"):
        s.open(blob[:20], b"at 4096")
    with pytest.raises(SealedError, match="no at-rest keyring"):
        BlobSealer(None, b"replica undo").open(blob, b"at 4096")
    # rotation: new blobs under key 2, old ones still open
    atrest.rotate(kr.path)
    kr.refresh()
    assert int.from_bytes(s.seal(b"x", b"")[:4], "big") == 2
    assert s.open(blob, b"at 4096") == PATTERN
    # no keyring, or no active key: in clear, and still readable once encryption is on
    for keyring in (None, atrest.ensure(kr.path, False)):
        clear_sealer = BlobSealer(keyring, b"replica undo")
        assert not clear_sealer.sealing
        c = clear_sealer.seal(PATTERN, b"at 0")
        assert c == bytes(4) + PATTERN and len(c) == len(PATTERN) + BlobSealer.overhead(False)
        assert s.open(c, b"whatever") == PATTERN


@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_large_writes_reach_the_data_file_in_pieces(tmp_path: Path, kr: atrest.Keyring, rng: random.Random,
                                                     kind: str, monkeypatch: pytest.MonkeyPatch):
    """A large `pwrite` and a long run of `write_blocks` reach the data file
    in calls of at most `fsutil.WRITE_PIECE` bytes (large page-cache folios,
    docs/benchmarks.md) and read back whole."""
    from nicsplit.core import fsutil

    size = 4 * RUN_BLOCKS * BS
    img = open_image(tmp_path / "disk.img", size, kr if kind == "sealed" else None, writable=True, create=True)
    data_fd = img._fd
    sizes: list[int] = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def spy_pwrite(fd, data, offset):
        if fd == data_fd:
            sizes.append(len(data))
        return real_pwrite(fd, data, offset)

    def spy_pwritev(fd, bufs, offset):
        if fd == data_fd:
            sizes.append(sum(len(b) for b in bufs))
        return real_pwritev(fd, bufs, offset)

    monkeypatch.setattr(os, "pwrite", spy_pwrite)
    monkeypatch.setattr(os, "pwritev", spy_pwritev)
    try:
        big = rng.randbytes(RUN_BLOCKS * BS + 3 * BS)
        img.pwrite(big, BS)
        blocks = [(b, rng.randbytes(BS)) for b in range(2 * RUN_BLOCKS, 2 * RUN_BLOCKS + 300)]
        img.write_blocks(blocks)
        assert sizes and max(sizes) <= fsutil.WRITE_PIECE, sizes
        assert sum(sizes) == len(big) + 300 * BS
        assert img.pread(BS, len(big)) == big
        assert img.pread(2 * RUN_BLOCKS * BS, 300 * BS) == b"".join(c for _, c in blocks)
    finally:
        img.close()
