"""Unit tests of nicsplit.host.datastore: catalog, IO semantics, log replay."""

from __future__ import annotations

import json
import logging
import os
import random
import threading

import pytest

from nicsplit.host.datastore import (
    CorruptDatastore,
    Datastore,
    DatastoreBusy,
    DatastoreError,
    UnknownVdisk,
    VdiskExists,
)
from nicsplit.host.datastore import store as store_mod
from nicsplit.core.fsutil import WRITE_PIECE
from nicsplit.host.datastore.extentlog import LOG_HEADER, RECORD

ES = 8192  # tiny extents: boundaries are easy to hit
VS = 8 * ES  # header + 7 data extents per volume: several volumes quickly
MiB = 1 << 20


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "ds")


@pytest.fixture
def ds(path):
    d = Datastore.create(path, volume_size=VS, extent_size=ES)
    d.create_vdisk("a", MiB)
    d.create_vdisk("b", MiB)
    d.open_io()
    yield d
    d.close()


def reopen(d: Datastore, **kw) -> Datastore:
    d.close()
    d2 = Datastore.open(d.path)
    d2.open_io(**kw)
    return d2


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ---- create / open / catalog ----------------------------------------------


def test_create_layout_and_catalog_fields(path):
    d = Datastore.create(path, volume_size=VS, extent_size=ES)
    info = d.create_vdisk("web1-root", 3 * ES, owner="vm:web1", extra={"cg": "g1"})
    assert sorted(os.listdir(path)) == ["catalog.json", "catalog.lock", "extents.log", "vol-0000.dsk"]
    cat = json.load(open(os.path.join(path, "catalog.json")))
    assert cat["next_id"] == 2 and cat["extent_size"] == ES and cat["volume_size"] == VS
    (v,) = cat["vdisks"]
    assert v == {
        "name": "web1-root", "uuid": info.uuid, "id": 1, "owner": "vm:web1", "size": 3 * ES,
        "block_size": 4096, "readonly": False, "created": info.created, "extra": {"cg": "g1"},
    }
    assert Datastore.open(path).get_vdisk("web1-root") == info


def test_create_twice_is_an_error(path):
    Datastore.create(path)
    with pytest.raises(DatastoreError, match="already exists"):
        Datastore.create(path)


def test_open_missing(tmp_path):
    with pytest.raises(DatastoreError, match="no datastore at"):
        Datastore.open(tmp_path / "nope")


@pytest.mark.parametrize("es,vs", [(1000, 1 << 20), (0, 1 << 20), (4096, 4096), (4096, 3 * 4096 + 1)])
def test_bad_geometry(tmp_path, es, vs):
    with pytest.raises(DatastoreError, match="extent_size|volume_size"):
        Datastore.create(tmp_path / "ds", volume_size=vs, extent_size=es)


@pytest.mark.parametrize("name", ["", "a" * 65, "a/b", "sp ace", "é", None, 3, "_x", ".", "..", ".hidden", "--"])
def test_name_validation(path, name):
    d = Datastore.create(path)
    with pytest.raises(DatastoreError, match=r"bad vdisk name .*: use 1-64 of A-Z a-z 0-9 \. _ -, starting with a letter or digit"):
        d.create_vdisk(name, 4096)


@pytest.mark.parametrize("size", [0, -512, 1000, 4097, 1.5, True, "4096"])
def test_size_validation(path, size):
    d = Datastore.create(path)
    with pytest.raises(DatastoreError, match="positive multiple of 512"):
        d.create_vdisk("x", size)


