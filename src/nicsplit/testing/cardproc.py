"""A real `nicsplit card run` (the acker process and its pipeline worker) for
tests that drive its ring with the host's own `RingSplitter`.

`card_data(tmp_path, **card_options)` makes a data directory with vdisk "a"
(64 MiB) and a 16M ring; `CardProcess(data).start()` runs the card with an
appliance address nobody listens on (so writes stay held);
`card_stats(data)` asks its control socket; `pattern_write(io_id, seed)` is a
4 KiB write whose payload is a function of (io_id, seed)::

    data = card_data(tmp_path, worker_nap_us=300_000)
    c = CardProcess(data).start()
    ...
    c.stop()
"""

from __future__ import annotations

from pathlib import Path
from time import monotonic_ns

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import ReadyProcess, nicsplit_cmd, run_cli

BS = 4096  # the block size of pattern_write


class CardProcess(ReadyProcess):
    what = "card"

    def argv(self) -> list[str]:
        return nicsplit_cmd("--data", str(self.data), "card", "run", "--appliance", "127.0.0.1:9")


def card_data(tmp_path: Path, **card_options) -> Path:
    """``tmp_path/data`` with the [card] options given (besides a 16M ring and
    backoff_min_s 1.0) and vdisk "a" of 64 MiB."""
    data = init_data(tmp_path / "data", sections={"card": {"transport_options": {"data_size": "16M"},
                                                           "backoff_min_s": 1.0, **card_options}})
    run_cli(data, "vdisk", "create", "a", "--size", str(64 << 20))
    return data


def card_stats(data) -> dict:
    return request(Layout(data).card_ctl_sock, {"cmd": "stats"})["stats"]


def card_stats_or_none(data):
    """The stats, or None while the card cannot answer (a worker restarting)."""
    try:
        return card_stats(data)
    except (OSError, TypeError, KeyError):
        return None


def pattern_write(io_id: int, seed: int) -> AugmentedWrite:
    payload = (io_id * 2654435761 + seed).to_bytes(8, "little") * (BS // 8)
    return AugmentedWrite(io_id, 1, io_id, 1, Op.WRITE, WFlag.NONE, (io_id % 1000) * BS, BS, monotonic_ns(), payload)
