"""`Handoff.advance_floor` finds the run of finished positions a chunk of
flag bytes at a time; it must move the floor and report the ring's data head
exactly as a step per position does: seeded random flags and payload ends,
runs across the queue's wrap and longer than one scan chunk (4 KiB)."""

from __future__ import annotations

import os
import random

import pytest

from nicsplit.card.handoff import REFUSED, RELEASED, H, Handoff

pytestmark = pytest.mark.unit


def reference(ho: Handoff, consumed: int) -> tuple[int, int]:
    """The floor and data head a step per position gives."""
    floor, end = ho.get(H.FLOOR), 0
    while floor < consumed and ho.flags[floor & ho.mask] & RELEASED:
        e = ho.ends[floor & ho.mask]
        if e:
            end = e
        floor += 1
    return floor, end


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_advance_floor_matches_a_step_per_position(seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    ho = Handoff.create(slots=1 << 14)
    try:
        floor = rng.randrange(0, 1 << 20)
        ho.set(H.FLOOR, floor)
        data = 0
        for step in range(300):
            consumed = floor + rng.choice([0, 1, 5, 70, 5000, 9000, (1 << 14) - 1])
            consumed = min(consumed, floor + ho.n)
            finished_upto = rng.randrange(floor, consumed + 1)
            for pos in range(floor, consumed):  # a run finished, then a mix
                s = pos & ho.mask
                done = pos < finished_upto or rng.random() < 0.5
                ho.flags[s] = (RELEASED if done else 0) | (REFUSED if rng.random() < 0.05 else 0)
                if rng.random() < 0.7:
                    data += 4096
                    ho.ends[s] = data
                else:
                    ho.ends[s] = 0
            want_floor, want_end = reference(ho, consumed)
            heads: list[int] = []
            got = ho.advance_floor(consumed, heads.append)
            assert got == want_floor == ho.get(H.FLOOR), f"step {step}"
            assert heads == ([want_end] if want_end else []), f"step {step}"
            floor = got
    finally:
        ho.close()
        os.close(ho.fd)
