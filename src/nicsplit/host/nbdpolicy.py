"""What an NBD server allows its connections: time, connections, memory, TLS.

Theory of operation
-------------------
`NBDSession` (host/session.py) asks this module's objects, never the
configuration, so the host and the image/failover servers share one policy.

- **Time.** A connection must finish the handshake within
  ``handshake_timeout`` seconds (qemu-nbd's ``--handshake-limit`` default is
  10 s too); a connection with no request for ``idle_timeout`` seconds while
  nothing is in flight is closed (default 0 = never: an idle VM disk is not
  an attack); a connection whose replies make no progress towards the client
  for ``send_timeout`` seconds is closed (a client that stops reading holds
  its connection's byte budget, and would hold it forever).
- **Connections.** At most ``max_connections`` at once per server (all its listeners); one
  beyond is accepted and closed at once (NBD has no "busy" greeting), with a
  log line (at most one per 5 s, counting what it did not log).
- **Handshake work.** At most ``max_options`` options per handshake (nbdkit
  allows 32): a client cannot make the server answer an endless stream of
  ``NBD_OPT_LIST`` on one connection.
- **Memory.** Every connection holds at most ``conn_bytes`` of request and
  reply data at once (request lengths of reads and writes being executed,
  read replies batched, replies handed to the transport and not yet sent);
  the whole server at most ``server_bytes`` (`ByteBudget`). A session over
  its bound takes no request out of its input and stops reading its socket
  until replies drained (the transport's pause/resume_writing, a task's
  end); over the server's bound it waits for the budget's wake-up. Bounds
  are checked before a request starts, so one request may cross them: per
  connection ``conn_bytes + max_payload``, per server ``server_bytes +
  max_payload`` plus `SMALL_REQUEST` per connection (a session that holds
  nothing still runs small requests while the server's budget is spent), plus
  one socket read (256 KiB) of input per connection.

Defaults, with their arithmetic: ``conn_bytes`` 64 MiB = two maximum (32 MiB)
reads, so one can be sent while the next is read; ``server_bytes`` 256 MiB =
four such connections streaming at full speed at once (more than a second
of what two cores serve), below nbdkit's 516 MiB RSS under the same flood.

- **TLS.** `resolve_tls` gives each listener its mode (`NbdTls`): ``auto``
  requires TLS beyond loopback and offers it on loopback; ``off``/``on``
  beyond loopback refuse to start. Certificates come from the deployment's
  CA (`nicsplit.core.pki.nbd_server_context`), and clients must present one;
  or, with a key file (``[host] tls_psk``), clients prove a pre-shared key
  instead (`nicsplit.core.tlspsk`, no certificate on either side).

Example::

    limits = NbdLimits.from_config(cfg)      # [host] keys, see docs/operations.md
    budget = ByteBudget(limits.server_bytes)
    tls = resolve_tls("auto", "0.0.0.0", cfg.layout.pki)   # -> mode "require"
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nicsplit.core import pki, tlspsk
from nicsplit.core.config import ConfigError
from nicsplit.wire import nbd

log = logging.getLogger(__name__)

MIB = 1 << 20
# While the server's budget is spent, a session that holds nothing may still
# run requests up to this size, one at a time: clients that stopped reading
# cannot starve the others, and the overshoot is at most 1 MiB a connection.
SMALL_REQUEST = MIB


class PolicyError(ConfigError):
    """A bad NBD limit or TLS setting in the configuration (one clear line)."""


@dataclass(frozen=True, slots=True)
class NbdLimits:
    handshake_timeout: float = 10.0   # seconds from accept to transmission; 0 = none
    idle_timeout: float = 0.0         # seconds without a request, nothing in flight; 0 = none
    send_timeout: float = 60.0        # seconds of replies not moving towards the client; 0 = none
    max_connections: int = 256        # per server (TCP and Unix together); 0 = no cap
    max_options: int = 32             # options per handshake (as nbdkit)
    conn_bytes: int = 64 * MIB        # request + reply bytes held per connection
    server_bytes: int = 256 * MIB     # ... across the server

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "idle_timeout", "send_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise PolicyError(f"[host] {name} = {v!r}: seconds >= 0 (0 = none)")
        for name in ("max_connections", "max_options", "conn_bytes", "server_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PolicyError(f"[host] {name} = {v!r}: an integer >= 0")
        if self.max_options < 1 or self.conn_bytes < MIB or self.server_bytes < self.conn_bytes:
            raise PolicyError("[host] max_options must be >= 1, conn_inflight_mib >= 1 and "
                              "server_inflight_mib >= conn_inflight_mib")

    def apply(self, transport: Any) -> None:
        """Write-buffer marks of a new connection: above a quarter of
        ``conn_bytes`` the transport calls pause_writing, below 1/16 resume_writing."""
        transport.set_write_buffer_limits(high=self.conn_bytes // 4, low=self.conn_bytes // 16)

    @classmethod
    def from_config(cls, cfg: Any) -> "NbdLimits":
        d = cls()
        return cls(
            handshake_timeout=float(cfg.host("handshake_timeout", d.handshake_timeout)),
            idle_timeout=float(cfg.host("idle_timeout", d.idle_timeout)),
            send_timeout=float(cfg.host("send_timeout", d.send_timeout)),
            max_connections=_int(cfg.host("max_connections", d.max_connections), "max_connections"),
            max_options=_int(cfg.host("max_options", d.max_options), "max_options"),
            conn_bytes=_int(cfg.host("conn_inflight_mib", d.conn_bytes // MIB), "conn_inflight_mib") * MIB,
            server_bytes=_int(cfg.host("server_inflight_mib", d.server_bytes // MIB), "server_inflight_mib") * MIB,
        )


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PolicyError(f"[host] {name} = {v!r}: an integer")
    return v


class ByteBudget:
    """Bytes held by all sessions of one server (see the module docstring).

    A session adds and removes its own share (`add`, or ``held`` directly on
    the hot path); ``held >= limit`` means a new request must wait. Sessions
    that wait register a wake-up callback (`wait`); they are woken (on the
    next loop turn) when bytes are given back, and every ``recheck`` seconds
    while anyone waits, after the ``remeasure`` callback made every session
    measure its share again (a transport that drains below its high-water
    mark tells no one)."""

    def __init__(self, limit: int, recheck: float = 0.05) -> None:
        self.limit = limit
        self.held = 0
        self.waits = 0
        self._recheck = recheck
        self._waiters: dict[object, Callable[[], None]] = {}
        self._remeasure: Callable[[], None] | None = None
        self._loop: Any = None
        self._timer: Any = None
        self._wake_scheduled = False

    def add(self, n: int) -> None:
        self.held += n
        if n < 0 and self._waiters and self.held < self.limit and not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon(self._wake)

    def wait(self, key: object, wake: Callable[[], None], loop: Any,
             remeasure: Callable[[], None] | None = None) -> None:
        if key not in self._waiters:
            self.waits += 1
        self._waiters[key] = wake
        self._loop = loop
        self._remeasure = remeasure
        if self._timer is None:
            self._timer = loop.call_later(self._recheck, self._tick)

    def waiting(self, key: object) -> bool:
        return key in self._waiters

    def cancel(self, key: object) -> None:
        self._waiters.pop(key, None)

    def _tick(self) -> None:
        self._timer = None
        if self._remeasure is not None:
            self._remeasure()
        self._wake()   # a waiter still over the limit calls wait() again, which re-arms the timer

    def _wake(self) -> None:
        self._wake_scheduled = False
        waiters, self._waiters = self._waiters, {}
        for wake in waiters.values():
            wake()

    def statistics(self) -> dict[str, int]:
        return {"limit": self.limit, "held": self.held, "waits": self.waits, "waiting": len(self._waiters)}


class RateLimitedLog:
    """At most one log line per ``every`` seconds; the next says how many were left out."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last = -1e18
        self._dropped = 0
        self.total = 0

    def warning(self, msg: str, *args: Any) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self._last < self.every:
            self._dropped += 1
            return
        self._last = now
        if self._dropped:
            msg += f" (and {self._dropped} more like it not logged)"
            self._dropped = 0
        log.warning(msg, *args)


