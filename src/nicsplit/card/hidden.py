"""The hidden volume: card-owned shared memory that only the splitter attaches to.

Theory of operation
===================
The card process creates one file ``<dir>/nicsplit-hv-<fake uid>`` (dir
defaults to /dev/shm; the fake UID is a fresh uuid4 hex per card run), mode
0600, sized and *allocated* up front (``posix_fallocate``: a full tmpfs fails
here with a clear error instead of killing a process with SIGBUS on first
touch), and maps it shared.  Its layout (header page, submission ring,
completion ring, payload data area) is defined in `nicsplit.wire.ring` and
listed byte by byte in docs/formats.md.

Rules
-----
1. The volume lives outside the datastore and is never an NBD export: nothing
   in the host's export catalog can name it (promise P6).  The host learns its
   path and fake UID only from the card's control socket.
2. ``create`` is exclusive (``O_EXCL | O_NOFOLLOW``) and ``attach`` refuses a
   file that is not a regular file owned by us with mode 0600, whose magic,
   version, fake UID or size disagree with what the card announced.  Every
   refusal is a `HiddenVolumeError` naming the reason.
3. Both sides map with ``MAP_POPULATE``, so page faults happen at
   create/attach time, not on the first writes.
4. The card unlinks the file on close; a host that still has it mapped keeps
   its pages until it unmaps (tmpfs semantics) and notices the dead card by
   heartbeat / control socket.  A card killed with -9 leaves its file behind;
   the next card start removes it (``sweep_stale``: our files whose header's
   card_pid is gone).

Example::

    hv = HiddenVolume.create(data_size=64 << 20)     # card
    peer = HiddenVolume.attach(hv.path, hv.uid)      # host, from the control message
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import time
import uuid
from pathlib import Path

from nicsplit.wire import ring as R

__all__ = ["HiddenVolume", "HiddenVolumeError", "DEFAULT_DATA_SIZE", "DEFAULT_ENTRIES", "NAME_PREFIX"]

log = logging.getLogger(__name__)

NAME_PREFIX = "nicsplit-hv-"
# 256 MiB holds 65,536 4 KiB writes awaiting ship or the overflow log: ~6 s
# of an unpaced QD16 stream here (~40 MB/s), enough for the card's worker to
# ride out a few seconds without CPU on a shared 2-core machine (at 64 MiB
# it filled within ~1.5 s and the host marked).
DEFAULT_DATA_SIZE = 256 * 1024 * 1024
# 4096 SQ entries x 64 B = 256 KiB.  Each write costs two entries (write +
# outcome), so 4096 entries absorb a ~20 ms card stall at 100k IOPS before the
# splitter has to fall back to marking.  CQ the same count (64 KiB).
DEFAULT_ENTRIES = 4096


class HiddenVolumeError(Exception):
    """The hidden volume cannot be created or attached (the message says why)."""


class HiddenVolume:
    """One mapped hidden volume; views onto its regions are attributes.

    ``counters`` is the header viewed as native u64s (index with
    `nicsplit.wire.ring.Counter`); ``sq``, ``cq`` and ``data`` are memoryviews
    of the three regions.
    """

    def __init__(self, path: Path, uid: str, ident: R.Identity, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.uid = uid
        self.identity = ident
        self.geometry = ident.geometry
        self.owner = owner
        self._mm = mm
        g = ident.geometry
        self.buf = memoryview(mm)
        self.header = self.buf[: R.HEADER_SIZE]
        self.counters = self.header.cast("Q")
        self.sq = self.buf[g.sq_offset: g.sq_offset + g.sq_entries * R.DESC.size]
        self.cq = self.buf[g.cq_offset: g.cq_offset + g.cq_entries * R.CQE.size]
        self.data = self.buf[g.data_offset: g.data_offset + g.data_size]
        self.closed = False

    # -- construction --------------------------------------------------------

    @classmethod
    def create(
        cls,
        dir: str | os.PathLike = "/dev/shm",
        data_size: int = DEFAULT_DATA_SIZE,
        sq_entries: int = DEFAULT_ENTRIES,
        cq_entries: int = DEFAULT_ENTRIES,
        csum_alg: int = R.CsumAlg.XXH3_LOW32,
    ) -> "HiddenVolume":
        R.check_platform()
        try:
            g = R.Geometry(sq_entries, cq_entries, data_size)
        except R.RingFormatError as e:
            raise HiddenVolumeError(f"bad hidden volume geometry: {e}") from None
        uid = uuid.uuid4()
        path = Path(dir) / f"{NAME_PREFIX}{uid.hex}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise HiddenVolumeError(f"cannot create hidden volume {path}: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # independent of the umask
            try:
                os.posix_fallocate(fd, 0, g.total_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise HiddenVolumeError(
                        f"cannot allocate {g.total_size} bytes for hidden volume {path}: {e.strerror}"
                    ) from None
                os.ftruncate(fd, g.total_size)
            mm = mmap.mmap(fd, g.total_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
        os.close(fd)
        ident = R.Identity(R.VERSION, uid.bytes, g, os.getpid(), int(csum_alg), time.time_ns())
        R.pack_identity(mm, ident)
        hv = cls(path, uid.hex, ident, mm, owner=True)
        hv.counters[R.Counter.CARD_STATE] = R.CardState.POLLING
        hv.counters[R.Counter.CARD_HEARTBEAT] = time.monotonic_ns()
        log.info("hidden volume %s created: %d SQ, %d CQ entries, %d data bytes", path, sq_entries,
                 cq_entries, data_size)
        return hv

    @classmethod
    def attach(cls, path: str | os.PathLike, expected_uid: str) -> "HiddenVolume":
        """Map an existing volume (host side) after checking who made it."""
        R.check_platform()
        path = Path(path)
        if not path.name.startswith(NAME_PREFIX) or path.name[len(NAME_PREFIX):] != expected_uid:
            raise HiddenVolumeError(f"{path}: file name does not carry the expected fake UID {expected_uid}")
        try:
            want = uuid.UUID(hex=expected_uid).bytes
        except ValueError:
            raise HiddenVolumeError(f"bad fake UID {expected_uid!r}") from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise HiddenVolumeError(f"cannot open hidden volume {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise HiddenVolumeError(f"{path} is not a regular file")
            if st.st_uid != os.geteuid():
                raise HiddenVolumeError(f"{path} is owned by uid {st.st_uid}, not by us ({os.geteuid()})")
            if stat.S_IMODE(st.st_mode) != 0o600:
                raise HiddenVolumeError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, expected 600")
            if st.st_size < R.HEADER_SIZE:
                raise HiddenVolumeError(f"{path} is {st.st_size} bytes: too small for a hidden volume")
            head = os.pread(fd, R.IDENTITY.size, 0)
            try:
                ident = R.unpack_identity(head)
            except R.RingFormatError as e:
                raise HiddenVolumeError(f"{path}: {e}") from None
            if ident.fake_uid != want:
                raise HiddenVolumeError(
                    f"{path}: fake UID {ident.fake_uid.hex()} in the header, expected {expected_uid}"
                )
            if st.st_size != ident.geometry.total_size:
                raise HiddenVolumeError(
                    f"{path} is {st.st_size} bytes, header says {ident.geometry.total_size}"
                )
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        return cls(path, expected_uid, ident, mm, owner=False)

    @staticmethod
    def sweep_stale(dir: str | os.PathLike = "/dev/shm") -> list[Path]:
        """Unlink volumes in ``dir`` left by cards that died without closing
        (kill -9): our own files with a valid header whose card_pid no longer
        exists.  Returns what was removed.  Pages stay mapped for any host
        still attached (tmpfs semantics)."""
        removed = []
        for path in Path(dir).glob(NAME_PREFIX + "*"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
                ident = R.unpack_identity(os.pread(fd, R.IDENTITY.size, 0))
            except (OSError, R.RingFormatError):
                continue
            finally:
                os.close(fd)
            if ident.fake_uid.hex() != path.name[len(NAME_PREFIX):] or _pid_alive(ident.card_pid):
                continue
            _unlink_quiet(path)
            removed.append(path)
            log.info("removed stale hidden volume %s of dead card pid %d", path, ident.card_pid)
        return removed

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Unmap.  If a caller still holds a payload memoryview the mapping
        stays until that view is gone (logged), never an exception."""
        if self.closed:
            return
        self.closed = True
        for v in (self.counters, self.header, self.sq, self.cq, self.data, self.buf):
            try:
                v.release()
            except BufferError:  # someone re-exported this view; it goes with them
                pass
        try:
            self._mm.close()
        except BufferError:
            log.warning("hidden volume %s: payload views still alive; unmapped when they are dropped", self.path)

    def unlink(self) -> None:
        _unlink_quiet(self.path)

    def __repr__(self) -> str:
        return f"<HiddenVolume {self.path} {'owner' if self.owner else 'attached'}{' closed' if self.closed else ''}>"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
