"""The protection appliance: ingest server, per-CG journals (replicas,
recovery and storage backends come later).

* `journal` — append-only segments, commit markers, fsync before ack.
* `durable` — the one file interface the journal writes through.
* `server` — TLS 1.3 mutual-auth ingest of card batches.
* `cli` — ``appliance run``, ``journal dump|replay``, ``pki init``.
* `testing` — power-cut filesystem, appliance process, blocking card client.
"""
