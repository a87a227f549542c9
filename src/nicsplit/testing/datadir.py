"""Data directories for tests: ``nicsplit init`` plus configuration edits."""

from __future__ import annotations

import re
from pathlib import Path

from nicsplit.core.config import DEFAULT_TOML
from nicsplit.testing.procs import run_cli


def init_data(path: Path, *, datastore: dict | None = None, vdisks: dict | None = None,
              sections: dict[str, dict] | None = None, **host: object) -> Path:
    """Write a configuration (the documented default with edits) and run
    ``nicsplit init``. Chain validation is on unless the caller says not."""
    text = DEFAULT_TOML
    for section, edits in (("host", {"validate": True, **host}), ("datastore", datastore or {})):
        head = f"[{section}]\n"
        start = text.index(head) + len(head)
        end = text.find("\n[", start)
        end = len(text) if end < 0 else end
        body = text[start:end]
        for key, value in edits.items():
            body, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {_toml(value)}", body, count=1)
            if n == 0:
                body = f"{key} = {_toml(value)}\n" + body
        text = text[:start] + body + text[end:]
    for section, settings in (sections or {}).items():
        head = f"[{section}]\n"
        if head in text:
            start = text.index(head) + len(head)
            end = text.find("\n[", start)
            end = len(text) if end < 0 else end
            body, extra = text[start:end], ""
            for k, v in settings.items():  # replace a documented key, add the others
                body, n = re.subn(rf"(?m)^{k} = .*$", lambda _m, k=k, v=v: f"{k} = {_toml(v)}", body, count=1)
                if n == 0:
                    extra += f"{k} = {_toml(v)}\n"
            text = text[:start] + extra + body + text[end:]
        else:
            text += f"\n{head}" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
    for name, settings in (vdisks or {}).items():
        text += f"\n[vdisks.{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
    path.mkdir(parents=True, exist_ok=True)
    (path / "nicsplit.toml").write_text(text)
    run_cli(path, "init")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def vdisk(data: Path, name: str, size: str, *extra: str) -> None:
    run_cli(data, "vdisk", "create", name, "--size", size, *extra)
