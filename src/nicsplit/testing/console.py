"""The operator console in tests: ``nicsplit console run`` as a child, where
a console started by ``nicsplit up`` listens, and HTTP through curl (a real
client nobody here wrote)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from nicsplit.core.layout import Layout
from nicsplit.testing.procs import ReadyProcess, wait_for

__all__ = ["ConsoleProcess", "console_base", "api_token", "curl", "curl_json"]


class ConsoleProcess(ReadyProcess):
    """``nicsplit console run`` on a free local port unless --listen is given."""

    what = "console"

    def argv(self) -> list[str]:
        return self.listening_cmd("console", "run")

    @property
    def base(self) -> str:
        return f"http://{self.ready['address']}"


def console_base(data: Path, timeout: float = 60) -> str:
    """``http://HOST:PORT`` of the running console (its ``run/console.json``)."""
    info = Layout(data).console_info

    def read() -> str | None:
        try:
            return json.loads(info.read_text()).get("address")
        except (OSError, ValueError):
            return None

    return f"http://{wait_for(read, timeout, f'the console to write {info}', interval=0.1)}"


def api_token(data: Path) -> str:
    return Layout(data).api_token.read_text().strip()


def curl(url: str, *args: str, token: str | None = None, timeout: float = 60) -> tuple[int, str, dict[str, str]]:
    """``(status, body, headers)`` of one request by curl; ``args`` go to
    curl as they are (``-X``, ``-d``...)."""
    auth = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
    p = subprocess.run(["curl", "-sS", "-D", "-", "--max-time", str(timeout), *auth, *args, url],
                       capture_output=True, timeout=timeout + 10)  # bytes: text mode would turn CRLF into LF
    if p.returncode != 0:
        raise AssertionError(f"curl {url} failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()}")
    head, _, raw = p.stdout.partition(b"\r\n\r\n")
    body = raw.decode(errors="replace")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, body, headers


def curl_json(url: str, *args: str, token: str | None = None, expect: int = 200) -> dict:
    status, body, _ = curl(url, *args, token=token)
    assert status == expect, f"{url}: HTTP {status}: {body}"
    return json.loads(body)
