"""The fault soak: many short randomized fault cases against one running
``nicsplit up``, each followed by recovery and the ledger oracle.

Run it with ``make soak`` (200 cases; ``SOAK_CASES=N``, ``SEED=S``,
``CASE=K`` to rerun one case) or ``python -m nicsplit.testing.soak``.

One deployment (a temp data directory, free ports) serves every case, so a
case takes seconds. A case, from its own seed (``case_seed(SEED, K)``):

1. picks a fault (`FAULTS`): ``kill -9`` or SIGSTOP/SIGCONT of the host, the
   card's acker, the card's pipeline worker, the appliance or the supervisor
   (``up``; then a new ``up`` must clean up after it), or a failpoint
   (`nicsplit.core.failpoints`) armed through the environment of a restarted
   ``up`` (kill or stop at the point, once, counted across restarts);
2. runs the ledger writer (`nicsplit.testing.soakledger`, one write order
   for the whole soak) and, in some cases, fio with crc32c verify on a second
   vdisk, injects the fault a random time in, and ends the writers once
   writes are acknowledged again after it;
3. waits for recovery: every vdisk protected, the journal holding every seq
   the host handed out, the replica at the newest PIT;
4. checks (`check_case`): (a) no acknowledged write lost: production and the
   latest PIT hold all of them (the latest PIT restores to production); (b)
   no phantom write: every journal record of the ledger's vdisk since the
   last case carries only blocks the client sent, where it sent them; (c)
   sampled consistent PITs of the case restore to an exact prefix of the
   write order; (d) the replica equals production at the latest PIT
   (`nicsplit verify`).

A case that fails is reported with its seed and how to rerun it; the soak
goes on (a failure that left the deployment unusable ends it). The summary
(cases, faults by kind, failures, seconds per case) goes to a JSON file and a
Markdown file next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nicsplit.core import failpoints
from nicsplit.core.config import load
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.core.procutil import runs
from nicsplit.testing.procs import UpProcess, wait_for
from nicsplit.testing.soakcheck import check_case, wait_recovered
from nicsplit.testing.soakledger import LedgerWriter, SoakLedger
from nicsplit.testing.stack import cg_data

LEDGER_SIZE = FIO_SIZE = 4 << 20  # both vdisks of cg1
TARGETS = ("host", "card", "worker", "appliance", "up")
# Failpoints the soak arms (docs/faults.md lists them all). The resync point
# is reached only while a vdisk resyncs: its case also kills the worker.
FAILPOINTS = (
    "card.acker.after-ack", "card.worker.after-ship", "card.worker.before-release",
    "appliance.after-append", "appliance.after-fsync", "replica.undo-synced", "replica.image-written",
    "host.split.after-submit", "host.resync.after-submit", "supervisor.between-starts",
)
# (kind, weight): signals are cheap; a failpoint case restarts `up`.
FAULTS = (("kill", 4), ("stop", 3), ("failpoint", 3))
# A bounded journal, as every real deployment has: a case's checks read PITs
# back from the journal, which cost in proportion to its size (unbounded, a
# case's checks grew from 0.5 s to 8 s in ten cases). Retention then trims
# (into base images) under the faults too. A case writes far less than the
# limit, so its own PITs and records are still there when it is checked.
# Retention keeps segments younger than twice the card's dedup horizon.
SECTIONS = {"appliance": {"segment_size": "8M"}, "card": {"dedup_horizon_s": 15},
            "retention": {"max_journal_size": "48M", "interval": "2s"}}


def case_seed(seed: int, case: int) -> int:
    return random.Random(f"{seed}/{case}").randrange(1 << 32)


@dataclass
class Fault:
    kind: str  # kill | stop | failpoint
    target: str  # a process (TARGETS) or a failpoint name
    action: str = ""  # failpoint: kill | stop
    at_s: float = 0.0  # seconds into the writes
    stop_s: float = 0.0  # SIGSTOP: how long
    fio: bool = False
    restart: bool = False  # failpoint: armed in the environment of a restarted `up` (else live, DIR/armed)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}" + (f"={self.action}" if self.action else "")


def pick_fault(rng: random.Random) -> Fault:
    kind = rng.choices([k for k, _ in FAULTS], [w for _, w in FAULTS])[0]
    at = round(rng.uniform(0.2, 1.5), 2)
    if kind == "failpoint":
        f = Fault(kind, rng.choice(FAILPOINTS), rng.choice(("kill", "kill", "stop")), at_s=at,
                  stop_s=round(rng.uniform(0.3, 3.0), 2))
        f.restart = f.target == "supervisor.between-starts" or rng.random() < 0.25
    else:
        f = Fault(kind, rng.choice(TARGETS), at_s=at, stop_s=round(rng.uniform(0.3, 3.0), 2) if kind == "stop" else 0)
    return _with_fio(f, rng)


def _with_fio(f: Fault, rng: random.Random) -> Fault:
    # fio's connection must survive the fault: not with the host or `up` killed
    f.fio = rng.random() < 0.35 and not (f.kind == "kill" and f.target in ("host", "up")) and f.kind != "failpoint"
    return f


def parse_fault(label: str, rng: random.Random) -> Fault:
    """A fault from its label (``kill:host``, ``stop:appliance``,
    ``failpoint:appliance.after-fsync=kill``); timings from ``rng``."""
    kind, _, rest = label.partition(":")
    target, _, action = rest.partition("=")
    if kind not in dict(FAULTS) or (kind != "failpoint" and target not in TARGETS) or \
            (kind == "failpoint" and (target not in FAILPOINTS or action not in ("kill", "stop"))):
        raise ValueError(f"not a soak fault: {label!r}")
    pick_fault(rng)  # the same draws as a random case, then this fault's own
    f = Fault(kind, target, action, at_s=round(rng.uniform(0.2, 1.5), 2), stop_s=round(rng.uniform(0.3, 3.0), 2))
    f.restart = target == "supervisor.between-starts" or rng.random() < 0.25
    return _with_fio(f, rng)


@dataclass
class CaseResult:
    case: int
    seed: int
    fault: str
    ok: bool = False
    seconds: float = 0.0
    fired: bool = True  # a failpoint case: whether the point was reached
    error: str = ""
    notes: dict = field(default_factory=dict)


class Deployment:
    """One ``nicsplit up`` on a temp data directory, restarted as cases need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = cg_data(root, LEDGER_SIZE, ("ledger", "fio"), timeout_us=1000, sections=SECTIONS)
        self.cfg = load(self.data)
        self.fpdir = root / "failpoints"
        self.fpdir.mkdir()
        self.up: UpProcess | None = None
        self.starts = 0

    # -- processes ------------------------------------------------------------------

    def start(self, env: dict[str, str] | None = None) -> None:
        env = {failpoints.DIR_ENV: str(self.fpdir), **(env or {})}  # points can be armed live (DIR/armed)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.starts += 1
            self.up = UpProcess(self.data, log_path=self.root / f"up-{self.starts}.log").start(120)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def children(self) -> dict[str, int]:
        out = {}
        for n in ("appliance", "card", "host", "console"):
            try:
                out[n] = int(Layout(self.data).pid(n).read_text())
            except (OSError, ValueError):
                pass
        return out

    def worker_pid(self) -> int | None:
        r = request(Layout(self.data).card_ctl_sock, {"cmd": "stats"}, 5)
        return None if r is None else (r.get("stats") or {}).get("worker_pid")

    def pid(self, target: str) -> int | None:
        if target == "up":
            return self.up.proc.pid if self.up and self.up.proc else None
        if target == "worker":
            return self.worker_pid()
        return self.children().get(target)

    def wait_children_gone(self, pids: list[int], timeout: float = 60) -> None:
        wait_for(lambda: not any(runs(p, "nicsplit") for p in pids), timeout,
                 f"the children {pids} of a dead supervisor exiting", interval=0.05)

    def stop(self) -> None:
        if self.up is not None:
            kids = list(self.children().values())
            for pid in [self.pid("up"), *kids]:  # a case interrupted mid-SIGSTOP must not hang the stop
                _signal(pid, signal.SIGCONT)
            self.up.stop(90)
            self.wait_children_gone(kids)
            self.up = None

    def kill_up(self) -> None:
        """kill -9 of the supervisor; its children die with it (parent-death
        signal); a new ``up`` starts once they are gone."""
        assert self.up is not None
        kids = list(self.children().values())
        self.up.kill()
        self.wait_children_gone(kids)

    def restart(self, env: dict[str, str] | None = None) -> None:
        self.stop()
        self.start(env)

    def uri(self, export: str) -> str:
        assert self.up is not None
        return self.up.uri(export)

    def alive(self) -> bool:
        return self.up is not None and self.up.proc is not None and self.up.proc.poll() is None


