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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PlacementError", "Placement", "acker_cpus", "choose", "plan"]

AUTO = "auto"


class PlacementError(ValueError):
    """A ``cpus`` key names no valid CPU set for this machine."""


@dataclass(frozen=True)
class Placement:
    """CPU sets; ``None`` = not pinned (inherits every allowed CPU)."""
    allowed: tuple[int, ...]
    acker: tuple[int, ...] | None
    host: tuple[int, ...] | None
    appliance: tuple[int, ...] | None

    def describe(self) -> dict[str, Any]:
        every = list(self.allowed)
        return {k: (list(v) if v is not None else every)
                for k, v in (("acker", self.acker), ("host", self.host), ("appliance", self.appliance))}


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
    return Placement(allowed=allowed, acker=acker,
                     host=choose(allowed, acker, host.get("cpus", AUTO), "[host] cpus"),
                     appliance=choose(allowed, acker, appliance.get("cpus", []), "[appliance] cpus"))
