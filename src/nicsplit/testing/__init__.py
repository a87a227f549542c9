"""Importable helpers for nicsplit's tests (and anyone testing against it):
real processes started and stopped with deadlines, never sleeps."""
