"""``error``: fault injection by failure (nbdkit's error filter).

Options:
- ``errno``: the error to inject, by name (default ``"EIO"``; e.g. ``"ENOSPC"``,
  ``"EPERM"``, ``"ENOTSUP"``).
- ``rate``: probability 0..1 that a matching IO fails (default 1.0).
- ``verbs``: list of verbs to fail (default all: pread, pwrite, zero, trim,
  flush, extents).
- ``seed``: seeds the generator deciding failures (default 0): reproducible.
- ``trigger``: a file path; errors are injected only while it exists, so a
  test can switch faults on and off at run time.

The IO fails *before* reaching the layers below, so a failed write never
touches the datastore.

Example: ``filters = ["stats", {name = "error", verbs = ["pwrite"], errno = "EIO", rate = 0.1, seed = 42}]``
"""

from __future__ import annotations

import errno as errno_mod
import os
import random

from nicsplit.host.chain import VERBS, ChainError, Filter
from nicsplit.host.io import IOFailure


class ErrorFilter(Filter):
    name = "error"
    passes_payload = True  # pwrite hands `data` down unchanged (chain rule 4)
    options = ("errno", "rate", "verbs", "seed", "trigger")

    def __init__(self, vdisk, options) -> None:
        super().__init__(vdisk, options)
        name = str(options.get("errno", "EIO")).upper()
        err = getattr(errno_mod, name, None)
        if not isinstance(err, int):
            raise ChainError(f"filter 'error': unknown errno {name!r}")
        self._errno = err
        self._rate = float(options.get("rate", 1.0))
        if not 0.0 <= self._rate <= 1.0:
            raise ChainError("filter 'error': rate must be within 0..1")
        verbs = options.get("verbs", list(VERBS))
        bad = sorted(set(verbs) - set(VERBS))
        if bad:
            raise ChainError(f"filter 'error': unknown verb(s) {', '.join(bad)}")
        self._verbs = frozenset(verbs)
        self._rng = random.Random(options.get("seed", 0))
        self._trigger = options.get("trigger")
        self.injected = 0

    def _maybe_fail(self, verb: str) -> None:
        if verb not in self._verbs:
            return
        if self._trigger is not None and not os.path.exists(self._trigger):
            return
        if self._rate < 1.0 and self._rng.random() >= self._rate:
            return
        self.injected += 1
        raise IOFailure(self._errno, f"error filter injected {errno_mod.errorcode[self._errno]} on {verb}")

    def statistics(self):
        return {"injected": self.injected}

    async def pread(self, next, offset, length, flags):
        self._maybe_fail("pread")
        return await next.pread(offset, length, flags)

    async def pwrite(self, next, offset, data, flags):
        self._maybe_fail("pwrite")
        await next.pwrite(offset, data, flags)

    async def zero(self, next, offset, length, flags):
        self._maybe_fail("zero")
        await next.zero(offset, length, flags)

    async def trim(self, next, offset, length, flags):
        self._maybe_fail("trim")
        await next.trim(offset, length, flags)

    async def flush(self, next, flags):
        self._maybe_fail("flush")
        await next.flush(flags)

    async def extents(self, next, offset, length, flags):
        self._maybe_fail("extents")
        return await next.extents(offset, length, flags)
