"""The data directory and its configuration file, ``nicsplit.toml``.

Layout of a data directory (created by ``nicsplit init``)::

    DIR/nicsplit.toml     configuration (documented template below)
    DIR/datastore/        catalog, volume files, extent map (docs/datastore.md)
    DIR/run/              sockets and pid files of running processes

Every key is optional; `DEFAULT_TOML` documents each one with its default.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nicsplit.core.layout import CONFIG_NAME, InDataDir, Layout
from nicsplit.core.names import BadName, check_name

ENV_DATA = "NICSPLIT_DATA"
DEFAULT_DATA = "./nicsplit-data"

DEFAULT_TOML = '''\
# nicsplit configuration. Every key is optional; the values shown are the
# defaults. Sizes accept K, M, G, T suffixes (powers of 1024).

[host]
# TCP address `nicsplit host serve` listens on for NBD clients (--listen).
listen = "127.0.0.1:10809"
# Also listen on this Unix socket; empty means none (--socket).
socket = ""
# Filter chain of every vdisk, top first. An entry is a filter name or a
# table {name = "...", option = value, ...}. Built in: stats, split, delay,
# error; more install as Python packages (entry-point group
# "nicsplit.filters"). "split" protects vdisks that are in a consistency
# group (and passes the others through): e.g.
# {name = "split", split_timeout_us = 1000} waits at most 1 ms for the card.
filters = ["stats", "split"]
# A marking vdisk resyncs by itself once the card is back: its dirty regions
# are copied to the card at most this fast (MiB/s, all vdisks together; 0 =
# unlimited; halved while the card acks client writes late), with at most
# resync_parallel vdisks at a time.
resync_mib_s = 64
resync_parallel = 2
# The rate is halved while client writes wait longer than this for the
# card's ack on average (microseconds), or any ack is late.
resync_latency_us = 2000
# false: marking vdisks wait (for an operator, or a test) instead of resyncing.
resync = true
# Activity log (docs/operations.md, "Host crash and the activity log"): at
# most this many 4 MiB extents are hot (DRBD's al-extents); after a host
# crash only the hot extents are resynced. A write to a cold extent waits for
# one fdatasync of DATA/host/activity.log; 0 turns the log off.
al_extents = 1237
# Check the contract between every pair of chain layers (ranges, flags,
# read lengths). Costs some CPU per IO; the test suite turns it on.
validate = false
# Serve every export read-only.
readonly = false
# CPUs `nicsplit up` lets the host run on (docs/operations.md, "CPU
# placement"): "auto" = every CPU but the card acker's ([card] cpus), as on
# a DPU, when there are two or more; [] = no pinning; or a list, e.g. [0].
# cpus = "auto"
# Requests in flight per connection before the server stops reading from
# it (backpressure): 128 covers any common client queue depth.
max_inflight = 128
# NBD connections (docs/operations.md, "NBD doors"): seconds a client has
# to finish the handshake; seconds without a request before an idle
# connection is closed (0 = never); seconds replies may make no progress
# towards a client that stopped reading before it is closed (0 = never);
# connections at once (0 = no cap); options per handshake.
handshake_timeout = 10
idle_timeout = 0
send_timeout = 60
max_connections = 256
max_options = 32
# MiB of request and reply data (reads included) one connection, and the
# whole server, may hold before they stop taking requests until replies drain.
conn_inflight_mib = 64
server_inflight_mib = 256
# NBD over TLS (--tls): auto = required beyond loopback, offered on it;
# off, on (offered) or require. tls_names: extra DNS names / addresses for
# the server certificate (DATA/pki/nbd-server.crt); tls_clients: the client
# certificate CNs let in (empty: any certificate of this deployment's CA).
# tls_psk: a psktool key file (username:hexkey lines, mode 0600; relative to
# the data directory): clients prove a pre-shared key instead of presenting
# a certificate (nicsplit pki nbd-psk FILE --name NAME adds one).
tls = "auto"
tls_names = []
tls_clients = []
tls_psk = ""

[splitter]
# How the splitter filter hands each write to protection (docs/operations.md
# "Choosing a transport"): "ring" (shared memory to the offload card: the
# card acks in microseconds and ships to the appliance itself), "nvme-pi"
# (to the card as NVMe writes with protection information), "shadow" (a
# fake write to the card, matched there with the real write, which the
# datastore passes through the card's emulated device) or "net" (the
# classic splitter: no card; the host ships every write to the appliance
# over TLS and waits for its durable ack before the write goes down). One
# vdisk may differ: [vdisks.NAME] transport = "net". `nicsplit up
# --transport NAME` (and `host serve --transport NAME`) replaces this value
# for that run. All the vdisks of one consistency group must use the same
# transport, and one card serves one transport: the vdisks using the card
# use the same one (ring, nvme-pi or shadow). `nicsplit up` starts the card only if
# a vdisk uses one, and passes it that transport ([card] transport, if
# set, must agree).
transport = "ring"
# net only: the appliance to ship to; default [card] appliance if set, else
# [appliance] listen (under `nicsplit up`: the address the appliance reports).
# appliance = "127.0.0.1:10810"
# net only: heartbeat every heartbeat_s; the link is dead after dead_after_s
# without a frame while writes wait (they are marked, the resync copies them
# after the reconnect); connect_timeout_s bounds TLS + Hello. A write waits at
# most the split filter's split_timeout_us for its ack (default 1 s with net).
# compress: zstd the batches (costs latency on every write).
# heartbeat_s = 1.0
# dead_after_s = 5.0
# connect_timeout_s = 5.0
# compress = false

[datastore]
# Largest size of one datastore volume file (sparse); another volume is
# added when all are full.
volume_size = "64G"
# Thin-provisioning allocation unit: a vdisk's first write to an extent
# allocates it. A multiple of the 4 KiB block size.
extent_size = "1M"

[appliance]
# TCP address `nicsplit appliance run` listens on for cards (--listen).
listen = "127.0.0.1:10810"
# CPUs `nicsplit up` lets the appliance run on: [] = every CPU (default),
# "auto" = every CPU but the card acker's, or a list.
# cpus = []
# Directory of the deployment's CA, certificates and batch key
# (`nicsplit pki init`); relative paths are inside the data directory.
pki = "pki"
# Certificate names (CN) allowed to ship batches: only the card's. (Every
# leaf of the deployment's CA is a valid client; the host's and the
# appliance's own must not ship.)
peers = ["card"]
# Require AES-256-GCM sealed batches (key: pki/batch.key). false accepts
# only unencrypted bodies (tests, benchmarks of the cipher's cost).
encryption = true
# Journal segment file size: 64M holds 4 full batches of 16 MiB.
segment_size = "64M"
# Encrypt journal records at rest (AES-256-GCM; record heads stay in clear,
# authenticated) with the keyring appliance/at-rest.key, created at the
# first start (mode 0600). Rotate with `nicsplit appliance rotate-key`;
# `nicsplit appliance keys` shows which keys segments use (docs/journal.md).
# false: new segments are written in clear; sealed ones stay readable.
at_rest_encryption = true
# Seconds between heartbeats; a peer silent for idle_timeout is dropped.
heartbeat_interval = 5
idle_timeout = 30
# Batches buffered per connection before the appliance stops reading it;
# the batches queued for one CG are journaled with a single fdatasync.
queue_depth = 16
# Group commit: after a CG's batch, wait up to this long for more of its
# batches before the one fdatasync that makes them all durable (an fdatasync
# costs more CPU than a small batch; the card acks writes without waiting
# for it, so only the RPO grows, by at most this). 0: only what is queued.
commit_window_us = 2000
# A card's Hello may create a journal for a CG in cgs.json or the catalog;
# for any other (unknown) CG only while fewer than this many journals of
# unknown CGs exist (0: known CGs only). Bounds what a Hello can create.
max_unknown_cgs = 64

[card]
# The emulated offload card (`nicsplit card run`). Every pipeline option is
# documented in docs/pipeline.md; the main ones:
# Where to ship; default: the [appliance] listen address (under `nicsplit up`:
# the address the appliance reports). Set it to put a relay in between.
# appliance = "127.0.0.1:10810"
# The card runs as two processes (docs/pipeline.md "Fast path"): the acker
# takes each write from the ring, checks it and acks it, and does nothing
# else; the pipeline worker merges, dedups, compresses, seals and ships.
# An ack never waits behind a batch being sealed (fast_path = "inline" runs
# both on one thread, as before).
# fast_path = "process"
# CPUs the acker is pinned to; default: the last core. Under `nicsplit up`
# the host keeps off them ([host] cpus).
# cpus = [1]
# Scheduling of the acker on its (shared) core: realtime (SCHED_FIFO 1;
# falls back to high where not permitted), high (nice -10) or normal. A
# DPU's cores serve only the card; on a shared core the acker must preempt
# others the moment the doorbell rings. Its work per write is a few us.
priority = "realtime"
# The acker polls this long after its last write before it sleeps on the
# doorbell: short, because a real-time spinner keeps everything else off
# its core, and a doorbell wake-up of a real-time task preempts at once; not
# at all while the worker has left entries unread for 100 us (it needs the
# core). Measured here: 200 us cut unpaced QD16 to a third of the IOPS.
# ack_spin_us = 50
# "dedicated": the acker's CPUs are the card's alone, as a DPU's cores are:
# it polls without ever sleeping (no write waits for its wake-up), and the
# host, appliance, console and the card's worker are kept off them (an error
# at start where that leaves no CPU). On 2 CPUs it halves what the rest may
# use: the DPU emulation of docs/benchmarks.md, not the default.
# acker_core = "shared"
# The worker runs at normal priority (worker_priority) on every core
# (worker_cpus = []). It does not spin: the acker acks, so nothing waits for
# it but the RPO. After its last entry it naps worker_nap_us on a timer, then
# 2, 4 and 8 times that (the acker rings it only for a barrier, so a
# bookmark's PIT does not wait out the nap), taking what came meanwhile in
# one round; then it sleeps on the doorbell. worker_nap_us = 0: it polls the
# acker's queue idle_spin_us before sleeping on the doorbell (also the
# inline fast path's spin).
# worker_nap_us = 20000
idle_spin_us = 200
# Coalesce overlapping writes of one vdisk within this window (0 = every
# write is its own point in time).
merge_window_ms = 0
# A batch closes at this many bytes or after this delay, whichever first.
# With the fast path in its own process (the default) they default to 4M
# and 50 ms: nothing waits for a batch but the RPO, and a batch's fixed
# costs (frame, seal, TLS send, the appliance's journal append and
# fdatasync) are paid once per ~250 writes instead of once per ~30: paced
# at ~3,800 IOPS here, card + appliance CPU per write fell by about a third
# (docs/benchmarks.md "Bigger batches"). The inline fast path seals on its
# acking thread, so there they default to 256K and 500 us (sealing 256 KiB
# holds the card ~0.5 ms, inside the split timeout) and batch_bytes may
# not exceed 256K.
# batch_bytes = "4M"
# batch_delay_us = 50000
# When the appliance or the link falls behind, the card moves what it
# receives, in order, into its overflow log (DATA/run/card-overflow.log)
# instead of refusing writes (which sends vdisks to marking); it refuses
# only once the log reaches this size (0 = no overflow log).
# overflow_max = "4G"
# zstd level for batches (1 = fast).
compress_level = 1
# A block the appliance confirmed is sent as a reference for at most this
# long after it was confirmed; then as data again. Retention keeps journal
# segments appended within twice this, so no reference outlives its block.
dedup_horizon_s = 600

[retention]
# Which points in time the appliance keeps (docs/recovery.md "Retention").
# Every PIT younger than keep_all; then the newest PIT of each clock hour up
# to keep_hourly; nothing older (the oldest segments are folded into base
# images and deleted). Locked bookmarks, open images and the replica pin
# their PIT. 0 for max_journal_size = no size limit.
keep_all = "24h"
keep_hourly = "7d"
max_journal_size = 0
interval = "60s"

[console]
# The operator console (`nicsplit console run`; `nicsplit up` starts it):
# REST API under /api/v1 (bearer token: DATA/pki/api.token), Prometheus
# metrics at /metrics and the web dashboard at /. Loopback by default.
listen = "127.0.0.1:10811"

[alerts]
# Alerts (docs/operations.md "Alerts"), shown by `nicsplit status` and
# POSTed by the console to `webhook` when they fire and clear.
# RPO above this is a warning, above twice this critical.
rpo_target = "60s"
# The protection window the journal should hold; "" = [retention] keep_all.
# Once retention has cut the journal, a window below 85% of it is a
# warning, below 75% critical.
history = ""
# With [retention] max_journal_size set: warn when, at the current ingest
# rate, retention will start cutting into the history within this long.
forecast_horizon = "24h"
# URL the console POSTs {"event": "fire" | "clear", "alert", "time"} to
# ("" = none); it checks the alerts every `interval`.
webhook = ""
interval = "2s"

[logs]
# `nicsplit up` has each process log to DATA/run/NAME.log, rotated when it
# would pass max_size, keeping `keep` older files (NAME.log.1 is the newest):
# at most max_size x (keep + 1) per process.
max_size = "16M"
keep = 4

# Bookmark hooks per CG for application-consistent bookmarks (`nicsplit
# bookmark CG NAME --quiesce`): pre runs before the barrier, post after it,
# always; each is killed at timeout seconds. A failed or timed-out pre hook
# still gives a bookmark, marked crash-consistent (docs/operations.md), e.g.
# [hooks.web]
# pre = "virsh domfsfreeze web1"
# post = "virsh domfsthaw web1"
# timeout = 60

# Per-vdisk settings override [host] and [splitter] ones, e.g.
# [vdisks.web1-root]
# filters = ["stats", {name = "delay", write_ms = 1}]
# transport = "net"
'''

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """Bad configuration or data directory (one clear line)."""


DEFAULT_TRANSPORT = "ring"
# [splitter] keys besides transport and appliance: options of the net transport
NET_KEYS = ("tls", "encrypt", "heartbeat_s", "dead_after_s", "connect_timeout_s", "compress", "server_hostname")
SPLITTER_KEYS = ("transport", "appliance") + NET_KEYS


def check_transport(name: Any, where: str, known: Any = None) -> str:
    """``name`` if it is a transport name (and one of ``known``, the registry
    `nicsplit.card.transports.base.TRANSPORTS`, when the caller passes it:
    this layer does not import the card's)."""
    if not isinstance(name, str) or not name or (known is not None and name not in known):
        listed = f" (known: {', '.join(sorted(known))})" if known is not None else ""
        raise ConfigError(f"{where} = {name!r}: unknown transport{listed}")
    return name


def parse_size(value: Any, what: str = "size") -> int:
    """``4096``, ``"64K"``, ``"1M"``, ``"10GiB"`` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"bad {what} {value!r}: use a number of bytes or a K/M/G/T suffix")
        n = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    if n <= 0:
        raise ConfigError(f"bad {what} {value!r}: must be positive")
    return n


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"bad listen address {value!r}: use HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Config(InDataDir):
    data: Path
    raw: dict = field(default_factory=dict)

    @property
    def datastore_dir(self) -> Path:
        return self.layout.datastore

    def host(self, key: str, default: Any) -> Any:
        return self.raw.get("host", {}).get(key, default)

    def datastore(self, key: str, default: Any) -> Any:
        return self.raw.get("datastore", {}).get(key, default)

    def console(self, key: str, default: Any) -> Any:
        return self.raw.get("console", {}).get(key, default)

    def splitter(self, key: str, default: Any) -> Any:
        return self.raw.get("splitter", {}).get(key, default)

    def vdisk_transport(self, name: str, override: str | None = None, known: Any = None) -> str:
        """The transport of vdisk ``name``: ``[vdisks.NAME] transport``, else
        ``override`` (``--transport``), else ``[splitter] transport``, else
        "ring". ConfigError naming the setting for an unknown one (one not
        in ``known``, the transport registry, when given)."""
        per = self.raw.get("vdisks", {}).get(name, {}).get("transport")
        if per is not None:
            return check_transport(per, f"[vdisks.{name}] transport", known)
        if override:
            return check_transport(override, "--transport", known)
        return check_transport(self.splitter("transport", DEFAULT_TRANSPORT), "[splitter] transport", known)

    def transports_in_use(self, vdisks: list[str], override: str | None = None, known: Any = None) -> set[str]:
        return {self.vdisk_transport(v, override, known) for v in vdisks}

    def card_transport(self, vdisks: list[str], override: str | None, known: Any) -> str | None:
        """The one card transport vdisks ``vdisks`` use (a transport whose
        entry in ``known``, the registry `TRANSPORTS`, has a card half), or
        None when none does (net only, or no vdisk). One card serves one
        transport: ConfigError when they use two (ring and nvme-pi), or
        when ``[card] transport`` or ``[host] card.transport``, set
        explicitly, names another than the one they use (docs/operations.md
        "Choosing a transport")."""
        by: dict[str, list[str]] = {}
        for v in vdisks:
            t = self.vdisk_transport(v, override, known)
            if known[t][1]:
                by.setdefault(t, []).append(v)
        if len(by) > 1:
            raise ConfigError("vdisks use two card transports (" + "; ".join(
                f"{t}: {', '.join(sorted(n))}" for t, n in sorted(by.items()))
                + "): one card serves one transport; give them the same one")
        used = next(iter(by), None)
        host_card = self.raw.get("host", {}).get("card") or {}
        for where, set_to in (("[card] transport", self.raw.get("card", {}).get("transport")),
                              ("[host] card.transport", host_card.get("transport") if isinstance(host_card, dict) else None)):
            if set_to is None:
                continue
            check_transport(set_to, where, known)
            if not known[set_to][1]:
                raise ConfigError(f"{where} = {set_to!r}: that transport has no card half")
            if used is not None and set_to != used:
                raise ConfigError(f"{where} = {set_to!r}, but the vdisks use {used!r} ("
                                  + ", ".join(sorted(by[used])) + "): one card serves one transport; "
                                  f"remove {where} (selection picks the card's) or make them agree")
        return used

    def default_card_transport(self, known: Any) -> str:
        """The card's transport when no vdisk picks one: ``[card]
        transport``, else ``[host] card.transport``, else "ring"."""
        host_card = self.raw.get("host", {}).get("card") or {}
        t = self.raw.get("card", {}).get("transport") or (host_card.get("transport") if isinstance(host_card, dict) else None)
        return check_transport(t or DEFAULT_TRANSPORT, "[card] transport", known)

    def net_options(self, appliance: str | None = None) -> dict[str, Any]:
        """The net transport's options (`nicsplit.card.transports.net`):
        ``[splitter]`` keys, the appliance address (``appliance`` given,
        else [splitter] appliance, [card] appliance, [appliance] listen)."""
        sec = self.raw.get("splitter", {})
        addr = (appliance or sec.get("appliance") or self.raw.get("card", {}).get("appliance")
                or self.raw.get("appliance", {}).get("listen", "127.0.0.1:10810"))
        parse_listen(str(addr))
        out: dict[str, Any] = {"data": self.data, "appliance": str(addr)}
        for key in NET_KEYS:
            if key in sec:
                out[key] = sec[key]
        return out

    def vdisk_filters(self, name: str) -> list[Any]:
        per = self.raw.get("vdisks", {}).get(name, {})
        return list(per.get("filters", self.host("filters", ["stats", "split"])))


def data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get(ENV_DATA) or DEFAULT_DATA)


def load(data: Path) -> Config:
    cfg_file = Layout(data).config
    if not cfg_file.exists():
        raise ConfigError(f"{data} is not a nicsplit data directory (no {CONFIG_NAME}); run 'nicsplit init' first")
    try:
        raw = tomllib.loads(cfg_file.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    for section in ("host", "splitter", "datastore", "vdisks", "appliance", "card", "retention", "logs", "console",
                    "alerts"):
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{cfg_file}: [{section}] must be a table")
    for name in raw.get("vdisks", {}):
        try:
            check_name(name, "vdisk")  # the rule the datastore, the card and the appliance apply
        except BadName as e:
            raise ConfigError(f"{cfg_file}: [vdisks.{name}]: {e}") from None
    unknown = set(raw.get("splitter", {})) - set(SPLITTER_KEYS)
    if unknown:
        raise ConfigError(f"{cfg_file}: [splitter]: unknown key(s) {', '.join(sorted(unknown))}")
    cfg = Config(data=data, raw=raw)
    try:
        check_transport(cfg.splitter("transport", DEFAULT_TRANSPORT), "[splitter] transport")
        for name in raw.get("vdisks", {}):
            cfg.vdisk_transport(name)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    return cfg


def write_default(data: Path) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    layout = Layout(data)
    cfg_file = layout.config
    if not cfg_file.exists():
        cfg_file.write_text(DEFAULT_TOML)
    layout.run.mkdir(exist_ok=True)
    return cfg_file
