"""card/hidden.py: creation, attach checks, and clean-up of the hidden volume."""

from __future__ import annotations

import os
import stat
import struct
import uuid
from pathlib import Path

import pytest

from nicsplit.card.hidden import NAME_PREFIX, HiddenVolume, HiddenVolumeError
from nicsplit.wire import ring as R

SMALL = dict(data_size=R.MIN_DATA, sq_entries=8, cq_entries=8)


@pytest.fixture
def hv():
    v = HiddenVolume.create(**SMALL)
    yield v
    v.close()
    v.unlink()


def test_create_in_dev_shm_mode_0600_named_by_fake_uid(hv):
    assert hv.path.parent == Path("/dev/shm")
    assert hv.path.name == NAME_PREFIX + hv.uid
    assert uuid.UUID(hex=hv.uid).version == 4
    st = os.stat(hv.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == hv.geometry.total_size
    ident = R.unpack_identity(hv.header)
    assert ident.fake_uid == uuid.UUID(hex=hv.uid).bytes
    assert ident.card_pid == os.getpid()
    assert ident.geometry == R.Geometry(8, 8, R.MIN_DATA)
    assert hv.counters[R.Counter.CARD_STATE] == R.CardState.POLLING
    assert hv.counters[R.Counter.CARD_HEARTBEAT] > 0
    assert len(hv.sq) == 8 * 64 and len(hv.cq) == 8 * 16 and len(hv.data) == R.MIN_DATA


def test_mode_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        v = HiddenVolume.create(dir=tmp_path, **SMALL)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(v.path).st_mode) == 0o600
    finally:
        v.close()
        v.unlink()


def test_data_size_is_configurable_and_default_is_256_mib(tmp_path):
    v = HiddenVolume.create(dir=tmp_path, data_size=3 * R.MIN_DATA, sq_entries=4, cq_entries=2)
    assert len(v.data) == 3 * R.MIN_DATA and v.geometry.cq_entries == 2
    v.close()
    v.unlink()
    d = HiddenVolume.create(dir=tmp_path)
    assert len(d.data) == 256 << 20 and d.geometry.sq_entries == 4096
    d.close()
    d.unlink()


def test_bad_geometry_is_a_clear_error(tmp_path):
    with pytest.raises(HiddenVolumeError, match="sq_entries=3"):
        HiddenVolume.create(dir=tmp_path, data_size=R.MIN_DATA, sq_entries=3)
    assert list(tmp_path.iterdir()) == []


def test_attach_shares_memory(hv):
    peer = HiddenVolume.attach(hv.path, hv.uid)
    try:
        assert peer.geometry == hv.geometry and not peer.owner
        hv.data[100:105] = b"hello"
        assert bytes(peer.data[100:105]) == b"hello"
        peer.counters[R.Counter.SQ_TAIL] = 77
        assert hv.counters[R.Counter.SQ_TAIL] == 77
    finally:
        peer.close()


def test_attach_refuses_wrong_uid(hv):
    with pytest.raises(HiddenVolumeError, match="fake UID"):
        HiddenVolume.attach(hv.path, uuid.uuid4().hex)
    with pytest.raises(HiddenVolumeError, match="bad fake UID"):
        HiddenVolume.attach(hv.path.parent / (NAME_PREFIX + "zz"), "zz")


def _copy_with(tmp_path, hv, patch=None, mode=0o600, size=None, uid=None) -> tuple[Path, str]:
    """A copy of ``hv`` in tmp_path with a patched header, mode or size."""
    uid = uid or hv.uid
    p = tmp_path / (NAME_PREFIX + uid)
    raw = bytearray(hv.buf)
    if patch:
        patch(raw)
    p.write_bytes(bytes(raw[:size] if size is not None else raw))
    os.chmod(p, mode)
    return p, uid


def test_attach_refuses_bad_magic_version_size_mode(tmp_path, hv):
    p, uid = _copy_with(tmp_path, hv, patch=lambda b: b.__setitem__(slice(0, 8), b"XXXXXXXX"))
    with pytest.raises(HiddenVolumeError, match="magic"):
        HiddenVolume.attach(p, uid)
    p.unlink()
    p, uid = _copy_with(tmp_path, hv, patch=lambda b: struct.pack_into("<I", b, 8, 1))
    with pytest.raises(HiddenVolumeError, match="version 1"):
        HiddenVolume.attach(p, uid)
    p.unlink()
    p, uid = _copy_with(tmp_path, hv, size=hv.geometry.total_size - 4096)
    with pytest.raises(HiddenVolumeError, match="header says"):
        HiddenVolume.attach(p, uid)
    p.unlink()
    p, uid = _copy_with(tmp_path, hv, size=100)
    with pytest.raises(HiddenVolumeError, match="too small"):
        HiddenVolume.attach(p, uid)
    p.unlink()
    p, uid = _copy_with(tmp_path, hv, mode=0o644)
    with pytest.raises(HiddenVolumeError, match="mode 644"):
        HiddenVolume.attach(p, uid)
    p.unlink()
    p, uid = _copy_with(tmp_path, hv)
    assert HiddenVolume.attach(p, uid).geometry == hv.geometry


def test_attach_refuses_symlink_and_missing(tmp_path, hv):
    link = tmp_path / hv.path.name
    link.symlink_to(hv.path)
    with pytest.raises(HiddenVolumeError, match="cannot open"):
        HiddenVolume.attach(link, hv.uid)
    with pytest.raises(HiddenVolumeError, match="cannot open"):
        u = uuid.uuid4().hex
        HiddenVolume.attach(tmp_path / (NAME_PREFIX + u), u)


def test_close_and_unlink(tmp_path):
    v = HiddenVolume.create(dir=tmp_path, **SMALL)
    view = v.data[0:16]  # a payload view still alive: close must not raise
    v.close()
    v.close()  # idempotent
    assert v.path.exists()
    v.unlink()
    v.unlink()
    assert not v.path.exists()
    del view


def test_create_is_exclusive_and_never_in_the_datastore(tmp_path, hv):
    # a second volume never reuses the name; the name says what it is
    other = HiddenVolume.create(**SMALL)
    try:
        assert other.path != hv.path and other.uid != hv.uid
    finally:
        other.close()
        other.unlink()
    assert "datastore" not in str(hv.path)
