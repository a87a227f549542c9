"""The per-CG journal: append-only segments of batches and commits, fsync
before ack, recovered by a scan at open (docs/journal.md).

* `format` — the one codec of the on-disk format (entries, commits, segment
  header and names, sealed records, carried blocks);
* `writer` — `Journal`: append, commit, fsync, recovery at open, index, trim;
* `scan` — the one entry walk and resync, and the read-only `JournalScanner`;
* `reader` — reading records back (`SegmentReader`, at-rest ciphers).

The files go through `nicsplit.storage.segments.SegmentStore`.
"""
