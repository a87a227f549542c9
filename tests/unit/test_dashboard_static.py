"""The dashboard's static files: shipped as package data (a wheel carries
them), referenced by the page, and self-contained (no CDN: CI and many
appliances have no internet)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from nicsplit.console.dashboard import STATIC

ROOT = Path(__file__).resolve().parents[2]


def test_every_static_file_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nicsplit.console"]
    files = sorted(p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file())
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f"{f} is not in [tool.setuptools.package-data]"


def test_the_page_loads_only_its_own_files():
    html = (STATIC / "index.html").read_text()
    refs = [r for r in re.findall(r'(?:src|href)="([^"]+)"', html) if r != "data:,"]  # the empty favicon
    assert refs and all(not re.match(r"^[a-z]+:|^//", r) for r in refs), refs
    for r in refs:
        assert (STATIC.parent / r).is_file(), r
    for f in STATIC.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f"{f.name} reaches outside the appliance"
        assert "innerHTML" not in text and "eval(" not in text, f.name  # API data never becomes markup or code
