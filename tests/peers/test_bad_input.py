"""Bad input through libnbd (strict mode off), compared with `nbdkit memory`.

Each case runs against both servers and must give the same errno; after
every refused request the same connection must still serve a read (the
connection stays up, and a rejected write's payload was consumed).
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from nicsplit.testing.datadir import vdisk
from nicsplit.testing.procs import NbdkitProcess, import_libnbd, libnbd_errno

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 1 << 20


def _connect(uri: str):
    nbd = import_libnbd()
    h = nbd.NBD()
    h.set_strict_mode(0)  # let bad requests reach the server
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def _outcome(call) -> int:
    nbd = import_libnbd()
    try:
        call()
    except nbd.Error as e:
        return libnbd_errno(e) or -1
    return 0


CASES = {
    "write past end": lambda h: h.pwrite(b"x" * 4096, SIZE - 512),
    "write starting past end": lambda h: h.pwrite(b"x" * 512, SIZE + 4096),
    "zero past end": lambda h: h.zero(8192, SIZE - 4096),
    "read past end": lambda h: h.pread(4096, SIZE - 512),
    "trim past end": lambda h: h.trim(8192, SIZE - 4096),
    "unknown write flag": lambda h: h.pwrite(b"x" * 512, 0, 1 << 10),
    "NO_HOLE on a write": lambda h: h.pwrite(b"x" * 512, 0, 2),
    "unknown read flag": lambda h: h.pread(512, 0, 1 << 12),
    "unknown zero flag": lambda h: h.zero(512, 0, 1 << 9),
    "block status past end": lambda h: h.block_status(8192, SIZE - 4096, lambda *a: 0),
}


@pytest.fixture
def servers(data, host_factory, tmp_path):
    vdisk(data, "disk1", "1M")
    vdisk(data, "ro1", "1M", "--readonly")
    vdisk(data, "big", "64M")
    host = host_factory(data)
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro").mkdir()
    with NbdkitProcess(tmp_path / "rw", ["memory", str(SIZE)]) as rw, NbdkitProcess(
        tmp_path / "ro", ["memory", str(SIZE)], readonly=True
    ) as ro:
        yield {"nicsplit": host.uri("disk1"), "nbdkit": rw.uri, "nicsplit-ro": host.uri("ro1"), "nicsplit-big": host.uri("big"), "nbdkit-ro": ro.uri}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_errno_as_nbdkit(servers, case):
    got = {}
    for name in ("nbdkit", "nicsplit"):
        h = _connect(servers[name])
        got[name] = _outcome(lambda: CASES[case](h))
        # The connection is still up and in sync.
        assert h.pread(512, 0) is not None
        h.shutdown()
    assert got["nbdkit"] != 0, f"nbdkit accepted {case!r}; the case is wrong"
    assert got["nicsplit"] == got["nbdkit"], f"{case}: nicsplit {errno.errorcode.get(got['nicsplit'])} vs nbdkit {errno.errorcode.get(got['nbdkit'])}"


def test_expected_errnos(servers):
    """The reference answers in TESTING.md, spelled out."""
    h = _connect(servers["nicsplit"])
    assert _outcome(lambda: CASES["write past end"](h)) == errno.ENOSPC
    assert _outcome(lambda: CASES["read past end"](h)) == errno.EINVAL
    assert _outcome(lambda: CASES["trim past end"](h)) == errno.EINVAL
    assert _outcome(lambda: CASES["unknown write flag"](h)) == errno.EINVAL
    h.shutdown()


@pytest.mark.parametrize("op", ["pwrite", "zero", "trim"])
def test_readonly_export_refuses_writes_like_nbdkit(servers, op):
    got = {}
    for name in ("nbdkit-ro", "nicsplit-ro"):
        h = _connect(servers[name])
        assert h.is_read_only()
        call = {"pwrite": lambda: h.pwrite(b"y" * 512, 0), "zero": lambda: h.zero(512, 0), "trim": lambda: h.trim(512, 0)}[op]
        got[name] = _outcome(call)
        assert h.pread(512, 0) == bytes(512)  # nothing was written
        h.shutdown()
    assert got["nicsplit-ro"] == got["nbdkit-ro"] == errno.EPERM


def test_unknown_export_is_refused(servers):
    """NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT. (`nbdkit memory`
    ignores export names, so there is no reference answer to diff here.)"""
    nbd = import_libnbd()
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(servers["nicsplit"])
    h.set_export_name("no-such-export")
    with pytest.raises(nbd.Error) as ei:
        h.opt_go()
    assert libnbd_errno(ei.value) == errno.ENOENT, ei.value
    # Still negotiating: a valid name works on the same connection.
    h.set_export_name("disk1")
    h.opt_go()
    assert h.get_size() == SIZE
    h.shutdown()


def test_oversize_requests_refused_connection_survives(servers):
    h = _connect(servers["nicsplit-big"])  # in range, so only the size is wrong
    big = 33 << 20
    assert _outcome(lambda: h.pread(big, 0)) == errno.EINVAL
    assert _outcome(lambda: h.pwrite(b"z" * big, 0)) == errno.EINVAL
    # The 33 MiB payload was consumed, not taken as requests.
    assert h.pread(4096, 0) == bytes(4096)
    h.pwrite(b"k" * 4096, 0)
    assert h.pread(4096, 0) == b"k" * 4096
    h.shutdown()


def test_bad_magic_closes_only_that_connection(servers, data):
    """Garbage framing drops that connection; others carry on."""
    good = _connect(servers["nicsplit"])
    good.pwrite(b"g" * 4096, 0)
    host_port = servers["nicsplit"].split("/")[2]
    host, port = host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        greeting = s.recv(18)
        assert greeting[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 3))  # client flags: FIXED_NEWSTYLE | NO_ZEROES
        s.sendall(b"\x00" * 64)  # not IHAVEOPT: bad magic
        s.settimeout(10)
        rest = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
        # The server closed it (recv returned EOF rather than timing out).
    assert good.pread(4096, 0) == b"g" * 4096
    good.shutdown()
