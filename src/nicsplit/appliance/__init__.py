"""The protection appliance daemon: TLS 1.3 ingest of card batches into
per-CG journals, with distribution, retention and image access on its
timers (those live in `nicsplit.recovery`)."""