# -- TLS -----------------------------------------------------------------------------

TLS_SETTINGS = ("auto", nbd.TLS_OFF, nbd.TLS_ON, nbd.TLS_REQUIRE)


@dataclass(frozen=True)
class NbdTls:
    """The TLS mode of one listener and what it needs.

    ``mode``: `nbd.TLS_OFF` (STARTTLS refused), `nbd.TLS_ON` (offered; plain
    clients still served), `nbd.TLS_REQUIRE` (every option but STARTTLS and
    ABORT gets NBD_REP_ERR_TLS_REQD). ``clients``: the certificate CNs let in
    (empty = any certificate our CA issued). ``psk``: clients authenticate
    with a pre-shared key, not a certificate (the key file says who gets in)."""

    mode: str = nbd.TLS_OFF
    context: ssl.SSLContext | None = None
    clients: frozenset[str] = frozenset()
    local_mode: str | None = None   # the mode for peers on loopback, if not ``mode``
    psk: bool = False

    def admits(self, cn: str | None) -> bool:
        return not self.clients or cn in self.clients

    def mode_for(self, peer: Any) -> str:
        """The mode of one connection (the spec lets it depend on the
        session): ``local_mode`` for a loopback peer, else ``mode``."""
        if self.local_mode is not None and isinstance(peer, tuple) and is_loopback(str(peer[0])):
            return self.local_mode
        return self.mode