def test_list_get_update_delete(path):
    d = Datastore.create(path, volume_size=VS, extent_size=ES)
    a = d.create_vdisk("a", 4096, owner="container:db")
    b = d.create_vdisk("b", 8192, readonly=True)
    with pytest.raises(VdiskExists, match="'a' already exists"):
        d.create_vdisk("a", 4096)
    assert [v.name for v in d.list_vdisks()] == ["a", "b"]
    assert (a.id, b.id) == (1, 2)
    u = d.update_vdisk("a", owner="vm:x", extra={"cg": "cg7"}, size=8192, name="a2")
    assert (u.name, u.owner, u.extra, u.size, u.id, u.uuid) == ("a2", "vm:x", {"cg": "cg7"}, 8192, a.id, a.uuid)
    with pytest.raises(UnknownVdisk):
        d.get_vdisk("a")
    with pytest.raises(DatastoreError, match="shrinking"):
        d.update_vdisk("a2", size=4096)
    with pytest.raises(DatastoreError, match="cannot change id"):
        d.update_vdisk("a2", id=9)
    with pytest.raises(VdiskExists):
        d.update_vdisk("a2", name="b")
    d.delete_vdisk("a2")  # takes the IO lock for the call
    with pytest.raises(UnknownVdisk, match="no vdisk 'a2'"):
        d.delete_vdisk("a2")
    # ids are never reused
    assert d.create_vdisk("a", 4096).id == 3
    assert [v.name for v in Datastore.open(path).list_vdisks()] == ["b", "a"]


def test_reload_catalog_sees_other_writer(ds):
    cli = Datastore.open(ds.path)  # catalog-only, like the CLI
    assert not ds.reload_catalog()
    cli.create_vdisk("c", 4096, owner="vm:c")
    assert ds.reload_catalog()
    assert ds.get_vdisk("c").owner == "vm:c"
    assert not ds.reload_catalog()
    # vdisk() of a name created elsewhere reloads on its own
    cli.create_vdisk("d", 4096)
    ds.vdisk("d").pwrite(0, b"d" * 4096)
    # updates through the CLI reach open handles
    h = ds.vdisk("c")
    cli.update_vdisk("c", readonly=True)
    ds.reload_catalog()
    with pytest.raises(DatastoreError, match="read-only"):
        h.pwrite(0, b"x")


def test_readonly_refuses_writes(ds):
    ds.create_vdisk("ro", ES, readonly=True)
    h = ds.vdisk("ro")
    for op in (lambda: h.pwrite(0, b"x"), lambda: h.trim(0, 512), lambda: h.zero(0, 512)):
        with pytest.raises(DatastoreError, match="read-only"):
            op()
    assert h.pread(0, 16) == bytes(16)


def test_delete_while_another_process_holds_lock(ds):
    other = Datastore.open(ds.path)
    with pytest.raises(DatastoreBusy, match=f"in use by pid {os.getpid()}"):
        other.delete_vdisk("a")
    assert other.get_vdisk("a")


def test_second_open_io_is_busy(ds):
    with pytest.raises(DatastoreBusy, match=rf"{ds.path} is in use by pid {os.getpid()}"):
        Datastore.open(ds.path).open_io()
    with pytest.raises(DatastoreError, match="already open"):
        ds.open_io()


def test_io_needs_open_io(path):
    d = Datastore.create(path)
    d.create_vdisk("a", 4096)
    with pytest.raises(DatastoreError, match="not open for IO"):
        d.vdisk("a")


# ---- IO semantics ------------------------------------------------------------


def test_unallocated_reads_zero(ds):
    a = ds.vdisk("a")
    assert a.pread(0, MiB) == bytes(MiB)
    assert a.extents(0, MiB) == [(MiB, 3)]
    assert a.physical(12345) is None
    assert ds.statistics().extents_allocated == 0


