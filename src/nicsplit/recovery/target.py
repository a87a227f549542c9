"""Where `restore --to` and `journal replay` write, opened so that nobody can
redirect it.

Rules (issue 11 item 5: `restore --to /dev/null` replaced /dev/null with a
regular file; a symlink planted in a world-writable directory redirected
root's restore onto any file):

- The final path component is never followed: a symbolic link there is
  refused (`lstat`), and every open carries ``O_NOFOLLOW``.
- A new image is written into a temp file made with ``O_CREAT|O_EXCL`` in
  the target's directory (`tempfile.mkstemp`: a fresh random name, so no
  planted name or link is ever opened), fsynced, then published:
  without ``force`` by ``link`` (which fails if anything appeared under the
  name meanwhile: create-if-absent, atomically) and unlink of the temp;
  with ``force`` by ``rename`` over the old file (rename replaces the
  directory entry, it never follows a link).
- An existing regular file is refused unless ``force``.
- A block or character device is refused unless ``device_ok``
  (`restore --to-device`); then it is opened in place (``O_WRONLY|
  O_NOFOLLOW``, no create, no truncate) and must be at least the image's
  size when its size is known (block devices).
- Directories, FIFOs and sockets are refused.

Example::

    kind = check_target(Path("/tmp/root.raw"), force=False, device_ok=False)   # "new"
    fd, tmp = new_temp(Path("/tmp/root.raw"))
    ...write, fsync...
    publish(tmp, Path("/tmp/root.raw"), force=False)
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from nicsplit.core.fsutil import fsync_dir
from nicsplit.recovery.errors import RecoveryError

NEW, FILE, DEVICE = "new", "file", "device"


def check_target(path: Path, *, force: bool, device_ok: bool = False, flag: str = "--force") -> str:
    """What is at ``path`` now: ``"new"`` (nothing), ``"file"`` (a regular
    file, only with ``force``) or ``"device"`` (only with ``device_ok``);
    anything else is a RecoveryError naming the path and the way out."""
    if not path.parent.is_dir():
        raise RecoveryError(f"no directory {path.parent} for {path.name}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return NEW
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise RecoveryError(f"{path} is a symbolic link (to {os.readlink(path)}); refusing to write through it: "
                            "give the real path")
    if stat.S_ISDIR(mode):
        raise RecoveryError(f"{path} is a directory; give a file name")
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        if not device_ok:
            kind = "block" if stat.S_ISBLK(mode) else "character"
            raise RecoveryError(f"{path} is a {kind} device; refusing to write onto it "
                                "(to write the image onto a device, say --to-device)")
        return DEVICE
    if not stat.S_ISREG(mode):
        raise RecoveryError(f"{path} is not a regular file (a FIFO or socket); refusing to write to it")
    if not force:
        raise RecoveryError(f"{path} exists; refusing to overwrite it (replace it with {flag})")
    return FILE


def new_temp(path: Path) -> tuple[int, Path]:
    """A new, empty, private (0600) file in ``path``'s directory, made with
    ``O_EXCL`` under a random name: its fd and path."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    return fd, Path(name)


def publish(tmp: Path, path: Path, *, force: bool) -> None:
    """Put the finished temp file ``tmp`` under ``path`` and make that durable:
    rename over whatever is there with ``force``, else create-if-absent."""
    if force:
        st = _lstat(path)  # re-check: a link or device may have been planted since check_target
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise RecoveryError(f"{path} changed while writing (now not a regular file); refusing to replace it")
        os.rename(tmp, path)
    else:
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise RecoveryError(f"{path} appeared while writing; refusing to overwrite it") from None
        except OSError as e:  # a filesystem without hard links: check, then rename
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if _lstat(path) is not None:
                raise RecoveryError(f"{path} appeared while writing; refusing to overwrite it") from None
            os.rename(tmp, path)
        else:
            os.unlink(tmp)
    fsync_dir(path.parent)


def open_device(path: Path, size: int) -> int:
    """``path`` (a device `check_target` allowed) opened for writing without
    following a link; refused when it is no longer a device or is smaller
    than ``size`` bytes."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise RecoveryError(f"cannot open device {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise RecoveryError(f"{path} is no longer a device; refusing to write to it")
        if stat.S_ISBLK(st.st_mode):
            have = os.lseek(fd, 0, os.SEEK_END)
            if have < size:
                raise RecoveryError(f"device {path} holds {have} bytes; the image needs {size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def sync_device(fd: int) -> None:
    """fsync a device fd; character devices such as /dev/null refuse fsync
    (EINVAL), which is no error for them."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EROFS) or not stat.S_ISCHR(os.fstat(fd).st_mode):
            raise


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
