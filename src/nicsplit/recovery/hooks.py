"""Bookmark hooks: application-consistent bookmarks (``bookmark --quiesce``).

A *pre* command (quiesce: ``virsh domfsfreeze VM``, qemu-guest-agent's
``guest-fsfreeze-freeze``, a database's flush-and-lock) runs before the
barrier and a *post* command (thaw) after it. Rules:

1. Each command runs through the shell in a session of its own, with
   ``NICSPLIT_CG`` and ``NICSPLIT_HOOK`` (pre / post) in its environment,
   and has a hard timeout: past it the whole process group is killed
   (SIGKILL), so a hung ``virsh`` or a ``sleep`` it started cannot hold
   the bookmark. Its output goes to a temp file, never a pipe a surviving
   grandchild could keep open (a hook that exits may leave a helper
   running on purpose, e.g. a database session holding a lock that the
   post hook releases).
2. A pre command that fails or times out does not stop the bookmark: the
   barrier is taken anyway and the bookmark is *crash-consistent* (as
   without hooks), with a note saying why.
3. The post command always runs once a pre command was started: after
   success, failure, timeout, or an error of the barrier itself (a freeze
   that timed out may still have frozen part of the guest).
4. The bookmark is *application-consistent* only when the pre command
   exited 0 before the barrier. A failing post command does not change
   that (the application was quiesced at the barrier), but it is reported
   loudly: the application may still be frozen.

Configured per CG in ``nicsplit.toml``::

    [hooks.web]
    pre = "virsh domfsfreeze web1"
    post = "virsh domfsthaw web1"
    timeout = 10        # seconds, for each command (default 60)

Example::

    hooks = resolve_hooks(cfg.raw, "web")          # from [hooks.web]
    res = quiesced(hooks, "web", lambda: barrier(data, "web"))
    res.consistency                                # "application" or "crash"
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from nicsplit.recovery.errors import RecoveryError

__all__ = ["Hooks", "HookRun", "Quiesced", "DEFAULT_TIMEOUT", "resolve_hooks", "run_hook", "quiesced",
           "APPLICATION", "CRASH"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0
APPLICATION = "application"
CRASH = "crash"
# The tail of a hook's output kept for its message: its last line says why.
_TAIL = 4096


@dataclass(frozen=True, slots=True)
class Hooks:
    pre: str | None
    post: str | None
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class HookRun:
    """What one hook command did."""
    what: str            # "pre" or "post"
    command: str
    ok: bool
    seconds: float
    exit: int | None     # None: killed at its timeout
    message: str         # one line: "pre hook timed out after 2 s", "post hook failed (exit 3): ..."

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "ok": self.ok, "seconds": round(self.seconds, 3), "exit": self.exit,
                "message": self.message}


@dataclass(slots=True)
class Quiesced:
    """The result of `quiesced`: the action's value and what the hooks did."""
    value: Any = None
    pre: HookRun | None = None
    post: HookRun | None = None
    consistency: str = CRASH
    notes: list[str] = field(default_factory=list)  # why crash-consistent; a failed thaw

    def hooks_json(self) -> dict[str, Any]:
        return {k: r.to_json() for k, r in (("pre", self.pre), ("post", self.post)) if r is not None}


def resolve_hooks(raw: dict, cg: str, *, pre: str | None = None, post: str | None = None,
                  timeout: float | None = None, configured: bool = False) -> Hooks | None:
    """The hooks for a bookmark of ``cg``. ``configured`` (``--quiesce``
    without a command): the ``[hooks.CG]`` pair (``post`` may replace its
    post command); else the explicit ``pre`` / ``post`` commands alone.
    ``timeout`` overrides the configured one. None: no hooks at all."""
    table = raw.get("hooks", {})
    if not isinstance(table, dict):
        raise RecoveryError("[hooks] in nicsplit.toml must be a table of [hooks.CG] tables")
    mine = table.get(cg, {})
    if not isinstance(mine, dict):
        raise RecoveryError(f"[hooks.{cg}] in nicsplit.toml must be a table (pre, post, timeout)")
    unknown = set(mine) - {"pre", "post", "timeout"}
    if unknown:
        raise RecoveryError(f"[hooks.{cg}] in nicsplit.toml: unknown key(s) {', '.join(sorted(unknown))} "
                            "(use pre, post, timeout)")
    for k in ("pre", "post"):
        if k in mine and (not isinstance(mine[k], str) or not mine[k].strip()):
            raise RecoveryError(f"[hooks.{cg}] {k} must be a non-empty shell command string")
    t = mine.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise RecoveryError(f"[hooks.{cg}] timeout = {t!r}: must be a number of seconds > 0")
    if timeout is not None and timeout <= 0:
        raise RecoveryError(f"hook timeout {timeout:g}: must be > 0 seconds")
    t = float(timeout if timeout is not None else t)
    if configured:
        if "pre" not in mine:
            raise RecoveryError(f"--quiesce without a command needs a configured pre hook: add [hooks.{cg}] with "
                                "pre = \"...\" and post = \"...\" to nicsplit.toml, or give --quiesce CMD")
        return Hooks(mine["pre"], post if post is not None else mine.get("post"), t)
    if pre is None and post is None:
        return None
    return Hooks(pre, post, t)  # explicit commands: only those, never half of a configured pair


def _tail(f: Any) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL))
    lines = f.read().decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def run_hook(what: str, command: str, cg: str, timeout: float) -> HookRun:
    """Run one hook command (rule 1); never raises for the command's own
    failure or timeout: the `HookRun` says what happened."""
    env = {**os.environ, "NICSPLIT_CG": cg, "NICSPLIT_HOOK": what}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            p = subprocess.Popen(command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True)
        except OSError as e:
            return HookRun(what, command, False, time.monotonic() - t0, None, f"{what} hook could not start: {e}")
        try:
            rc: int | None = p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
            # Whatever it started in its session goes too (a hung virsh under
            # the shell). A hook that exits keeps its background helpers: a
            # pre hook may hold a lock session open for the post hook to end.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        seconds = time.monotonic() - t0
        if rc is None:
            return HookRun(what, command, False, seconds, None, f"{what} hook timed out after {timeout:g} s")
        if rc != 0:
            tail = _tail(out)
            return HookRun(what, command, False, seconds, rc,
                           f"{what} hook failed (exit {rc})" + (f": {tail}" if tail else ""))
        return HookRun(what, command, True, seconds, 0, f"{what} hook ran in {seconds:.2f} s")


def quiesced(hooks: Hooks, cg: str, action: Callable[[], T]) -> Quiesced:
    """``pre``, ``action()``, ``post`` by the rules of the module docstring;
    an exception of ``action`` propagates after ``post`` ran."""
    res = Quiesced()
    if hooks.pre:
        res.pre = run_hook("pre", hooks.pre, cg, hooks.timeout)
        if not res.pre.ok:
            res.notes.append(res.pre.message)
    try:
        res.value = action()
    finally:
        if hooks.post:
            res.post = run_hook("post", hooks.post, cg, hooks.timeout)
            if not res.post.ok:
                res.notes.append(res.post.message + ": the application may still be quiesced, thaw it by hand")
    if hooks.pre and res.pre is not None and res.pre.ok:
        res.consistency = APPLICATION
    elif not hooks.pre:
        res.notes.insert(0, "no pre hook ran")
    return res
