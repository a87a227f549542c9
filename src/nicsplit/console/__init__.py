"""The operator console: one HTTP server for the REST API, the Prometheus
metrics and the web dashboard (`nicsplit console run`, supervised by
``nicsplit up``). It is a client of the other processes' control sockets
and of the data directory, exactly as the CLI is; it holds no state of its
own that a restart could lose."""
