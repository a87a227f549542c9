"""Image access served by the running appliance, from the block index it
keeps current for distribution (server.py rule 8).

`nicsplit image export` asks the appliance first (``{"cmd": "image-export"}``
on ``DATA/run/appliance.sock``): the journal is already indexed there, so an
image of a CG with GiBs of journal is ready as soon as its NBD listener is
(no scan, no new process). Without a running appliance the CLI starts a
standalone ``image serve`` process instead (images.py), which scans.

The image is the same `ImageServer` either way and is listed in
``DATA/run/images/ID.json`` like a standalone one, with ``"in_appliance":
true``; ``image close`` then asks the appliance (``{"cmd": "image-close"}``)
instead of signalling a pid. Reads run on the appliance's event loop next to
ingest (a RecoverPoint appliance serves image access too); the image pins
its PIT against retention like any open image.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from nicsplit.core import config as cfgmod
from nicsplit.core.cgs import CGError
from nicsplit.core.layout import Layout
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.image import ImageServer
from nicsplit.recovery.images import info_path, overlay_path, url_host, write_info
from nicsplit.recovery.pits import PitError
from nicsplit.recovery.select import Selector, cg_vdisks, resolve_pit

log = logging.getLogger("nicsplit.recovery.image")


class ImageRequestError(RecoveryError):
    """A user error in an image request: one clear line for the CLI."""


class ApplianceImages:
    def __init__(self, data: Path, journal_root: Path) -> None:
        self.data = data
        self.journal_root = journal_root
        self.open: dict[str, Any] = {}  # image id -> ImageServer

    async def export(self, req: dict[str, Any], index: Any) -> dict[str, Any]:
        """Open an image of ``req["cg"]`` at the PIT its selector names."""
        t0 = time.monotonic()
        cg = str(req.get("cg"))
        sel = Selector(at=req.get("at"), seq=req.get("seq"), bookmark=req.get("bookmark"),
                       latest=bool(req.get("latest")))
        try:
            cfg = cfgmod.load(self.data)
            vds = cg_vdisks(cfg, cg)
            pit = resolve_pit(index.pits, cfg.data, cg, sel)
            listen = cfgmod.parse_listen(req.get("listen") or "127.0.0.1:0")
        except (RecoveryError, PitError, CGError, cfgmod.ConfigError) as e:
            raise ImageRequestError(str(e)) from None
        image_id = secrets.token_hex(4)
        writable = bool(req.get("writable"))
        Layout(self.data).images_run.mkdir(parents=True, exist_ok=True)
        srv = ImageServer(self.journal_root / cg, vds, pit.seq, writable=writable, index=index, image_id=image_id,
                          cg=cg, overlay_dir=overlay_path(self.data, image_id) if writable else None,
                          validate=bool(cfg.host("validate", False)))
        srv.pki_dir = Layout(self.data).pki   # NBD over TLS: required beyond loopback
        try:
            host, port = await srv.start(*listen)
        except cfgmod.ConfigError as e:   # TLS setup (nbdpolicy.PolicyError): the caller's one line
            await srv.stop()
            raise ImageRequestError(str(e)) from None
        except BaseException:
            await srv.stop()
            raise
        info = {"id": image_id, "cg": cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "writable": writable,
                "pid": os.getpid(), "in_appliance": True, "address": f"{host}:{port}",
                "exports": srv.urls(url_host(host), port), "started": time.time(),
                "index_seconds": 0.0, "ready_seconds": round(time.monotonic() - t0, 4)}
        write_info(info_path(self.data, image_id), info)
        self.open[image_id] = srv
        log.info("image %s of %s at seq %d ready in %.3f s (appliance index): %s", image_id, cg, pit.seq,
                 info["ready_seconds"], " ".join(info["exports"].values()))
        return info

    async def close(self, image_id: str) -> bool:
        """Stop an image this appliance serves; False if it serves none by that id."""
        srv = self.open.pop(image_id, None)
        if srv is None:
            return False
        await srv.stop()
        info_path(self.data, image_id).unlink(missing_ok=True)
        shutil.rmtree(overlay_path(self.data, image_id), ignore_errors=True)
        log.info("image %s closed", image_id)
        return True

    async def close_all(self) -> None:
        for image_id in list(self.open):
            await self.close(image_id)
