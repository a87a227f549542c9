"""The card as two processes: the **acker** (this module, the process
``nicsplit card run`` starts) and the **pipeline worker** it spawns
(`nicsplit.card.worker`, the `CardProcess` of `nicsplit.card.process` on a
`HandoffEndpoint`).

Theory of operation
===================
The acker owns everything the host attaches to (hidden volume, doorbell,
control socket; `RingAcker`) and the handoff queue (`nicsplit.card.handoff`).
Its loop: take SQ entries, check, ack, copy into the handoff queue, ring the
worker if it sleeps, heartbeat. Nothing else runs on its thread: no batch,
no compression, no seal, no TLS, no collector (automatic gc is off and the
loop makes no per-write objects), so an ack waits only for the scheduler.

Spinning and sleeping on a shared core: the acker runs SCHED_FIFO
(``priority``) on the card's CPUs (``cpus``) and spins ``ack_spin_us``
after its last entry, then sleeps on the doorbell; it does not spin at all
while the worker has left entries unread for more than 100 µs (the worker is
behind and needs the CPU more than the next ack needs a poll; while writes keep
coming it then naps on a short timer instead, staying awake for the host, whose
doorbell would cost it ~12 µs a write). A real-time spinner
would starve anything of normal priority on its core, so the worker runs at
normal priority on ``worker_cpus`` (default: every allowed core, so it
runs where there is room) and the spin is short: a doorbell wake-up of a
real-time task preempts whatever runs on its core at once. While the
handoff queue or the CQ is full the acker cannot progress, and it yields
its core (sleeps 100 µs) instead of spinning. With ``acker_core =
"dedicated"`` the core is the acker's alone (docs/operations.md): it polls
and never sleeps or yields, the worker runs on the other CPUs and its
control-socket thread is moved there (`worker_cpus`, `main`).

The worker: spawned with the handoff memfd and its doorbell eventfd
inherited; it dies with the acker (parent-death signal). If it dies, the
acker reports every write it consumed and did not finish to the lost log
(the host marks and resyncs those regions: acked writes are never silently
lost), frees their payloads and starts a new worker, which goes on from the
first entry the dead one did not read. More than ``worker_restarts_max``
deaths within a minute end the card (the supervisor restarts it).

SIGTERM / SIGINT: the worker is told to stop (it drains, see
`CardProcess._drain`) while the acker keeps acking, so the outcomes the
worker needs still arrive; then the acker closes the endpoint.

stdout: one ready line, ``{"event": "ready", "pid", "worker_pid", "cpus",
"priority", "control", "fast_path": "process"}``, once the worker is ready.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from nicsplit.card.handoff import NAPPING, H, Handoff
from nicsplit.card.lostlog import LostLog
from nicsplit.card.sched import normal_priority, off_core, pin_cpus, quiet_gc, run_off_core, set_priority, to_normal
from nicsplit.card.transports.nvme_acker import NvmeAcker
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_shared import fence
from nicsplit.card.transports.shadow_acker import ShadowAcker
from nicsplit.core.config import ConfigError
from nicsplit.core.placement import DEDICATED

log = logging.getLogger("nicsplit.card")

WORKER_ENV = "NICSPLIT_CARD_WORKER"
# The worker is "behind" when entries stay unread this long. Not at once:
# right after each publish the worker has not read yet (it wakes in tens of
# µs), and yielding then made every QD1 write wait for a doorbell wake-up of
# the acker; not by a count either: a backlog of 256 entries let the acker
# spin through an unpaced QD16 load, which then got a third of the IOPS.
BEHIND_NS = 100_000
# The spin polls SQ_TAIL alone (`RingAcker.wait_entries`) for at most this
# long between two loop rounds (heartbeat, the worker's health, behind).
SPIN_SLICE_NS = 20_000
# A nap while the worker is behind and writes keep coming (`run`): what is
# asked; the timer's wake-up comes on top (a SCHED_FIFO sleep of 2 µs took
# ~15 µs on these VMs, of 20 µs ~40), and ~15 µs is about what a host's
# datastore write, which the wait for the ack overlaps, outlasts.
ACK_NAP_S = 2e-6
_P, _C, _WSTATE, _NAPU, _NAPS = H.PRODUCED // 8, H.CONSUMED // 8, H.WSTATE // 8, H.NAP_UNTIL // 8, H.ACK_NAPS // 8


def config_mapping(cfg: Any) -> dict:
    """A `CardConfig` as the ``[card]`` mapping `CardConfig.from_mapping` reads."""
    m: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in ("data", "pipeline"):
            continue
        v = getattr(cfg, f.name)
        m[f.name] = list(v) if isinstance(v, tuple) else v
    m.update(dataclasses.asdict(cfg.pipeline))
    return m


class Acker:
    def __init__(self, cfg: Any, allowed: tuple[int, ...] = ()) -> None:
        self.cfg = cfg
        self.allowed = allowed  # the CPUs this process could use before it pinned itself
        self.handoff = Handoff.create(cfg.handoff_slots)
        # nvme-pi's acker takes NVMe commands and hands off ring descriptors: the same worker;
        # shadow's also serves the device queue (the real halves: the datastore's volume files)
        acker = {"nvme-pi": NvmeAcker, "shadow": ShadowAcker}.get(cfg.transport, RingAcker)
        opts = dict(cfg.transport_options)
        if cfg.transport == "shadow":
            opts.setdefault("volume_dir", str(cfg.layout.datastore))
            opts.setdefault("match_timeout_ms", cfg.pipeline.outcome_timeout_ms)
        self.ep = acker(cfg.run_dir, handoff=self.handoff, **opts)
        self.lost = LostLog(cfg.layout.card_lost_log)
        self.ep.on_refused = self._refused
        self.proc: subprocess.Popen | None = None
        self.pidfd = -1
        self.stopping = False
        self.deaths: list[float] = []
        self.ready_info: dict | None = None

    def _refused(self, io_id: int, vdisk_id: int, offset: int, length: int, reason: str) -> None:
        self.lost.append(io_id, vdisk_id, offset, length, f"card refused it ({reason})")

    # -- the worker -------------------------------------------------------------------

    def spawn(self) -> None:
        cfg = self.cfg
        wcpus = worker_cpus(cfg, self.allowed, tuple(sorted(os.sched_getaffinity(0))))
        wcfg = dataclasses.replace(cfg, cpus=wcpus, priority=cfg.worker_priority, fast_path="inline",
                                   acker_core="shared")
        spec = {"data": str(cfg.data), "card": config_mapping(wcfg), "handoff_fd": self.handoff.fd,
                "wake_fd": self.ep.wake_fd, "volume": self.ep.volume_path, "uid": self.ep.fake_uid,
                "parent": os.getpid()}
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps(spec)
        self.handoff.set(H.WSTATE, 0)
        self.handoff.set(H.FULL, 0)

        def popen() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "nicsplit.card.worker"], env=env,
                                    pass_fds=(self.handoff.fd, self.ep.wake_fd), stdout=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL)

        # The worker is forked from a short-lived thread at normal priority on the worker's
        # CPUs: a child of the real-time poller would start on its core at SCHED_FIFO (on a
        # dedicated core it would wait there for ever; on a shared one its start-up would
        # hold the core from everything else until it lowers its own priority).
        self.proc = run_off_core(wcpus or self.allowed, popen)
        self.pidfd = os.pidfd_open(self.proc.pid)
        log.info("card: pipeline worker pid %d started", self.proc.pid)

    def worker_gone(self) -> bool:
        """Has the worker exited? Asked through its pidfd without reaping it
        (``Popen.poll`` would reap it here, at the poller's SCHED_FIFO):
        `worker_exited` reaps it at normal priority (sched.to_normal)."""
        return os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def worker_exited(self) -> None:
        """The worker is gone: reclaim what it held; restart it unless stopping."""
        assert self.proc is not None
        with normal_priority():  # reaping at SCHED_FIFO can spin in the kernel (sched.to_normal)
            rc = self.proc.wait()
        os.close(self.pidfd)
        self.pidfd = -1
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        why = ("the card stopped before the appliance held it" if self.stopping
               else "the card's pipeline worker died before shipping it")
        # Stopping: no worker reads on, so what was acked and never read is
        # reported too (the host, stopped already, marks it at its next start).
        n = self.handoff.reclaim(lambda d: self.lost.append(d[5], d[8], d[9], d[4], why), self.ep.set_data_head,
                                 unread=self.stopping)
        if self.stopping:
            if n:
                log.warning("card: %d writes the worker did not finish go to the lost log (host marks)", n)
            return
        log.error("card: pipeline worker pid %d died (status %s); %d writes it held go to the lost log, "
                  "restarting it", self.proc.pid, rc, n)
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < 60] + [now]
        if len(self.deaths) > self.cfg.worker_restarts_max:
            raise RuntimeError(f"the pipeline worker died {len(self.deaths)} times within a minute")
        self.handoff.set(H.RESTARTS, self.handoff.get(H.RESTARTS) + 1)
        self.spawn()
        self.ready_info = None
        self.wait_ready(30.0)

    def wait_ready(self, timeout: float) -> dict:
        """Ack while the worker starts; return its ready line."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pipeline worker was not ready within {timeout:.0f} s")
            self.ep.pump(self.cfg.poll_entries)
            self.ep.heartbeat()
            r, _, _ = select.select([fd], [], [], 0.001)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    with normal_priority():
                        rc = self.proc.wait()
                    raise RuntimeError(f"the pipeline worker exited at start (status {rc})")
                buf += chunk
        self.ready_info = json.loads(buf.split(b"\n", 1)[0])
        return self.ready_info

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        ep, cfg = self.ep, self.cfg
        # A dedicated core polls without sleeping (poll mode, as a DPU's core)
        # and never yields to the worker, which runs elsewhere (worker_cpus).
        dedicated = cfg.acker_core == DEDICATED
        spin_ns = 1 << 62 if dedicated else int(cfg.ack_spin_us * 1000)
        sleep_ms = max(1, int(cfg.sleep_max_ms))
        n_poll = cfg.poll_entries
        now = time.monotonic_ns
        efd = ep.doorbell_fd()
        poller = select.poll()
        poller.register(efd, select.POLLIN)
        poller.register(self.pidfd, select.POLLIN)
        watched = self.pidfd
        idle_since = now()
        check_at = 0
        stop_deadline = 0.0
        hc = self.handoff.c
        busy = empty = 0  # loop time that acked something / that found nothing (spinning)
        # CPU (not wall) time of the doorbell sleeps: what waiting costs on a
        # shared core where a DPU's core would spin (docs/pipeline.md).
        slept = 0
        cpu = time.thread_time_ns
        behind_since = 0  # when the worker last had unread entries with none before (0: it keeps up)
        t = now()
        while True:
            t0 = t
            n = ep.pump(n_poll)
            t = now()
            ep.heartbeat()
            if n:
                busy += t - t0
                idle_since = t
                continue
            empty += t - t0
            if t >= check_at:  # the worker's health, every ms while busy
                check_at = t + 1_000_000
                hc[H.BUSY_NS // 8], hc[H.EMPTY_NS // 8], hc[H.SLEEP_NS // 8] = busy, empty, slept
                if self.proc is not None and self.worker_gone():
                    poller.unregister(watched)
                    self.worker_exited()
                    if self.stopping:
                        return 0
                    watched = self.pidfd
                    poller.register(watched, select.POLLIN)
                    continue
                if self.stop_requested and not self.stopping:
                    self._begin_stop()
                    stop_deadline = time.monotonic() + cfg.drain_timeout_s + 5
                elif self.stopping and time.monotonic() > stop_deadline:
                    log.error("card: worker pid %d did not stop in time: killed", self.proc.pid)
                    self.proc.kill()
            if ep.blocked:  # entries wait but the handoff or the CQ is full: give the core away
                time.sleep(0.0001)
                t = now()
                continue
            if hc[_P] == hc[_C] or (hc[_WSTATE] == NAPPING and t < hc[_NAPU] + BEHIND_NS):
                behind_since = 0  # a napping worker is back by NAP_UNTIL; past it, it is behind as any other
            elif not behind_since:
                behind_since = t
            if t - idle_since < spin_ns:
                if dedicated or not behind_since or t - behind_since < BEHIND_NS:
                    # spin only while the worker keeps up: when it is behind, it needs this core
                    ep.wait_entries(min(idle_since + spin_ns, t + SPIN_SLICE_NS))
                    t1 = now()
                    empty += t1 - t
                    t = t1
                    continue
                # The worker is behind while writes keep coming: give it the
                # core for a nap on a timer, not a sleep on the doorbell. The
                # state stays awake, so a host publishing meanwhile rings
                # nothing (waking a real-time task on another vCPU costs the
                # host 11-13 µs here) and its ack waits at most the nap, which
                # the datastore write it overlaps mostly outlasts.
                hc[_NAPS] += 1
                c0 = cpu()
                time.sleep(ACK_NAP_S)
                slept += cpu() - c0
                t = now()
                continue

            ep.set_sleeping(True)
            fence()  # SLEEPING visible before we re-read the tail (Dekker; wire/ring.py)
            if ep.pending():
                ep.set_sleeping(False)
                continue
            self.handoff.c[H.ACK_SLEEPS // 8] += 1
            c0 = cpu()
            ready = poller.poll(sleep_ms)
            ep.set_sleeping(False)
            woken = False
            try:
                os.eventfd_read(efd)
                woken = True
            except BlockingIOError:
                pass
            ep.count_sleep(woken)
            slept += cpu() - c0
            if ready or self.stop_requested:
                check_at = 0
            t = now()
            idle_since = t - spin_ns  # a timeout wake-up with nothing to do sleeps again at once

    stop_requested = False

    def request_stop(self, *_: object) -> None:
        self.stop_requested = True

    def _begin_stop(self) -> None:
        self.stopping = True
        to_normal()  # stopping: acks wait no more for the scheduler, and the reap must not spin (sched.to_normal)
        if self.proc is not None and not self.worker_gone():
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        to_normal()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ep.close()
        self.lost.close()
        self.handoff.close()
        os.close(self.handoff.fd)


DEDICATED_SWITCH_S = 0.0001  # the GIL's switch interval under a poller that never sleeps


def worker_cpus(cfg: Any, allowed: tuple[int, ...], acker: tuple[int, ...]) -> tuple[int, ...] | None:
    """The pipeline worker's CPUs: ``worker_cpus`` as set; () = every
    allowed CPU (not the acker's inherited set), but the acker's on a
    dedicated core, where a set naming the acker's CPU, an unpinned acker or
    no CPU left is a ConfigError (a real-time poller never yields its core)."""
    if cfg.acker_core != DEDICATED:
        return allowed if cfg.worker_cpus == () else cfg.worker_cpus
    rest = tuple(c for c in allowed if c not in acker)
    if not acker or not rest:
        raise ConfigError(f"[card] acker_core = \"dedicated\" needs the acker pinned to some of the CPUs this card "
                          f"may use and others left for its worker (allowed: {list(allowed)}, acker: {list(acker)})")
    if cfg.worker_cpus == ():
        return rest
    if cfg.worker_cpus is None or set(cfg.worker_cpus) & set(acker):
        raise ConfigError(f"[card] worker_cpus = {cfg.worker_cpus!r} shares the dedicated acker core(s) {list(acker)}")
    return cfg.worker_cpus


def main(cfg: Any) -> int:
    """``nicsplit card run`` with ``fast_path = "process"``."""
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    cpus = pin_cpus(cfg.cpus)
    worker_cpus(cfg, allowed, cpus)  # a dedicated core that cannot be: an error before anything starts
    priority = set_priority(cfg.priority)
    acker = Acker(cfg, allowed)
    if cfg.acker_core == DEDICATED:  # the control socket's thread off the poller's core (see off_core)
        rest = tuple(c for c in allowed if c not in cpus)
        for t in threading.enumerate():
            if t is not threading.main_thread() and t.native_id:
                off_core(rest, t.native_id)
        # The poller never blocks, so the control thread gets the GIL only when the
        # interpreter forces a switch: every 5 ms by default, and a host's hello (a
        # few switches) then outlasts its 50 ms connect timeout.
        sys.setswitchinterval(DEDICATED_SWITCH_S)
    signal.signal(signal.SIGTERM, acker.request_stop)
    signal.signal(signal.SIGINT, acker.request_stop)
    try:
        acker.spawn()
        info = acker.wait_ready(60.0)
        quiet_gc()
        sys.stdout.write(json.dumps({"event": "ready", "pid": os.getpid(), "worker_pid": info.get("pid"),
                                     "control": info.get("control"), "cpus": list(cpus), "priority": priority,
                                     "worker_cpus": info.get("cpus"), "fast_path": "process"}) + "\n")
        sys.stdout.flush()
        return acker.run()
    finally:
        acker.close()
