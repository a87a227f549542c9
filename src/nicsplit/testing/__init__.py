"""Importable helpers for nicsplit's tests (and anyone testing against it):
real processes started and stopped with deadlines, never sleeps.

* `procs` — run the CLI, start host / up / nbdkit processes and wait for
  them by condition; `wait_for` and `call_within` (deadlines on events);
  peer-tool checks; stopping detached image and failover servers.
* `datadir` — a data directory: ``nicsplit init`` with configuration edits.
* `stack` — a protected CG on a running stack: status, PITs, replica in clear.
* `workload` — seeded journal workloads with their ledger (the D1/D2/D3
  oracle), random batch streams and the D5 power-cut check.
* `damage` — a journal damaged on purpose and what the scanner must report.
* `served`, `nbdclient` — an NBD server in a loop thread; libnbd clients.
* `pipeline` — fakes for the card pipeline in-process.
* `echocard` — the demo echo card as a subprocess (two-process transport tests).
* `splitpair` — a transport's splitter and card endpoint in one process; `WriteMaker`.
* `cardproc` — a real `nicsplit card run` for ring tests: its data dir, stats, writes.
* `relayed` — a deployment whose appliance link runs through the fault relay.
* `appliance` — the power-cut filesystem, the appliance process, a card client.
* `console` — ``nicsplit console run``, the console's address and token, curl.
* `soak`, `soakledger`, `soakcheck` — the fault soak (`make soak`, docs/faults.md):
  randomized process faults on one `nicsplit up`, a ledger writer that
  survives them, and the checks after each case.

Tests import from here, never from another test module.
"""