@pytest.mark.parametrize("offset,length", [(0, 512), (ES - 1, 2), (ES - 100, 3 * ES + 200), (5, ES), (0, 4 * ES), (MiB - 7, 7)])
def test_read_after_write_across_boundaries(ds, offset, length):
    a = ds.vdisk("a")
    data = pattern(offset, length)
    a.pwrite(offset, data)
    assert a.pread(offset, length) == data
    assert a.pread(offset - 1, 1) == b"\0" if offset else True
    # a fresh extent reads zeros where not written
    lo = offset // ES * ES
    hi = -(-(offset + length) // ES) * ES
    img = a.pread(lo, hi - lo)
    assert img == bytes(offset - lo) + data + bytes(hi - offset - length)
    assert ds.statistics().extents_allocated == (hi - lo) // ES


def test_memoryview_and_bytearray_writes(ds):
    a = ds.vdisk("a")
    a.pwrite(10, memoryview(b"abcdef")[1:4])
    a.pwrite(ES - 2, bytearray(b"wxyz"))
    assert a.pread(10, 3) == b"bcd" and a.pread(ES - 2, 4) == b"wxyz"


def test_out_of_range(ds):
    a = ds.vdisk("a")
    for op in (lambda: a.pwrite(MiB - 1, b"xx"), lambda: a.pwrite(-1, b"x"), lambda: a.pread(MiB, 1),
               lambda: a.trim(0, MiB + 1), lambda: a.zero(-512, 512), lambda: a.extents(1, MiB), lambda: a.physical(MiB)):
        with pytest.raises(ValueError, match=r"outside \[0, 1048576\)"):
            op()
    assert ds.statistics().extents_allocated == 0


def test_physical_differs_from_virtual(ds):
    a, b = ds.vdisk("a"), ds.vdisk("b")
    a.pwrite(0, b"a" * 10)
    b.pwrite(0, b"b" * 10)
    # extent 0 of every volume is the header: virtual 0 never lands on physical 0
    assert a.physical(0) == (0, ES) and a.physical(7) == (0, ES + 7)
    assert b.physical(0) == (0, 2 * ES)
    a.pwrite(5 * ES + 5, b"q")  # allocation order, not virtual position
    assert a.physical(5 * ES + 5) == (0, 3 * ES + 5)
    for h, ch in ((a, b"a"), (b, b"b")):  # the bytes really are where physical() says
        vol, off = h.physical(0)
        with open(os.path.join(ds.path, f"vol-{vol:04d}.dsk"), "rb") as f:
            f.seek(off)
            assert f.read(10) == ch * 10


def test_multiple_volumes(ds):
    a = ds.vdisk("a")
    data = pattern(1, 20 * ES)  # 20 extents, 7 per volume -> 3 volumes
    a.pwrite(0, data)
    st = ds.statistics()
    assert st.volumes == 3 and st.extents_allocated == 20 and st.extents_fresh == 1
    assert {a.physical(i * ES)[0] for i in range(20)} == {0, 1, 2}
    assert a.pread(0, 20 * ES) == data
    ds = reopen(ds)
    assert ds.vdisk("a").pread(0, 20 * ES) == data
    for i in range(3):
        assert os.path.getsize(os.path.join(ds.path, f"vol-{i:04d}.dsk")) <= VS


def test_interleaved_vdisks_never_bleed(ds):
    a, b = ds.vdisk("a"), ds.vdisk("b")
    rng = random.Random(7)
    ma, mb = bytearray(MiB // 4), bytearray(MiB // 4)
    for n in range(300):
        h, m = (a, ma) if n % 2 else (b, mb)
        off = rng.randrange(0, len(m) - 1)
        ln = rng.randrange(1, min(3 * ES, len(m) - off))
        data = bytes([n % 251 + 1]) * ln
        h.pwrite(off, data)
        m[off : off + ln] = data
    assert a.pread(0, len(ma)) == ma and b.pread(0, len(mb)) == mb


def test_trim_whole_and_partial(ds):
    a = ds.vdisk("a")
    a.pwrite(0, b"\xff" * 4 * ES)
    a.trim(ES, ES)  # whole extent: released
    assert a.physical(ES) is None
    st = ds.statistics()
    assert (st.extents_allocated, st.extents_free_pending) == (3, 1)
    a.trim(2 * ES + 100, 1000)  # partial: punched, stays mapped
    assert a.physical(2 * ES) is not None
    assert a.pread(2 * ES + 100, 1000) == bytes(1000)
    assert a.pread(2 * ES + 99, 1) == b"\xff" and a.pread(2 * ES + 1100, 1) == b"\xff"
    a.trim(3 * ES - 10, 20)  # spans two partial extents
    expect = (b"\xff" * ES + bytes(ES) + b"\xff" * 100 + bytes(1000) + b"\xff" * (ES - 1110)
              + bytes(20) + b"\xff" * (ES - 10))
    assert a.pread(0, 4 * ES) == expect
    assert a.extents(0, 4 * ES) == [(ES, 0), (ES, 3), (2 * ES, 0)]
    a.trim(0, MiB)
    assert a.extents(0, MiB) == [(MiB, 3)] and ds.statistics().extents_allocated == 0
    assert a.pread(0, MiB) == bytes(MiB)


def test_trim_tail_extent_of_odd_sized_vdisk(ds):
    ds.create_vdisk("odd", ES + 512)
    h = ds.vdisk("odd")
    h.pwrite(0, b"x" * (ES + 512))
    h.trim(ES, 512)  # all of the tail extent that lies inside the vdisk
    assert h.physical(ES) is None


def test_zero_hole_and_no_hole(ds):
    a = ds.vdisk("a")
    a.pwrite(0, b"\x11" * 3 * ES)
    a.zero(0, ES)  # may hole: released
    assert a.physical(0) is None
    a.zero(ES + 8, 16, no_hole=True)
    assert a.physical(ES) is not None
    assert a.pread(ES, 32) == b"\x11" * 8 + bytes(16) + b"\x11" * 8
    a.zero(2 * ES, ES, no_hole=True)  # whole extent kept allocated
    assert a.physical(2 * ES) is not None and a.pread(2 * ES, ES) == bytes(ES)
    a.zero(5 * ES, 2 * ES, no_hole=True)  # unallocated: allocated, zero
    assert a.extents(0, 7 * ES) == [(ES, 3), (2 * ES, 0), (2 * ES, 3), (2 * ES, 0)]
    assert a.pread(5 * ES, 2 * ES) == bytes(2 * ES)
    ds = reopen(ds)
    a = ds.vdisk("a")
    assert a.extents(0, 7 * ES) == [(ES, 3), (2 * ES, 0), (2 * ES, 3), (2 * ES, 0)]
    assert a.pread(ES, 32) == b"\x11" * 8 + bytes(16) + b"\x11" * 8


def test_extents_merge_and_subrange(ds):
    a = ds.vdisk("a")
    a.pwrite(ES, b"x")
    a.pwrite(2 * ES, b"x")
    a.pwrite(4 * ES, b"x")
    assert a.extents(0, 6 * ES) == [(ES, 3), (2 * ES, 0), (ES, 3), (ES, 0), (ES, 3)]
    assert a.extents(ES + 10, 20) == [(20, 0)]
    assert a.extents(ES - 10, 20) == [(10, 3), (10, 0)]
    assert a.extents(0, 0) == []


def test_delete_recreate_reuse_reads_zeros(ds):
    a = ds.vdisk("a")
    a.pwrite(0, b"\xaa" * 5 * ES)
    old = {a.physical(i * ES) for i in range(5)}
    ds.delete_vdisk("a")
    with pytest.raises(UnknownVdisk, match="deleted"):
        a.pread(0, 1)
    st = ds.statistics()
    assert (st.extents_allocated, st.extents_free, st.extents_free_pending) == (0, 5, 0)
    ds.create_vdisk("a", MiB)
    a2 = ds.vdisk("a")
    a2.pwrite(ES // 2, b"\xbb" * (5 * ES - ES))  # partial first/last extents
    assert {a2.physical(i * ES) for i in range(5)} == old  # really reused
    assert a2.pread(0, 5 * ES) == bytes(ES // 2) + b"\xbb" * 4 * ES + bytes(ES // 2)
    assert ds.statistics().volumes == 1


def test_trimmed_extent_reused_only_after_sync(ds):
    a, b = ds.vdisk("a"), ds.vdisk("b")
    a.pwrite(0, b"\xcc" * ES)
    p = a.physical(0)
    a.trim(0, ES)
    b.pwrite(0, b"\x01")
    assert b.physical(0) != p  # pending until the punch is durable
    ds.sync()
    b.pwrite(ES + 1, b"\x02")
    assert b.physical(ES + 1) == (p[0], p[1] + 1)
    assert b.pread(ES, ES) == b"\0\x02" + bytes(ES - 2)


def test_reopen_replays_map(ds):
    a, b = ds.vdisk("a"), ds.vdisk("b")
    a.pwrite(3 * ES, b"hello")
    b.pwrite(0, b"world" * 5000)
    a.trim(3 * ES, ES)
    a.pwrite(9 * ES, b"again")
    phys = (a.physical(9 * ES), b.physical(0))
    ds = reopen(ds)
    a, b = ds.vdisk("a"), ds.vdisk("b")
    assert (a.physical(9 * ES), b.physical(0)) == phys
    assert a.physical(3 * ES) is None
    assert a.pread(9 * ES, 5) == b"again" and b.pread(0, 25000) == b"world" * 5000


def test_compaction(ds, monkeypatch):
    a = ds.vdisk("a")
    for _ in range(30):
        a.pwrite(0, b"x" * 2 * ES)
        a.trim(0, 2 * ES)
    a.pwrite(ES, b"kept")
    ds = reopen(ds, compact=False)
    assert ds.statistics().log_records == 121
    monkeypatch.setattr(store_mod, "COMPACT_SLACK", 10)
    ds = reopen(ds)  # automatic: 121 > 2 * 1 + 10
    st = ds.statistics()
    assert st.log_records == 1 and st.log_bytes == LOG_HEADER.size + RECORD.size
    assert ds.vdisk("a").pread(ES, 4) == b"kept"
    assert not os.path.exists(os.path.join(ds.path, "extents.log.tmp"))
    ds = reopen(ds)
    assert ds.vdisk("a").pread(ES, 4) == b"kept"


def _log_path(d):
    return os.path.join(d.path, "extents.log")


@pytest.mark.parametrize("cut", [1, 13, RECORD.size - 1])
def test_torn_tail_is_truncated(ds, caplog, cut):
    a = ds.vdisk("a")
    a.pwrite(0, b"first")
    a.pwrite(ES, b"second")
    ds.close()
    lp = _log_path(ds)
    size = os.path.getsize(lp)
    with open(lp, "r+b") as f:
        f.truncate(size - cut)  # the second MAP is torn
    d2 = Datastore.open(ds.path)
    with caplog.at_level(logging.WARNING):
        d2.open_io()
    assert "truncating torn tail" in caplog.text
    assert os.path.getsize(lp) == size - RECORD.size
    a = d2.vdisk("a")
    assert a.pread(0, 5) == b"first"
    assert a.physical(ES) is None and a.pread(ES, 6) == bytes(6)  # unmapped data was punched
    a.pwrite(ES, b"again")
    d2 = reopen(d2)
    assert d2.vdisk("a").pread(ES, 5) == b"again"
    d2.close()


def test_bad_crc_at_tail_is_torn(ds, caplog):
    a = ds.vdisk("a")
    a.pwrite(0, b"1")
    a.pwrite(ES, b"2")
    ds.close()
    lp = _log_path(ds)
    with open(lp, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xde\xad\xbe")
    d2 = Datastore.open(ds.path)
    with caplog.at_level(logging.WARNING):
        d2.open_io()
    assert "torn tail" in caplog.text and d2.statistics().log_records == 1
    d2.close()


def test_corrupt_middle_record_is_an_error(ds):
    a = ds.vdisk("a")
    for i in range(3):
        a.pwrite(i * ES, b"x")
    ds.close()
    with open(_log_path(ds), "r+b") as f:
        f.seek(LOG_HEADER.size + RECORD.size + 5)
        f.write(b"\x99")
    with pytest.raises(CorruptDatastore, match=r"corrupt record 1 at byte 76 is followed by valid record 2"):
        Datastore.open(ds.path).open_io()
    # the lock is released after the failed open
    with pytest.raises(CorruptDatastore):
        Datastore.open(ds.path).open_io()


def test_impossible_map_is_an_error(ds):
    from nicsplit.host.datastore.extentlog import OP_MAP, encode_record

    ds.vdisk("a").pwrite(0, b"x")
    ds.close()
    with open(_log_path(ds), "ab") as f:  # vdisk 2 claims vdisk 1's physical extent
        f.write(encode_record(OP_MAP, 2, 0, 0, 0))
    with pytest.raises(CorruptDatastore, match="physical extent already mapped"):
        Datastore.open(ds.path).open_io()


def test_log_of_another_datastore_is_refused(tmp_path):
    d1 = Datastore.create(tmp_path / "one")
    d2 = Datastore.create(tmp_path / "two")
    os.replace(os.path.join(d1.path, "extents.log"), os.path.join(d2.path, "extents.log"))
    with pytest.raises(CorruptDatastore, match="belongs to datastore"):
        d2.open_io()


def test_records_of_deleted_vdisk_are_released(ds):
    """A crash after the catalog dropped a vdisk but before its UNMAPs."""
    a = ds.vdisk("a")
    a.pwrite(0, b"\x55" * 3 * ES)
    ds.vdisk("b").pwrite(ES, b"\x66")  # above a's extents: they sit below the high-water mark
    ds.sync()
    ds.close()
    cli = Datastore.open(ds.path)
    with cli._cf.locked():  # simulate: catalog updated, then kill -9
        cat, _ = cli._cf.read()
        del cat.vdisks["a"]
        cli._cf.write(cat)
    d2 = Datastore.open(ds.path)
    d2.open_io()
    st = d2.statistics()
    assert st.extents_allocated == 1 and st.extents_free == 3
    d2.vdisk("b").pwrite(0, b"\x01")  # reuses a's first extent: punched at open
    assert d2.vdisk("b").physical(0) == (0, ES)
    assert d2.vdisk("b").pread(0, 2 * ES) == b"\x01" + bytes(ES - 1) + b"\x66" + bytes(ES - 1)
    d2.close()


def test_unlogged_data_past_high_water_is_dropped(ds):
    """Power loss can leave volume data whose MAP never reached the disk."""
    a = ds.vdisk("a")
    a.pwrite(0, b"x")
    ds.close()
    vol = os.path.join(ds.path, "vol-0000.dsk")
    with open(vol, "r+b") as f:
        f.seek(2 * ES)
        f.write(b"\x77" * ES)  # stray data in the next extent
    d2 = Datastore.open(ds.path)
    d2.open_io()
    assert os.path.getsize(vol) == 2 * ES
    d2.vdisk("b").pwrite(ES - 1, b"\x01\x02")
    assert d2.vdisk("b").pread(0, 2 * ES) == bytes(ES - 1) + b"\x01\x02" + bytes(ES - 1)
    d2.close()


def test_sync_concurrent_with_writes(ds):
    a = ds.vdisk("a")
    stop = threading.Event()
    errors = []

    def syncer():
        try:
            while not stop.is_set():
                ds.sync()
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=syncer)
    t.start()
    try:
        rng = random.Random(3)
        for n in range(2000):
            off = rng.randrange(0, MiB - 4096)
            a.pwrite(off, bytes([n % 256]) * 4096)
            if n % 97 == 0:
                a.trim(rng.randrange(0, MiB // ES) * ES, ES)
    finally:
        stop.set()
        t.join()
    assert not errors
    ds.sync()
    assert not any(ds._vdirty) and not any(ds._vmeta) and not ds._elog.dirty
    assert ds.statistics().extents_free_pending == 0


def test_statistics(ds):
    a = ds.vdisk("a")
    a.pwrite(0, b"x" * 3 * ES)
    a.trim(0, ES)
    st = ds.statistics()
    assert (st.vdisks, st.volumes, st.extents_allocated, st.extents_free_pending) == (2, 1, 2, 1)
    assert st.bytes_allocated == 2 * ES and st.log_records == 4
    assert st.log_bytes == LOG_HEADER.size + 4 * RECORD.size


def test_close_kills_handles(ds):
    a = ds.vdisk("a")
    ds.close()
    with pytest.raises(UnknownVdisk, match="closed"):
        a.pwrite(0, b"x")


def test_large_writes_go_down_in_pieces_no_larger_than_write_piece(tmp_path, monkeypatch):
    """A write larger than `fsutil.WRITE_PIECE` reaches the volume files in pieces
    of at most that size (large page-cache folios, store.py), in order, and
    reads back whole; a small write is still one call."""
    d = Datastore.create(str(tmp_path / "big"), volume_size=64 * MiB, extent_size=4 * MiB)
    d.create_vdisk("a", 16 * MiB)
    d.open_io()
    calls: list[int] = []
    real = os.pwrite

    def spy(fd, data, offset):
        calls.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(store_mod.os, "pwrite", spy)
    try:
        a = d.vdisk("a")
        data = pattern(7, 3 * MiB + 4096)
        a.pwrite(4 * MiB - 12345, data)  # across an extent boundary, unaligned
        assert calls and max(calls) <= WRITE_PIECE
        assert sum(calls) == len(data)
        assert a.pread(4 * MiB - 12345, len(data)) == data
        calls.clear()
        a.pwrite(0, b"x" * 4096)
        assert calls == [4096]
    finally:
        d.close()