def _fio(dep: Deployment, seed: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["fio", "--name=soak", "--ioengine=nbd", f"--uri={dep.uri('fio')}", "--rw=randwrite", "--bs=4k",
         f"--size={FIO_SIZE}", "--iodepth=4", "--verify=crc32c", "--verify_fatal=1", f"--randseed={seed}",
         "--rate_iops=400"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)


def _signal(pid: int | None, sig: int) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def inject(dep: Deployment, f: Fault, res: CaseResult) -> None:
    """The fault itself (signals), once the writers have run ``f.at_s``."""
    if f.kind == "kill" and f.target == "up":
        dep.kill_up()
        dep.start()
        return
    pid = dep.pid(f.target)
    res.notes["pid"] = pid
    if f.kind == "kill":
        if not _signal(pid, signal.SIGKILL):
            raise AssertionError(f"no {f.target} process to kill")
        if f.target == "worker":
            wait_for(lambda: dep.worker_pid() not in (None, pid), 60, "a new pipeline worker", interval=0.05)
        elif f.target != "up":
            wait_for(lambda: dep.children().get(f.target) not in (None, pid), 60,
                     f"the supervisor restarting the {f.target}", interval=0.05)
    else:
        if not _signal(pid, signal.SIGSTOP):
            raise AssertionError(f"no {f.target} process to stop")
        try:
            time.sleep(f.stop_s)  # the fault's length, not synchronisation
        finally:  # also when the soak itself is stopped meanwhile
            _signal(pid, signal.SIGCONT)


def arm(dep: Deployment, f: Fault) -> dict[str, str]:
    """The environment of a restarted ``up`` with ``f``'s failpoint armed once."""
    return {failpoints.ENV: f"{f.target}=1*{f.action}", failpoints.DIR_ENV: str(dep.fpdir),
            failpoints.SEED_ENV: "0"}


def fired(dep: Deployment, name: str) -> list[int]:
    """Pids of the processes the failpoint fired in (its count files)."""
    out = []
    for p in dep.fpdir.glob(f"{name}.*"):
        try:
            out.append(int(p.read_text().strip() or 0))
        except (OSError, ValueError):
            out.append(0)
    return [p for p in out if p]


def spend(dep: Deployment, name: str) -> None:
    """Use up an armed point that has not fired, so it cannot fire in a
    later case (its count files exist: `nicsplit.core.failpoints`)."""
    try:
        fd = os.open(dep.fpdir / f"{name}.0", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)  # empty: no process fired it
    except FileExistsError:
        pass


def run_failpoint(dep: Deployment, f: Fault, res: CaseResult, writer_started: callable) -> None:
    """Arm the point (live through DIR/armed, or in the environment of a
    restarted ``up``) while the writers run; for ``stop``, SIGCONT the
    stopped process after ``stop_s``; a kill is recovered by the supervisor
    (or, at ``supervisor.between-starts``, by a new ``up``)."""
    for p in dep.fpdir.glob(f"{f.target}.*"):
        p.unlink()
    env = arm(dep, f)
    if f.target == "supervisor.between-starts":
        dep.stop()
        try:
            dep.start(env)
        except (RuntimeError, TimeoutError) as e:  # killed or stopped at the point: the start failed
            res.notes["start"] = str(e).splitlines()[0][:200]
        pids = fired(dep, f.target)
        if f.action == "stop" and pids:
            time.sleep(f.stop_s)  # the fault's length
            _signal(pids[0], signal.SIGCONT)
        if not dep.alive():
            if dep.up is not None:
                dep.up.kill()
            dep.wait_children_gone([p for p in dep.children().values()])
            dep.start()
        writer_started()
        return
    if f.restart:
        dep.restart(env)
        writer_started()
    else:
        writer_started()
        time.sleep(f.at_s)  # a random point in the writes
        arm_live(dep, f"{f.target}=1*{f.action}")
    try:
        _wait_fired(dep, f, res)
    finally:
        arm_live(dep, "")


def arm_live(dep: Deployment, spec: str) -> None:
    """Arm ``spec`` in every running process (they re-read DIR/armed)."""
    tmp = dep.fpdir / "armed.new"
    tmp.write_text(spec)
    tmp.rename(dep.fpdir / failpoints.ARMED_FILE)


def _wait_fired(dep: Deployment, f: Fault, res: CaseResult) -> None:
    if f.target == "host.resync.after-submit":
        time.sleep(f.at_s)  # a random point in the writes
        _signal(dep.pid("card"), signal.SIGKILL)  # writes in flight are marked, then resynced: the point
    try:
        wait_for(lambda: fired(dep, f.target), 10, f"failpoint {f.target} firing", interval=0.05)
    except TimeoutError:
        spend(dep, f.target)
        res.fired = bool(fired(dep, f.target))
        if not res.fired:
            return
    if f.action == "stop":
        time.sleep(f.stop_s)  # the fault's length
        for pid in fired(dep, f.target):
            _signal(pid, signal.SIGCONT)


def run_case(dep: Deployment, ledger: SoakLedger, case: int, seed: int, state: dict,
             label: str | None = None) -> CaseResult:
    rng = random.Random(seed)
    f = pick_fault(rng) if label is None else parse_fault(label, rng)
    res = CaseResult(case, seed, f.label)
    t0 = time.monotonic()
    writer = LedgerWriter(ledger, lambda: dep.uri("ledger"), pace=rng.choice((100.0, 200.0, 400.0)))
    fio = None
    try:
        started = False

        def start_writers() -> None:
            nonlocal started, fio
            if not started:
                started = True
                writer.start()
                if f.fio:
                    fio = _fio(dep, seed, dep.root)

        if f.kind == "failpoint":
            run_failpoint(dep, f, res, start_writers)
        else:
            start_writers()
            time.sleep(f.at_s)  # a random point in the writes: the fault's timing
            inject(dep, f, res)
        n0 = ledger.acked
        wait_for(lambda: ledger.acked >= n0 + 20 or writer.failed, 120, "ledger writes acknowledged after the fault",
                 interval=0.02)
    finally:
        writer.stop.set()
        writer.join(240)
        if fio is not None:
            out, _ = fio.communicate(timeout=300)
            res.notes["fio_rc"] = fio.returncode
            if fio.returncode != 0:
                res.error = f"fio verify failed:\n{out[-3000:]}"
    if writer.is_alive() or writer.failed:
        raise AssertionError(f"the ledger writer did not end cleanly: {writer.errors[-3:]}")
    res.notes["reconnects"] = writer.reconnects
    res.notes["acked"] = ledger.acked
    if not res.error:
        rec_t = time.monotonic()
        wait_recovered(dep.cfg, "cg1", 180)
        res.notes["recovery_s"] = round(time.monotonic() - rec_t, 2)
        chk_t = time.monotonic()
        res.notes.update(check_case(dep.cfg, "cg1", dep, ledger, state, rng))
        res.notes["check_s"] = round(time.monotonic() - chk_t, 2)
        res.ok = True
    res.seconds = round(time.monotonic() - t0, 2)
    return res


def summarize(results: list[CaseResult], seed: int, started: float) -> dict:
    kinds = Counter(r.fault.split("=")[0] for r in results)
    by_class = Counter(r.fault.split(":")[0] for r in results)
    fails = [asdict(r) for r in results if not r.ok]
    secs = sorted(r.seconds for r in results) or [0.0]
    return {"seed": seed, "cases": len(results), "passed": sum(r.ok for r in results), "failed": len(fails),
            "faults_by_class": dict(by_class), "faults_by_kind": dict(sorted(kinds.items())),
            "failpoints_not_reached": [r.fault for r in results if not r.fired],
            "seconds_total": round(time.monotonic() - started, 1), "seconds_per_case_median": secs[len(secs) // 2],
            "failures": fails, "results": [asdict(r) for r in results]}


def markdown(s: dict) -> str:
    lines = [f"# Fault soak, seed {s['seed']}", "",
             f"{s['cases']} cases, {s['passed']} passed, {s['failed']} failed; {s['seconds_total']} s "
             f"(median {s['seconds_per_case_median']} s per case).", "", "| fault | cases |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["faults_by_kind"].items()]
    if s["failpoints_not_reached"]:
        lines += ["", f"Failpoints armed but not reached: {', '.join(s['failpoints_not_reached'])}"]
    if s["failures"]:
        lines += ["", "## Failures", ""]
        for f in s["failures"]:
            lines += [f"- case {f['case']} ({f['fault']}): rerun with `make soak SEED={s['seed']} CASE={f['case']}`",
                      "", "```", f["error"][-2000:], "```"]
    return "\n".join(lines) + "\n"


def run_soak(cases: int, seed: int, out: Path, only: int | None = None, workdir: Path | None = None,
             log=print, plan: list[str] | None = None) -> dict:
    """``cases`` cases of ``seed`` (or case ``only``); ``plan`` names the
    fault of each case instead of drawing it (the quick subset in make test)."""
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="nicsplit-soak-", dir=workdir))
    dep = Deployment(root)
    ledger = SoakLedger(LEDGER_SIZE, seed)
    state: dict = {"checked_seq": 0, "last_latest": 0}
    results: list[CaseResult] = []
    todo = [only] if only is not None else list(range(len(plan) if plan else cases))
    log(f"soak: seed {seed}, {len(todo)} case(s), data {dep.data}; rerun one case: make soak SEED={seed} CASE=K")
    try:
        dep.start()
        for k in todo:
            cs = case_seed(seed, k)
            t0 = time.monotonic()
            try:
                r = run_case(dep, ledger, k, cs, state, plan[k] if plan else None)
            except Exception as e:
                r = CaseResult(k, cs, plan[k] if plan else pick_fault(random.Random(cs)).label, False,
                               round(time.monotonic() - t0, 2), error=f"{e}\n{traceback.format_exc()[-3000:]}")
                r.notes["log"] = dep.up.log()[-6000:] if dep.up else ""
            results.append(r)
            status = "ok" if r.ok else "FAILED"
            log(f"case {k} seed {cs} {r.fault}: {status} in {r.seconds}s {json.dumps({k: v for k, v in r.notes.items() if k != 'log'}, default=str)[:300]}"
                + ("" if r.ok else f"\n  rerun: make soak SEED={seed} CASE={k}\n  {r.error[:1500]}"))
            if not r.ok and not dep.alive():
                try:  # the deployment itself is down: start it again and go on
                    dep.wait_children_gone(list(dep.children().values()))
                    dep.start()
                except Exception as e:
                    log(f"soak: cannot restart the deployment ({e}); stopping")
                    break
    finally:
        try:
            dep.stop()
        except Exception as e:  # report, then make sure nothing is left running
            log(f"soak: stopping the deployment: {e}")
            if dep.up is not None:
                dep.up.kill()
        summary = summarize(results, seed, started)
        summary["data"] = str(dep.data)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1, default=str))
        out.with_suffix(".md").write_text(markdown(summary))
        log(f"soak: {summary['passed']}/{summary['cases']} passed; faults {summary['faults_by_kind']}; "
            f"summary in {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nicsplit.testing.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--case", type=int, default=None, help="run only this case of the seed")
    ap.add_argument("--out", type=Path, default=Path("soak-results.json"))
    ap.add_argument("--workdir", type=Path, default=None, help="where the temp data directory goes")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the deployment on the way out
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 32)
    s = run_soak(a.cases, seed, a.out, a.case, a.workdir, log=lambda m: print(m, flush=True))
    return 0 if s["failed"] == 0 and s["cases"] == (1 if a.case is not None else a.cases) else 1


if __name__ == "__main__":
    sys.exit(main())
