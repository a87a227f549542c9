"""Crash test: kill -9 a writer at a random point; every reported write survives.

A child process (this file run as a script) replays a seeded list of ops on
two vdisks and prints the index of each op after it returned. The parent
kills it with SIGKILL once it has seen a random number of reports, reopens
the datastore and checks: every reported op is visible, the op that was in
flight left each sector either old or new, and the extent map is consistent.
Seeded: NICSPLIT_SEED=<int> reproduces a run (the seed is printed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

ES = 8192
VS = 12 * ES  # 11 data extents per volume: runs span several volumes
SIZES = {"a": 40 * ES, "b": 24 * ES + 512}
OPS_PER_ROUND = 600
ROUNDS = 4
SECTOR = 512


def gen_ops(seed: int) -> list[tuple]:
    rng = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(OPS_PER_ROUND):
        name = rng.choice(sorted(SIZES))
        size = SIZES[name]
        off = rng.randrange(0, size - 1)
        if rng.random() < 0.5:
            off -= off % SECTOR
        ln = min(rng.choice([SECTOR, ES, 2 * ES, rng.randrange(1, 3 * ES)]), size - off)
        r = rng.random()
        if r < 0.75:
            ops.append(("w", name, off, ln, rng.randrange(1 << 30)))
        elif r < 0.87:
            ops.append(("t", name, off, ln))
        elif r < 0.95:
            ops.append(("z", name, off, ln, rng.random() < 0.5))
        else:
            ops.append(("s",))
    return ops


def payload(op: tuple) -> bytes:
    return random.Random(op[4]).randbytes(op[3])


def apply(ds, op: tuple) -> None:
    if op[0] == "s":
        ds.sync()
        return
    h = ds.vdisk(op[1])
    if op[0] == "w":
        h.pwrite(op[2], payload(op))
    elif op[0] == "t":
        h.trim(op[2], op[3])
    else:
        h.zero(op[2], op[3], no_hole=op[4])


def child(path: str, seed: int) -> None:
    from nicsplit.host.datastore import Datastore

    ds = Datastore.open(path)
    ds.open_io()
    print("ready", flush=True)
    for i, op in enumerate(gen_ops(seed)):
        apply(ds, op)
        print(i, flush=True)  # only after the op returned
    print("done", flush=True)
    sys.stdin.read()  # wait for the kill; never close cleanly


def _new_image(model: bytearray, op: tuple) -> bytes:
    if op[0] == "w":
        return payload(op)
    return bytes(op[3])


def _check_image(ds, models: dict[str, bytearray]) -> None:
    owners: dict[tuple[int, int], tuple[str, int]] = {}
    for name, m in models.items():
        h = ds.vdisk(name)
        got = h.pread(0, len(m))
        if got != m:
            bad = next(i for i in range(len(m)) if got[i] != m[i])
            raise AssertionError(f"vdisk {name}: byte {bad} is {got[bad]} not {m[bad]}")
        pos = 0
        for ln, flags in h.extents(0, len(m)):
            assert flags in (0, 3)
            if flags == 3:
                assert not any(m[pos : pos + ln]), f"{name}: hole at {pos} but model has data"
            pos += ln
        for i in range(-(-len(m) // ES)):
            p = h.physical(i * ES)
            if p is not None:
                assert p not in owners, f"{name} extent {i} shares {p} with {owners[p]}"
                owners[p] = (name, i)
    assert ds.statistics().extents_allocated == len(owners)


def test_kill9_loses_no_returned_write(tmp_path):
    from nicsplit.host.datastore import Datastore

    seed = int(os.environ.get("NICSPLIT_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"test_datastore_crash: NICSPLIT_SEED={seed}")
    rng = random.Random(seed)
    path = str(tmp_path / "ds")
    ds = Datastore.create(path, volume_size=VS, extent_size=ES)
    for name, size in SIZES.items():
        ds.create_vdisk(name, size)
    models = {name: bytearray(size) for name, size in SIZES.items()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    for rnd in range(ROUNDS):
        round_seed = rng.randrange(1 << 32)
        ops = gen_ops(round_seed)
        kill_after = rng.randrange(0, OPS_PER_ROUND // 2)  # reports to see before the kill
        proc = subprocess.Popen(
            [sys.executable, __file__, "child", path, str(round_seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            assert proc.stdout.readline() == "ready\n", proc.stderr.read()
            last = -1
            while last < kill_after - 1:
                line = proc.stdout.readline()
                assert line and line != "done\n", f"child ended early: {proc.stderr.read()}"
                last = int(line)
            proc.send_signal(signal.SIGKILL)
            for line in proc.stdout:  # reports already in the pipe: those ops returned
                if line != "done\n":
                    last = int(line)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            proc.stdin.close()
        assert proc.returncode == -signal.SIGKILL

        for op in ops[: last + 1]:
            if op[0] != "s":
                models[op[1]][op[2] : op[2] + op[3]] = _new_image(models[op[1]], op)
        ds = Datastore.open(path)
        ds.open_io()
        if last + 1 < len(ops) and ops[last + 1][0] != "s":
            # In flight at the kill: each (absolute) sector is old or new, since
            # a killed write stops at a page boundary; adopt what is there.
            op = ops[last + 1]
            m, new = models[op[1]], _new_image(models[op[1]], op)
            off, ln = op[2], op[3]
            got = ds.vdisk(op[1]).pread(off, ln)
            pos = off
            while pos < off + ln:
                nxt = min((pos // SECTOR + 1) * SECTOR, off + ln)
                g = got[pos - off : nxt - off]
                assert g in (m[pos:nxt], new[pos - off : nxt - off]), (
                    f"round {rnd}: in-flight op {last + 1} {op[:4]} left [{pos}, {nxt}) neither old nor new"
                )
                pos = nxt
            m[off : off + ln] = got
        _check_image(ds, models)
        print(f"round {rnd}: seed {round_seed}, killed after op {last} of {len(ops)}, {ds.statistics()}")
        ds.close()

    ds = Datastore.open(path)
    ds.open_io(compact=True)  # the compacted map says the same
    _check_image(ds, models)
    assert ds.statistics().volumes > 1
    ds.close()


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2], int(sys.argv[3]))
