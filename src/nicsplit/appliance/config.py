"""The ``[appliance]`` table of nicsplit.toml (documented in DEFAULT_TOML,
`nicsplit.core.config`) mapped onto the server's `ServerConfig`, plus the
``[retention]`` policy and the card's dedup horizon that retention must
respect. Every bad value is one `ConfigError` line naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nicsplit.appliance.server import COMMIT_WINDOW_US, ServerConfig
from nicsplit.core import config as cfgmod
from nicsplit.core.config import parse_listen, parse_size
from nicsplit.recovery.retention import Policy, RetentionError

__all__ = ["DEFAULT_LISTEN", "server_config", "at_rest_encryption", "pki_dir"]

DEFAULT_LISTEN = "127.0.0.1:10810"

# The documented [appliance] section lives in nicsplit.core.config.DEFAULT_TOML.


def _section(cfg: cfgmod.Config) -> dict[str, Any]:
    sec = cfg.raw.get("appliance", {})
    if not isinstance(sec, dict):
        raise cfgmod.ConfigError(f"{cfg.data / cfgmod.CONFIG_NAME}: [appliance] must be a table")
    return sec


def pki_dir(cfg: cfgmod.Config) -> Path:
    p = Path(str(_section(cfg).get("pki", "pki")))
    return p if p.is_absolute() else cfg.data / p


def server_config(cfg: cfgmod.Config, listen: str | None = None) -> ServerConfig:
    """The ServerConfig for a data directory (``[appliance]`` + overrides)."""
    sec = _section(cfg)
    known = {"listen", "pki", "peers", "encryption", "segment_size", "heartbeat_interval", "idle_timeout", "queue_depth",
             "at_rest_encryption", "max_unknown_cgs", "commit_window_us",
             "cpus"}  # read by `nicsplit up` (nicsplit.core.placement), not by the appliance
    unknown = set(sec) - known
    if unknown:
        raise cfgmod.ConfigError(f"[appliance]: unknown key(s) {', '.join(sorted(unknown))}")

    def positive(key: str, default: float) -> float:
        v = sec.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise cfgmod.ConfigError(f"[appliance] {key} = {v!r}: must be a positive number")
        return v

    window = sec.get("commit_window_us", COMMIT_WINDOW_US)
    if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window <= 1_000_000:
        raise cfgmod.ConfigError(f"[appliance] commit_window_us = {window!r}: must be an integer 0..1000000")
    max_unknown = sec.get("max_unknown_cgs", 64)
    if not isinstance(max_unknown, int) or isinstance(max_unknown, bool) or max_unknown < 0:
        raise cfgmod.ConfigError(f"[appliance] max_unknown_cgs = {max_unknown!r}: must be an integer >= 0")
    # The classic splitter (transport "net") ships from the host: its
    # certificate is a peer too, unless [appliance] peers says otherwise.
    uses_net = cfg.splitter("transport", "ring") == "net" or any(
        isinstance(v, dict) and v.get("transport") == "net" for v in cfg.raw.get("vdisks", {}).values())
    peers = sec.get("peers", ["card", "host"] if uses_net else ["card"])
    if not isinstance(peers, list) or not all(isinstance(p, str) and p for p in peers):
        raise cfgmod.ConfigError("[appliance] peers must be a list of certificate names")
    return ServerConfig(
        data=cfg.data,
        listen=parse_listen(listen or str(sec.get("listen", DEFAULT_LISTEN))),
        pki_dir=pki_dir(cfg),
        peers=tuple(peers),
        encryption=bool(sec.get("encryption", True)),
        segment_size=parse_size(sec.get("segment_size", "64M"), "segment_size"),
        heartbeat_interval=positive("heartbeat_interval", 5),
        idle_timeout=positive("idle_timeout", 30),
        queue_depth=int(positive("queue_depth", 16)),
        commit_window_us=window,
        max_unknown_cgs=max_unknown,
        retention=_retention(cfg),
        dedup_min_age_s=_dedup_min_age(cfg),
    )


def _retention(cfg: cfgmod.Config) -> Policy:
    """``[retention]`` as a `retention.Policy` (ConfigError when bad)."""
    try:
        return Policy.from_config(cfg.raw.get("retention"))
    except RetentionError as e:
        raise cfgmod.ConfigError(str(e)) from None


def _dedup_min_age(cfg: cfgmod.Config) -> float:
    """Retention rule 6: twice the card's dedup horizon (0 with dedup off)."""
    card = cfg.raw.get("card", {})
    if card.get("dedup") is False:
        return 0.0
    try:
        return 2 * float(card.get("dedup_horizon_s", 600))
    except (TypeError, ValueError):
        raise cfgmod.ConfigError(f"[card] dedup_horizon_s = {card.get('dedup_horizon_s')!r}: a number of seconds") from None


def at_rest_encryption(cfg: cfgmod.Config) -> bool:
    """``[appliance] at_rest_encryption`` (default true)."""
    v = _section(cfg).get("at_rest_encryption", True)
    if not isinstance(v, bool):
        raise cfgmod.ConfigError(f"[appliance] at_rest_encryption = {v!r}: must be true or false")
    return v
