"""`Dedup.learn` takes a batch of new, distinct fingerprints in one C call
(the steady case) and anything else one by one; either way the known set
must be what learning them one at a time gives: the same keys in the same
LRU order, the same learned / evicted counts. Seeded random acks: new
blocks, repeats within an ack and across acks, several CGs, a small bound."""

from __future__ import annotations

import random

import pytest

from nicsplit.card.pipeline.dedup import Dedup

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_learn_in_bulk_matches_one_at_a_time(seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    known_max = rng.choice([3, 50, 1000])
    bulk, single = Dedup(known_max=known_max), Dedup(known_max=known_max)
    pool = [rng.randbytes(16) for _ in range(300)]
    for step in range(400):
        cg = rng.choice(["a", "b"])
        r = rng.random()
        if r < 0.6:
            fps = [rng.randbytes(16) for _ in range(rng.randrange(0, 70))]  # new blocks
        else:
            fps = [rng.choice(pool) for _ in range(rng.randrange(0, 20))]  # known ones, repeats too
        bulk.learn(cg, iter(fps))  # (an iterable, not only a list)
        for fp in fps:
            single.learn(cg, [fp])
        assert list(bulk._known) == list(single._known), f"seed {seed}: LRU order differs at step {step}"
        b, s = bulk.statistics(), single.statistics()
        assert (b.learned, b.evicted, b.known) == (s.learned, s.evicted, s.known), f"step {step}"
    assert b.evicted and b.learned
