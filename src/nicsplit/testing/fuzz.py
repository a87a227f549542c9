"""Hypothesis settings for the fuzz targets (tests/unit/test_*fuzz*.py and
tests/integration/test_stdio_fuzz.py): one place that says how hard they try.

Rule of every target (h11's): a decoder parses, or raises its protocol error
(FrameError, RemoteProtocolError, RingFormatError, TornRecord,
JournalCorrupt/JournalError, an error reply on a control socket) — never
anything else.

In ``make test`` each target runs a modest, *derandomized* budget (the
examples are derived from the test's name, so CI is reproducible and a
failure prints the example and a ``@reproduce_failure`` blob). To fuzz
longer (docs/operations.md, "Fuzzing")::

    NICSPLIT_FUZZ_SCALE=100 pytest -q tests/unit -k fuzz     # 100 x the examples
    NICSPLIT_FUZZ_RANDOM=1 ...                                # fresh examples each run

``NICSPLIT_FUZZ_SCALE`` multiplies every target's ``max_examples``;
``NICSPLIT_FUZZ_RANDOM=1`` turns derandomization off (Hypothesis then
prints the reproduce blob of any failure: that blob is the seed).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["fuzz_settings", "scale"]


def scale() -> float:
    """The ``NICSPLIT_FUZZ_SCALE`` factor (1 unless set)."""
    return float(os.environ.get("NICSPLIT_FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int, **kw) -> settings:
    """Settings of one fuzz target: ``max_examples`` (times the scale), no
    deadline (a 2-core CI box is slow at random), derandomized unless
    ``NICSPLIT_FUZZ_RANDOM=1``, reproduce blob printed on failure."""
    random = os.environ.get("NICSPLIT_FUZZ_RANDOM", "") not in ("", "0")
    return settings(
        max_examples=max(1, int(max_examples * scale())),
        deadline=None,
        derandomize=not random,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
        **kw,
    )
