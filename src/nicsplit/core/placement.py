"""Which CPUs each process of ``nicsplit up`` may run on.

Rules
=====
On a real deployment the card is a DPU with cores of its own, and the
appliance is another machine: the host's threads never share a core with
the card's acker. Emulated on one box, the acker runs SCHED_FIFO on its own
CPU(s) (``[card] cpus``, default the last core; `nicsplit.card.sched`) and
spins while writes come. A host thread the scheduler puts on that core can
publish nothing while the acker spins; each entry then rings the doorbell
and hands the core to the acker for a wake-up, pump and sleep inside the
host's ``eventfd_write``: QD1 split p50 ~35 µs instead of ~7.5 µs
(docs/benchmarks.md, "QD1: where the microseconds go"). So by default:

- **acker**: ``[card] cpus`` (None: the last allowed CPU; []: no pinning).
- **host** (``[host] cpus``): ``"auto"`` (default) = every allowed CPU but
  the acker's; ``[]`` = no pinning; a list = those CPUs.
- **appliance** (``[appliance] cpus``): same values; default ``[]`` (every
  allowed CPU: its work is after the ack, and on two cores it needs the
  acker's core's idle time; docs/operations.md "CPU placement").
- **card's pipeline worker**: ``[card] worker_cpus``, unchanged here
  (default every allowed CPU, normal priority; docs/pipeline.md).
- **console**: no pinning.

"auto" pins nothing when it cannot keep the host off the acker: one allowed
CPU (a 1-core machine: nothing to split), or an acker pinned to no CPU in
particular, or an acker on every allowed CPU. The affinity is set in the
child between fork and exec, so every thread the process starts inherits
it; a process restarted by the supervisor gets the same set.

Example (2 CPUs, defaults): acker (1,), host (0,), appliance and worker
every CPU.

A dedicated acker core (``[card] acker_core = "dedicated"``)
------------------------------------------------------------
On a DPU the acker's core serves nothing else and polls without sleeping
(poll mode, as SPDK's reactors do), so no write waits for the acker to
wake up. Emulated here, the acker's CPUs are then the card acker's alone:
the host, the appliance and the console default to "auto" (off them), the
card's pipeline worker runs on every allowed CPU but the acker's
(`nicsplit.card.fastpath`), and a placement that cannot do that is an
error at start (one CPU, an unpinned acker, or an explicit set that names
the acker's CPU): a real-time task that never sleeps starves whatever
shares its core. On two CPUs that leaves one for everything else: it is
for measuring the deployment the card is for (docs/benchmarks.md), and a
machine with cores to spare, not the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ACKER_CORES", "DEDICATED", "PlacementError", "Placement", "acker_cpus", "choose", "plan"]

AUTO = "auto"
DEDICATED = "dedicated"
ACKER_CORES = ("shared", DEDICATED)


class PlacementError(ValueError):
    """A ``cpus`` key names no valid CPU set for this machine."""


@dataclass(frozen=True)
class Placement:
    """CPU sets; ``None`` = not pinned (inherits every allowed CPU)."""
    allowed: tuple[int, ...]
    acker: tuple[int, ...] | None
    host: tuple[int, ...] | None
    appliance: tuple[int, ...] | None
    console: tuple[int, ...] | None = None
    dedicated: bool = False  # the acker's CPUs are the card's alone

    def describe(self) -> dict[str, Any]:
        every = list(self.allowed)
        out: dict[str, Any] = {k: (list(v) if v is not None else every)
                               for k, v in (("acker", self.acker), ("host", self.host), ("appliance", self.appliance),
                                            ("console", self.console))}
        out["acker_core"] = DEDICATED if self.dedicated else "shared"
        return out


def _cpu_list(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise PlacementError(f"{key} = {value!r}: use \"auto\", [] or a list of CPU numbers")
    return tuple(sorted(set(value)))


def acker_cpus(allowed: tuple[int, ...], card_cpus: Any) -> tuple[int, ...] | None:
    """The CPUs the card's acker pins to, as `nicsplit.card.sched.pin_cpus`
    decides them: None → the last allowed CPU; [] → no pinning (None)."""
    if card_cpus is None:
        return (max(allowed),) if allowed else None
    cpus = _cpu_list(card_cpus, "[card] cpus")
    return cpus or None


def choose(allowed: tuple[int, ...], acker: tuple[int, ...] | None, value: Any, key: str) -> tuple[int, ...] | None:
    """One process's set for a ``cpus`` value: "auto" (off the acker's
    CPUs when that leaves some), [] (None: not pinned) or a list (checked
    against ``allowed``)."""
    allowed = tuple(sorted(allowed))
    if value == AUTO:
        if len(allowed) < 2 or not acker:
            return None
        rest = tuple(c for c in allowed if c not in acker)
        return rest or None
    cpus = _cpu_list(value, key)
    if not cpus:
        return None
    bad = [c for c in cpus if c not in allowed]
    if bad:
        raise PlacementError(f"{key} names CPU(s) {bad} this process may not use (allowed: {list(allowed)})")
    return cpus


def plan(allowed: tuple[int, ...] | set[int], card: dict, host: dict, appliance: dict) -> Placement:
    """The placement of ``nicsplit up``'s processes from the ``[card]``,
    ``[host]`` and ``[appliance]`` tables, for the CPUs ``allowed`` to the
    supervisor (which its children inherit)."""
    allowed = tuple(sorted(allowed))
    acker = acker_cpus(allowed, card.get("cpus"))
    core = card.get("acker_core", "shared")
    if core not in ACKER_CORES:
        raise PlacementError(f"[card] acker_core must be \"shared\" or \"dedicated\", not {core!r}")
    if core != DEDICATED:
        return Placement(allowed=allowed, acker=acker,
                         host=choose(allowed, acker, host.get("cpus", AUTO), "[host] cpus"),
                         appliance=choose(allowed, acker, appliance.get("cpus", []), "[appliance] cpus"))
    # A dedicated core: everything else off it, or no start at all.
    if not acker:
        raise PlacementError("[card] acker_core = \"dedicated\" needs the acker pinned: [card] cpus = [] pins nothing")
    rest = tuple(c for c in allowed if c not in acker)
    if not rest:
        raise PlacementError(f"[card] acker_core = \"dedicated\" leaves no CPU for the host, the appliance and the "
                             f"card's worker (allowed: {list(allowed)}, acker: {list(acker)})")
    sets = {}
    for name, table in (("host", host), ("appliance", appliance)):
        key = f"[{name}] cpus"
        got = choose(allowed, acker, table.get("cpus", AUTO), key)
        if got is None or set(got) & set(acker):
            raise PlacementError(f"{key} = {table.get('cpus')!r} shares the dedicated acker core(s) {list(acker)} "
                                 f"([card] acker_core = \"dedicated\"); use \"auto\" or CPUs from {list(rest)}")
        sets[name] = got
    return Placement(allowed=allowed, acker=acker, host=sets["host"], appliance=sets["appliance"], console=rest,
                     dedicated=True)
