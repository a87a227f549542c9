"""Built-in filters. Each module holds one filter; they register through the
``nicsplit.filters`` entry-point group (see pyproject.toml)."""
