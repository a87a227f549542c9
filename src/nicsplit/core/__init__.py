"""The vocabulary every layer shares: records, configuration, catalogs, data
directory layout, TLS, and small filesystem and process helpers. Imports
nothing else of nicsplit."""
