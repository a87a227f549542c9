"""`CardPipeline._release_many` (a durable batch's releases): on seeded
random batches where some writes were already released (dropped, or a
duplicate durable ack), exactly the writes still held go to the
transport's ``release_many``, in order, once each, and the per-CG pending
bytes fall by their payloads — as the one-by-one `_release` does."""

from __future__ import annotations

import random

import pytest

from nicsplit.card.pipeline.pipeline import CardPipeline
from nicsplit.testing.pipeline import FakeCatalog

pytestmark = pytest.mark.unit


def make(got: list) -> CardPipeline:
    return CardPipeline(FakeCatalog({1: ("k", "v", 1 << 30)}), release=got.append, on_lost=lambda w: None,
                        key=None, release_many=lambda ios: got.append(list(ios)))


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_release_many_matches_release_one_by_one(seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    many_got: list = []
    one_got: list = []
    many, one = make(many_got), make(one_got)
    for step in range(200):
        ios = list(range(step * 100, step * 100 + rng.randrange(1, 40)))
        for io in ios:  # a write's CG and payload, as `feed` notes them (None: dropped at resolve)
            many._payload_ios[io] = one._payload_ios[io] = (rng.choice(["a", "b", None]), rng.randrange(0, 9000))
        for cg in ("a", "b"):
            for p in (many, one):
                p._cg_bytes(cg).pending = 10**9
        gone = [io for io in ios if rng.random() < 0.3]  # released before the ack (or acked twice)
        for io in gone:
            many._release(io)
            one._release(io)
        many_got.clear()
        one_got.clear()
        many._release_many(ios)
        for io in ios:
            one._release(io)
        assert many_got == [[io for io in ios if io not in gone]], f"step {step}"
        assert one_got == [io for io in ios if io not in gone]
        assert {cg: a.pending for cg, a in many._acct.items()} == {cg: a.pending for cg, a in one._acct.items()}
        assert many.statistics().released == one.statistics().released
        assert not many._payload_ios and not one._payload_ios
