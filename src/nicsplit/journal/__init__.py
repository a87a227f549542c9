"""The per-CG journal: append-only segments of batches and commits, fsync
before ack, recovered by a scan at open."""
