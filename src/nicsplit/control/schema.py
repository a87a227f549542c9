"""The schema of ``nicsplit status --json`` (docs/operations.md "Status"),
as data, and `check`, which lists where a document departs from it.

The tests check real status documents against `STATUS` so the JSON stays
what operations.md documents; the console's consumers can rely on it.

Spec language: a Python type (``int`` never admits a bool; ``float`` admits
an int), ``None`` (JSON null), a dict (exactly these keys; `Opt` marks one
that may be absent; `FREE` is any object), a one-element list (a list of
that), a tuple (any one of the alternatives) and `OneOf` (one of these
strings).
"""

from __future__ import annotations

from typing import Any

__all__ = ["STATUS", "ALERT", "check", "Opt", "OneOf", "FREE"]


class Opt:
    """A key that may be absent."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


class OneOf:
    def __init__(self, *values: str) -> None:
        self.values = values


FREE = object()  # any JSON object (a report documented elsewhere)

NUM = (int, float)
CG_STATES = OneOf("protected", "lagging", "marking", "resyncing", "initializing", "card-down", "link-down",
                  "host-down", "refused", "failed-over")
VDISK_STATES = OneOf("protected", "lagging", "marking", "resyncing", "initializing", "unprotected", "unknown", "error")
LATENCY = {"p50": (NUM, None), "p99": (NUM, None)}
RESYNC = {"done_bytes": int, "total_bytes": int, "percent": NUM, "rate_mib_s": NUM, "eta_s": (NUM, None)}
VDISK = {"name": str, "state": VDISK_STATES, "dirty_bytes": int, "reason": str, "since": (NUM, None),
         "resync": (None, RESYNC), "split_latency_us": LATENCY, "transport": Opt((str, None))}
WINDOW = (None, {"oldest_seq": int, "oldest_time": NUM, "seconds": NUM, "base_seq": int}, {"error": str})
DISTRIBUTION = {"state": str, "applied_seq": (int, None), "durable_seq": (int, None), "lag_records": (int, None),
                "lag_seconds": (NUM, None), "last_error": (str, None)}
CG = {
    "name": str, "state": CG_STATES, "role": str,
    "rpo_seconds": (NUM, None), "rpo_bytes": (int, None),
    "last_durable_seq": (int, None), "host_last_seq": (int, None),
    "protection_window": WINDOW, "journal_bytes": (int, None),
    "last_bookmark": (None, {"name": str, "seq": int, "time": NUM}),
    "throughput": {"in_bytes_per_s": (NUM, None), "out_bytes_per_s": (NUM, None),
                   "in_bytes_total": (int, None), "out_bytes_total": (int, None)},
    "compression_ratio": (NUM, None), "dedup_ratio": (NUM, None),
    "split_latency_us": LATENCY,
    "vdisks": [VDISK],
    "retention": (None, FREE),
    "refused": Opt(str),
    "distribution": DISTRIBUTION,
    "failover": (None, FREE),
}
PROCESS = {"pid": (int, None), "answering": bool, "needed": Opt(bool)}  # needed: false when no vdisk uses a card
ALERT = {"name": OneOf("card_down", "appliance_down", "rpo_above_target", "window_below_history", "marking",
                       "journal_forecast"),
         "severity": OneOf("warning", "critical"), "cg": (str, None), "message": str,
         "value": (NUM, None), "threshold": (NUM, None)}
STATUS = {
    "cgs": [CG],
    "processes": {"host": PROCESS, "card": PROCESS, "appliance": PROCESS, "console": PROCESS},
    "endpoints": {"api": (str, None), "metrics": (str, None), "dashboard": (str, None)},
    "card": {"hidden_volume_fill": (NUM, None), "overflow_fill": (NUM, None), "overflow_bytes": (int, None)},
    "alerts": [ALERT],
}


def check(doc: Any, spec: Any = STATUS, path: str = "$") -> list[str]:
    """Where ``doc`` departs from ``spec`` (empty: it conforms)."""
    if spec is FREE:
        return [] if isinstance(doc, dict) else [f"{path}: expected an object, got {type(doc).__name__}"]
    if spec is None:
        return [] if doc is None else [f"{path}: expected null, got {doc!r}"]
    if isinstance(spec, OneOf):
        return [] if doc in spec.values else [f"{path}: {doc!r} is not one of {', '.join(spec.values)}"]
    if isinstance(spec, tuple):
        problems: list[str] = []
        for alt in spec:
            p = check(doc, alt, path)
            if not p:
                return []
            problems += p
        return [f"{path}: matches none of its alternatives ({'; '.join(problems)})"]
    if isinstance(spec, list):
        if not isinstance(doc, list):
            return [f"{path}: expected a list, got {type(doc).__name__}"]
        return [p for i, item in enumerate(doc) for p in check(item, spec[0], f"{path}[{i}]")]
    if isinstance(spec, dict):
        if not isinstance(doc, dict):
            return [f"{path}: expected an object, got {type(doc).__name__}"]
        out = [f"{path}.{k}: not in the schema (document it)" for k in doc if k not in spec]
        for k, sub in spec.items():
            if k not in doc:
                if not isinstance(sub, Opt):
                    out.append(f"{path}.{k}: missing")
                continue
            out += check(doc[k], sub.spec if isinstance(sub, Opt) else sub, f"{path}.{k}")
        return out
    if spec is float:
        ok = isinstance(doc, (int, float)) and not isinstance(doc, bool)
    elif spec is int:
        ok = isinstance(doc, int) and not isinstance(doc, bool)
    else:
        ok = isinstance(doc, spec)
    return [] if ok else [f"{path}: expected {spec.__name__}, got {doc!r}"]
