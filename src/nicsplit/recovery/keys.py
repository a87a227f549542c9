"""At-rest keys: which journal segments, sealed images and undo entries use
each key, rotating in a new key and retiring one nothing uses any more.

A key with no segments, image blocks or undo entries (and not active) can
be retired. ``enabled`` is ``[appliance] at_rest_encryption``: rotating a
key while it is off is refused (the appliance would deactivate the key at
its next start).

Example::

    report = key_report(data, enabled=True)   # what `nicsplit appliance keys --json` prints
    rotate_key(data, enabled=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nicsplit.core.layout import Layout
from nicsplit.journal.reader import segment_key_ids
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.replica import undo_key_usage
from nicsplit.storage import atrest
from nicsplit.storage.image import open_image
from nicsplit.storage.sealing import tags_path


def journal_key_use(data: Path) -> tuple[dict[int, dict[str, int]], list[str]]:
    """{key id: {cg: segments}} over every journal, and unreadable headers."""
    use: dict[int, dict[str, int]] = {}
    bad: list[str] = []
    root = Layout(data).journals
    for jd in sorted(root.iterdir()) if root.is_dir() else []:
        if not jd.is_dir():
            continue
        ids, unreadable = segment_key_ids(jd)
        for k, n in ids.items():
            use.setdefault(k, {})[jd.name] = n
        bad += [f"{jd.name}/{name}" for name in unreadable]
    return use, bad


def image_key_use(data: Path) -> dict[int, dict[str, int]]:
    """{key id: {"<cg>/<replicas|base>": blocks or undo entries}} over every
    sealed replica and base image and every replica's undo log."""
    lay = Layout(data)
    use: dict[int, dict[str, int]] = {}
    kr = atrest.keyring_in(lay.appliance)  # opening a sealed image checks its header's keys

    def add(k: int, where: str, n: int) -> None:
        use.setdefault(k, {})[where] = use.get(k, {}).get(where, 0) + n

    for kind, root in (("replicas", lay.replicas), ("base", lay.bases)):
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if not d.is_dir():
                continue
            for p in sorted(d.glob("*.img")):
                if not tags_path(p).exists():
                    continue  # a raw image (written while at-rest encryption was off)
                with open_image(p, p.stat().st_size, kr, writable=False) as img:
                    for k, n in img.key_usage().items():
                        add(k, f"{d.name}/{kind}", n)
            if kind == "replicas":
                for k, n in undo_key_usage(d / "undo.log").items():
                    add(k, f"{d.name}/{kind}", n)
    return use


def key_report(data: Path, enabled: bool) -> dict[str, Any]:
    """The keyring and what uses each key (`appliance keys --json`)."""
    path = Layout(data).keyring
    kr = atrest.Keyring.load(path) if path.exists() else None
    use, bad = journal_key_use(data)
    iuse = image_key_use(data)
    keys = [{"id": k.id, "created": k.created, "active": kr.active == k.id, "segments": sum(use.get(k.id, {}).values()),
             "journals": use.get(k.id, {}), "image_blocks": sum(iuse.get(k.id, {}).values()),
             "images": iuse.get(k.id, {})} for k in (kr.keys() if kr else [])]
    missing = sorted(k for k in set(use) | set(iuse) if k and (kr is None or not kr.has(k)))
    return {"keyring": str(path) if kr else None, "enabled": enabled, "active": kr.active if kr else None,
            "keys": keys, "clear_segments": sum(use.get(0, {}).values()), "missing_keys": missing,
            "unreadable_headers": bad}


def rotate_key(data: Path, enabled: bool) -> tuple[int, int | None]:
    """Add an at-rest key; new journal segments use it from the next segment
    each journal starts (a running appliance re-reads the keyring).
    (new key id, previous active id)."""
    if not enabled:
        raise RecoveryError("[appliance] at_rest_encryption is false: the appliance would deactivate the key at "
                            "its next start; turn it on first")
    return atrest.rotate(Layout(data).keyring)


def retire_key(data: Path, key_id: int) -> None:
    """Remove a key no journal segment, image block or undo entry uses."""
    use, bad = journal_key_use(data)
    if bad:
        raise RecoveryError(f"cannot tell which key {bad[0]} uses (unreadable segment header): not retiring any key")
    in_use = {k: sum(v.values()) for k, v in use.items()}
    for k, v in image_key_use(data).items():  # images re-sealed after a rotation by the appliance
        in_use[k] = in_use.get(k, 0) + sum(v.values())
    atrest.retire(Layout(data).keyring, key_id, in_use)
