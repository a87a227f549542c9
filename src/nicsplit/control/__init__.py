"""Running the system: the supervisor behind ``nicsplit up``."""
