"""The link emulator's sans-IO core (`nicsplit.testing.linkemu.Shaper`):
due times for delay, jitter and the bandwidth cap; blackhole, duplicate and
byte flips. No sockets: chunks in with a clock, emits out."""

from __future__ import annotations

import random

import pytest

from nicsplit.testing.linkemu import LinkParams, Shaper


def shaper(seed: int = 0, **params) -> Shaper:
    return Shaper(LinkParams(**params).check(), random.Random(seed))


def test_no_shaping_forwards_at_once_and_unchanged():
    s = shaper()
    (e,) = s.feed(10.0, b"hello")
    assert (e.at, e.data) == (10.0, b"hello")
    assert s.stats.bytes_in == s.stats.bytes_out == 5


def test_delay_is_added_to_every_chunk():
    s = shaper(delay_ms=0.5)
    assert [e.at for e in s.feed(1.0, b"a")] == [pytest.approx(1.0005)]
    assert [e.at for e in s.feed(2.0, b"b")] == [pytest.approx(2.0005)]


def test_jitter_is_seeded_bounded_and_never_reorders(seed):
    def run(sd):
        s = shaper(sd, delay_ms=2.0, jitter_ms=1.5)
        return [s.feed(i * 1e-4, b"x")[0].at for i in range(2000)]

    ats = run(seed)
    assert ats == run(seed)  # reproducible from the seed
    assert ats != run(seed + 1)
    assert ats == sorted(ats)  # a byte stream cannot overtake itself
    added = [at - i * 1e-4 for i, at in enumerate(ats)]
    assert min(added) >= 0.5e-3 - 1e-9 and max(added) <= 3.5e-3 + 1e-9
    # Spaced further apart than the jitter, chunks see the whole spread, uniformly.
    s = shaper(seed, delay_ms=2.0, jitter_ms=1.5)
    spread = sorted(s.feed(i * 0.01, b"x")[0].at - i * 0.01 for i in range(2000))
    assert spread[100] < 1.0e-3 and spread[1900] > 3.0e-3
    assert abs(spread[1000] - 2.0e-3) < 0.2e-3


def test_rate_cap_spaces_chunks_by_their_serialisation_time():
    # 8 Mbit/s is 1 MB/s: after the burst, 64 KiB leaves every 65.536 ms.
    s = shaper(rate_mbit=8, burst_bytes=16 << 10)
    ats = [s.feed(0.0, bytes(64 << 10))[0].at for _ in range(16)]
    total = 16 * (64 << 10)
    assert ats[-1] == pytest.approx((total - (16 << 10)) / 1e6)
    gaps = [b - a for a, b in zip(ats, ats[1:])]
    assert all(g == pytest.approx(0.065536) for g in gaps)


def test_rate_cap_lets_a_burst_through_after_idle_time():
    s = shaper(rate_mbit=8, burst_bytes=16 << 10)
    assert s.feed(0.0, bytes(16 << 10))[0].at == 0.0
    assert s.feed(0.0, bytes(1000))[0].at == pytest.approx(1e-3)
    assert s.feed(5.0, bytes(16 << 10))[0].at == 5.0  # refilled meanwhile


def test_rate_and_delay_add_up():
    s = shaper(rate_mbit=8, burst_bytes=1000, delay_ms=10)
    s.feed(0.0, bytes(1000))
    (e,) = s.feed(0.0, bytes(1000))
    assert e.at == pytest.approx(1e-3 + 10e-3)


def test_blackhole_forwards_nothing_but_counts():
    s = shaper(delay_ms=1)
    s.blackhole = True
    assert s.feed(0.0, b"abc") == []
    assert (s.stats.bytes_in, s.stats.bytes_out, s.stats.dropped_bytes) == (3, 0, 3)
    s.blackhole = False
    assert [e.data for e in s.feed(0.0, b"de")] == [b"de"]


def test_duplicate_forwards_the_next_chunk_twice_in_order():
    s = shaper(delay_ms=1)
    s.feed(0.0, b"one")
    s.duplicates = 1
    emits = s.feed(0.1, b"two")
    assert [e.data for e in emits] == [b"two", b"two"]
    assert emits[0].at <= emits[1].at
    assert [e.data for e in s.feed(0.2, b"three")] == [b"three"]
    assert s.stats.duplicated == 1


def test_flip_at_stream_offsets_across_chunks():
    s = shaper()
    s.flip_at = {3, 7}
    out = b"".join(e.data for e in s.feed(0, b"abcde") + s.feed(0, b"fghij"))
    assert out == b"abc" + bytes([ord("d") ^ 0xFF]) + b"efg" + bytes([ord("h") ^ 0xFF]) + b"ij"
    assert s.stats.flipped == [3, 7] and not s.flip_at


def test_flip_probability_is_seeded_and_flips_one_bit(seed):
    def run(sd):
        s = shaper(sd, flip_probability=0.25)
        return [s.feed(0, bytes(100))[0].data for _ in range(400)], s.stats.flipped

    chunks, flipped = run(seed)
    assert (chunks, flipped) == run(seed)
    bad = [c for c in chunks if c != bytes(100)]
    assert 50 < len(bad) < 150, len(bad)
    assert all(sum(bin(b).count("1") for b in c) == 1 for c in bad)
    assert len(flipped) == len(bad)


@pytest.mark.parametrize("params", [dict(delay_ms=-1), dict(jitter_ms=-0.1), dict(rate_mbit=-5),
                                    dict(burst_bytes=0), dict(flip_probability=1.5)])
def test_bad_parameters_are_refused_with_a_clear_error(params):
    with pytest.raises(ValueError, match="range|not in"):
        LinkParams(**params).check()