NO_TLS = NbdTls()


def is_loopback(host: str | None) -> bool:
    """True for a Unix socket (None), ``localhost`` and loopback addresses."""
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a name or a wildcard: reachable beyond this machine


def resolve_tls(setting: str, host: str | None, pki_dir: Path, *, names: tuple[str, ...] = (),
                clients: tuple[str, ...] = (), psk: Path | None = None) -> NbdTls:
    """The TLS of a listener on ``host`` (None = a Unix socket).

    ``auto``: required beyond loopback (but only offered to peers that
    connect from loopback: this machine's own tools, e.g. failback, which may
    use the Unix socket or a loopback listener in the clear anyway); offered
    on loopback when the deployment has a CA; else off. Beyond loopback
    anything but ``require`` (or ``auto``) is refused: the exports would be
    readable and writable by anyone who can reach the port. An explicit
    ``require`` requires TLS of every peer. With ``psk`` (a key file) TLS
    authenticates by pre-shared key and needs no CA."""
    if setting not in TLS_SETTINGS:
        raise PolicyError(f"tls = {setting!r}: one of {', '.join(TLS_SETTINGS)}")
    local = is_loopback(host)
    if setting == "auto":
        have_ca = psk is not None or ((Path(pki_dir) / "ca.crt").exists() and (Path(pki_dir) / "ca.key").exists())
        mode = nbd.TLS_REQUIRE if not local else (nbd.TLS_ON if have_ca else nbd.TLS_OFF)
    elif not local and setting != nbd.TLS_REQUIRE:
        raise PolicyError(f"--tls {setting} on {host}: TLS is required when listening beyond loopback "
                          f"(use --tls require, or listen on 127.0.0.1)")
    elif host is None and setting == nbd.TLS_REQUIRE:
        # The Unix socket is guarded by its file mode: TLS is offered there,
        # never required, so this machine's own tools (failback, restore
        # --in-place: they prefer the socket) always have a way in.
        mode = nbd.TLS_ON
    else:
        mode = setting
    if mode == nbd.TLS_OFF:
        return NbdTls()
    local = nbd.TLS_ON if setting == "auto" and mode == nbd.TLS_REQUIRE else None
    if psk is not None:
        if clients:
            raise PolicyError("[host] tls_clients names certificate CNs; with tls_psk the key file "
                              "says who gets in (leave tls_clients empty)")
        try:
            ctx = tlspsk.psk_server_context(tlspsk.load_keys(Path(psk)))
        except tlspsk.PskError as e:
            raise PolicyError(f"NBD over TLS-PSK ({mode}): {e}") from None
        return NbdTls(mode, ctx, frozenset(), local, psk=True)
    try:
        ctx = pki.nbd_server_context(Path(pki_dir), names)
    except pki.PkiError as e:
        raise PolicyError(f"NBD over TLS ({mode}) needs the deployment's certificates: {e}") from None
    return NbdTls(mode, ctx, frozenset(clients), local)
