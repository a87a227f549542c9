"""``delay``: fault injection by latency (nbdkit's delay filter).

Options (milliseconds, floats): ``ms`` for every verb, or per verb
``read_ms``, ``write_ms``, ``zero_ms``, ``trim_ms``, ``flush_ms``,
``extents_ms``; ``jitter_ms`` adds a uniform random extra drawn from a
generator seeded by ``seed`` (default 0), so runs are reproducible.

Example: ``filters = [{name = "delay", write_ms = 2, jitter_ms = 1, seed = 7}]``
"""

from __future__ import annotations

import asyncio
import random

from nicsplit.host.chain import ChainError, Filter

_VERB_OPT = {
    "pread": "read_ms",
    "pwrite": "write_ms",
    "zero": "zero_ms",
    "trim": "trim_ms",
    "flush": "flush_ms",
    "extents": "extents_ms",
}


class DelayFilter(Filter):
    name = "delay"
    passes_payload = True  # pwrite hands `data` down unchanged (chain rule 4)
    options = ("ms", "jitter_ms", "seed", *_VERB_OPT.values())

    def __init__(self, vdisk, options) -> None:
        super().__init__(vdisk, options)
        try:
            base = float(options.get("ms", 0))
            self._delay = {v: float(options.get(o, base)) / 1000 for v, o in _VERB_OPT.items()}
            self._jitter = float(options.get("jitter_ms", 0)) / 1000
        except (TypeError, ValueError) as e:
            raise ChainError(f"filter 'delay': bad option value ({e})") from None
        if min(self._delay.values()) < 0 or self._jitter < 0:
            raise ChainError("filter 'delay': delays must be >= 0")
        self._rng = random.Random(options.get("seed", 0))

    async def _wait(self, verb: str) -> None:
        d = self._delay[verb] + (self._rng.uniform(0, self._jitter) if self._jitter else 0.0)
        if d > 0:
            await asyncio.sleep(d)

    async def pread(self, next, offset, length, flags):
        await self._wait("pread")
        return await next.pread(offset, length, flags)

    async def pwrite(self, next, offset, data, flags):
        await self._wait("pwrite")
        await next.pwrite(offset, data, flags)

    async def zero(self, next, offset, length, flags):
        await self._wait("zero")
        await next.zero(offset, length, flags)

    async def trim(self, next, offset, length, flags):
        await self._wait("trim")
        await next.trim(offset, length, flags)

    async def flush(self, next, flags):
        await self._wait("flush")
        await next.flush(flags)

    async def extents(self, next, offset, length, flags):
        await self._wait("extents")
        return await next.extents(offset, length, flags)
