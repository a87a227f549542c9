"""The filter chain in process: pass-through, refusal of incomplete
data-observing filters, the validating layer, built-in filters."""

from __future__ import annotations

import asyncio
import errno
from dataclasses import replace

import pytest

from nicsplit.host.chain import ChainError, Filter, VdiskView, build_chain, check_filter_class
from nicsplit.host.filters.error import ErrorFilter
from nicsplit.host.filters.stats import StatsFilter
from nicsplit.host.io import Flag, IOFailure

VD = VdiskView(name="v", id=1, uuid="u", size=1 << 20, owner=None, readonly=False, extra={})


class MemPlugin:
    def __init__(self, size=1 << 20):
        self.buf = bytearray(size)
        self.calls = []

    async def pread(self, offset, length, flags):
        self.calls.append("pread")
        return bytes(self.buf[offset : offset + length])

    async def pwrite(self, offset, data, flags):
        self.calls.append(("pwrite", flags))
        self.buf[offset : offset + len(data)] = data

    async def zero(self, offset, length, flags):
        self.buf[offset : offset + length] = bytes(length)

    async def trim(self, offset, length, flags):
        self.buf[offset : offset + length] = bytes(length)

    async def flush(self, flags):
        self.calls.append("flush")

    async def extents(self, offset, length, flags):
        return [(length, 0)]


def resolver(*classes):
    table = {c.name: c for c in classes}
    return lambda name: table[name]


def run(coro):
    return asyncio.run(coro)


class Counter(Filter):
    name = "counter"

    def __init__(self, vdisk, options):
        super().__init__(vdisk, options)
        self.writes = 0

    async def pwrite(self, next, offset, data, flags):
        self.writes += 1
        await next.pwrite(offset, data, flags)


def test_unimplemented_verbs_pass_through():
    plugin = MemPlugin()
    ch = build_chain(VD, ["counter"], plugin, resolve=resolver(Counter))
    run(ch.top.pwrite(0, b"abc", Flag.FUA))
    assert run(ch.top.pread(0, 3, 0)) == b"abc"
    assert ch.filter("counter").writes == 1
    assert plugin.calls == [("pwrite", Flag.FUA), "pread"]


@pytest.mark.parametrize("missing", ["pwrite", "zero", "trim", "flush", "fua"])
def test_observing_filter_must_implement_every_write_verb(missing):
    async def passthru(self, next, *a):
        return None

    attrs = {"name": "obs", "observes_data": True, "handles_fua": missing != "fua"}
    for verb in ("pwrite", "zero", "trim", "flush"):
        if verb != missing:
            attrs[verb] = passthru
    cls = type("Obs", (Filter,), attrs)
    with pytest.raises(ChainError, match="observes data but does not implement") as ei:
        build_chain(VD, ["obs"], MemPlugin(), resolve=resolver(cls))
    assert (missing if missing != "fua" else "FUA") in str(ei.value)


def test_complete_observing_filter_is_accepted():
    async def passthru(self, next, *a):
        return None

    cls = type("Obs", (Filter,), {"name": "obs", "observes_data": True, "handles_fua": True,
                                   **{v: passthru for v in ("pwrite", "zero", "trim", "flush")}})
    check_filter_class(cls)


def test_unknown_filter_and_option():
    with pytest.raises(ChainError, match="unknown filter 'nope'"):
        build_chain(VD, ["nope"], MemPlugin())
    with pytest.raises(ChainError, match="unknown option"):
        build_chain(VD, [{"name": "stats", "colour": "red"}], MemPlugin())
    with pytest.raises(ChainError, match="bad filter entry"):
        build_chain(VD, [42], MemPlugin())


class Broken(Filter):
    """Breaks the contract: writes past the end, returns short reads."""

    name = "broken"

    async def pwrite(self, next, offset, data, flags):
        await next.pwrite(offset + 4096, data, flags)

    async def pread(self, next, offset, length, flags):
        return (await next.pread(offset, length, flags))[:-1]


def test_validator_catches_contract_breaks():
    plugin = MemPlugin()
    ch = build_chain(VD, ["broken"], plugin, validate=True, resolve=resolver(Broken))
    with pytest.raises(IOFailure) as ei:
        run(ch.top.pwrite(VD.size - 512, b"x" * 512, 0))
    assert ei.value.errno == errno.EIO and "outside" in str(ei.value)
    assert plugin.buf[VD.size - 512 :] == bytes(512)
    with pytest.raises(IOFailure, match="returned 99 bytes"):
        run(ch.top.pread(0, 100, 0))
    with pytest.raises(IOFailure, match="flags"):
        run(ch.top.pread(0, 100, Flag.FUA))
    ro = replace(VD, readonly=True)
    ch2 = build_chain(ro, [], MemPlugin(), validate=True)
    with pytest.raises(IOFailure, match="read-only"):
        run(ch2.top.pwrite(0, b"x", 0))


def test_stats_filter_counts(seed):
    plugin = MemPlugin()
    ch = build_chain(VD, ["stats"], plugin, resolve=resolver(StatsFilter))

    async def go():
        for i in range(10):
            await ch.top.pwrite(i * 4096, b"z" * 4096, 0)
        await ch.top.pread(0, 8192, 0)
        await ch.top.flush(0)

    run(go())
    st = ch.filter("stats").statistics()
    assert st["pwrite"].ops == 10 and st["pwrite"].bytes == 40960
    assert st["pread"].ops == 1 and st["pread"].bytes == 8192
    assert st["flush"].ops == 1
    assert st["pwrite"].p99_us >= st["pwrite"].p50_us > 0


def test_error_filter_is_seeded(seed):
    def pattern():
        ch = build_chain(VD, [{"name": "error", "rate": 0.3, "seed": seed}], MemPlugin(), resolve=resolver(ErrorFilter))
        out = []
        for _ in range(100):
            try:
                run(ch.top.pwrite(0, b"x", 0))
                out.append(0)
            except IOFailure as e:
                assert e.errno == errno.EIO
                out.append(1)
        return out

    a, b = pattern(), pattern()
    assert a == b and 10 < sum(a) < 60
