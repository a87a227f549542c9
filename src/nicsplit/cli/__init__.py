"""The command line: every argparse parser and command. Commands are thin
calls into library functions; nothing outside this package imports it."""
