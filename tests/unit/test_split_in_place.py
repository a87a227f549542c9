"""Large writes received in place in the card's ring (issue 9): a real host
(`HostServer`, NBD over TCP, chain, datastore), a real ring and a small
card loop in the test (`RingCard`), and a client speaking NBD by hand so it
can stop in the middle of a payload.

- a 1 MiB write lands in a ring reservation and is published in place:
  the card and the datastore get the client's bytes;
- a client that goes away mid-payload leaves nothing in the ring: the
  reservation is dropped, the card never sees it, its space is reused;
- a refused write (past the end) lends nothing and gets its NBD error;
  a failure above the splitter drops the reservation, one below it comes
  after the publish; both reply EIO and the connection lives on;
- a full ring lends nothing: the write takes the copy path (and marks,
  the card being full), the client's write still succeeds;
- a filter above the splitter that does not pass the payload through
  turns lending off for its chain.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.host.chain import Filter, VdiskView, build_chain, load_filter_class
from nicsplit.host.datastore import Datastore
from nicsplit.host.server import HostServer
from nicsplit.testing.inproc import RingCard, until
from nicsplit.wire import nbd
from nicsplit.wire import ring as R

MIB = 1 << 20
SIZE = 16 * MIB


class Client:
    """NBD by hand over an asyncio stream (simple replies only)."""

    def __init__(self, reader, writer, codec) -> None:
        self.r, self.w, self.c = reader, writer, codec
        self._handle = 0

    @classmethod
    async def open(cls, port: int, export: str) -> "Client":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = nbd.ClientConnection(export)
        self = cls(reader, writer, c)
        while True:
            ev = c.next_event()
            if isinstance(ev, nbd.ExportReady):
                return self
            writer.write(c.data_to_send())
            if ev is nbd.NEED_DATA:
                c.receive_data(await reader.read(65536))

    async def _reply(self) -> nbd.Reply:
        while True:
            ev = self.c.next_event()
            if ev is not nbd.NEED_DATA:
                return ev
            self.c.receive_data(await self.r.read(1 << 20))

    async def write(self, offset: int, data: bytes) -> int:
        self._handle += 1
        self.w.write(self.c.request(nbd.NBD_CMD_WRITE, self._handle, offset, len(data)) + data)
        rep = await self._reply()
        assert rep.handle == self._handle
        return rep.error

    async def read(self, offset: int, length: int) -> bytes:
        self._handle += 1
        self.w.write(self.c.request(nbd.NBD_CMD_READ, self._handle, offset, length))
        rep = await self._reply()
        assert rep.error == 0
        return rep.data

    async def close(self) -> None:
        self.w.close()


async def served(tmp_path: Path, filters=None, card_size: int = 16 * MIB):
    raw = {"host": {"validate": True, "resync_mib_s": 0, "tls": "off", "card": {"retry_s": 0.01}}}
    if filters is not None:
        raw["host"]["filters"] = filters
    cfg = Config(data=tmp_path, raw=raw)
    CGCatalog(tmp_path).create("cg1")
    ds = Datastore.create(cfg.datastore_dir, volume_size=64 * MIB)
    ds.open_io()
    ds.create_vdisk("a", SIZE, extra={"cg": "cg1"})
    host = HostServer(cfg, ds)
    card = RingCard(host.cfg.layout.run, data_size=card_size).start()
    addrs = await host.start(("127.0.0.1", 0), None)
    port = int(addrs[0].rsplit(":", 1)[1])
    return host, ds, card, port


async def stop(host, ds, card) -> None:
    await card.kill()
    await host.stop()
    ds.close()


def ring_of(host):
    return host.context.card.get()


def test_a_large_write_is_published_in_place(tmp_path, rng):
    async def main():
        host, ds, card, port = await served(tmp_path)
        try:
            c = await Client.open(port, "a")
            payload = rng.randbytes(MIB)
            assert await c.write(2 * MIB, payload) == 0
            await until(lambda: any(w.length == MIB for w in card.writes), what="the card took the write")
            (w,) = [w for w in card.writes if w.length == MIB]
            assert w.data == payload and w.voffset == 2 * MIB
            assert await c.read(2 * MIB, MIB) == payload
            st = ring_of(host).statistics()
            assert (st.reserved, st.in_place, st.moved, st.dropped, st.held) == (1, 1, 0, 0, 0), st
            small = rng.randbytes(4096)  # below RESERVE_MIN: copied, as before
            assert await c.write(0, small) == 0 and await c.read(0, 4096) == small
            assert ring_of(host).statistics().reserved == 1
            await c.close()
        finally:
            await stop(host, ds, card)

    asyncio.run(main())


def test_a_client_gone_mid_payload_leaves_nothing_in_the_ring(tmp_path, rng):
    async def main():
        host, ds, card, port = await served(tmp_path)
        try:
            c = await Client.open(port, "a")
            assert await c.write(0, rng.randbytes(MIB)) == 0  # attaches the card; in place
            t = ring_of(host)
            await until(lambda: len(card.writes) == 1)
            tail0 = t._ctr[R.Counter.DATA_TAIL]
            seen = len(card.writes)
            c.w.write(c.c.request(nbd.NBD_CMD_WRITE, 99, 4 * MIB, MIB) + rng.randbytes(300 * 1024))
            await c.w.drain()
            await until(lambda: t.statistics().reserved == 2, what="the payload being received in place")
            c.w.transport.abort()  # gone, 300 KiB into the payload
            await until(lambda: t.statistics().dropped == 1, what="the reservation dropped")
            st = t.statistics()
            assert st.held == 0 and st.submitted == 1 and t._ctr[R.Counter.DATA_TAIL] == tail0
            assert len(card.writes) == seen  # the card never saw it
            c2 = await Client.open(port, "a")
            assert await c2.read(4 * MIB, MIB) == bytes(MIB)  # nothing of it reached the datastore
            payload = rng.randbytes(MIB)
            assert await c2.write(4 * MIB, payload) == 0
            # its space was given back: the next payload starts where the dropped one did
            assert t._ctr[R.Counter.DATA_TAIL] == tail0 + MIB
            await until(lambda: len(card.writes) == seen + 1)
            assert card.writes[-1].data == payload and t.statistics().in_place == 2
            await c2.close()
        finally:
            await stop(host, ds, card)

    asyncio.run(main())


def test_refused_and_failed_writes_keep_their_nbd_errors_and_lend_nothing_lasting(tmp_path, rng):
    trigger = tmp_path / "fail-above"
    filters = ["stats", {"name": "error", "verbs": ["pwrite"], "errno": "EIO", "trigger": str(trigger)}, "split",
               {"name": "error", "verbs": ["pwrite"], "errno": "ENOSPC", "trigger": str(tmp_path / "fail-below")}]

    async def main():
        host, ds, card, port = await served(tmp_path, filters)
        try:
            c = await Client.open(port, "a")
            assert await c.write(0, rng.randbytes(MIB)) == 0
            t = ring_of(host)
            # past the end: refused by the codec, payload consumed, nothing lent
            assert await c.write(SIZE - 4096, rng.randbytes(MIB)) == nbd.NBD_ENOSPC
            assert t.statistics().reserved == 1
            trigger.touch()  # EIO above the splitter: the reservation is never published
            assert await c.write(MIB, rng.randbytes(MIB)) == nbd.NBD_EIO
            st = t.statistics()
            assert (st.reserved, st.dropped, st.submitted, st.held) == (2, 1, 1, 0), st
            trigger.unlink()
            (tmp_path / "fail-below").touch()  # below: published, then the datastore write fails
            assert await c.write(MIB, rng.randbytes(MIB)) == nbd.errno_to_nbd(errno.ENOSPC)
            await until(lambda: any(o.status != 0 for o in card.outcomes), what="the FAILED outcome")
            st = t.statistics()
            assert (st.reserved, st.in_place, st.dropped, st.held) == (3, 2, 1, 0), st
            (tmp_path / "fail-below").unlink()
            payload = rng.randbytes(MIB)
            assert await c.write(MIB, payload) == 0 and await c.read(MIB, MIB) == payload
            await c.close()
        finally:
            await stop(host, ds, card)

    asyncio.run(main())


def test_a_full_ring_lends_nothing_and_the_write_still_succeeds(tmp_path, rng):
    async def main():
        host, ds, card, port = await served(tmp_path, card_size=2 * MIB)
        card.durable = False  # the card keeps every payload: the ring fills
        try:
            c = await Client.open(port, "a")
            payloads = [rng.randbytes(MIB) for _ in range(3)]
            for i, p in enumerate(payloads):
                assert await c.write(i * MIB, p) == 0
            t = ring_of(host)
            st = t.statistics()
            assert st.reserved == 2 and st.in_place == 2 and st.no_room == 1 and st.held == 0, st
            split = host.chain("a").filter("split")
            assert split.marked_count == 1 and split.state == "marking"  # the card is full: marked
            for i, p in enumerate(payloads):
                assert await c.read(i * MIB, MIB) == p
            await c.close()
        finally:
            await stop(host, ds, card)

    asyncio.run(main())


class _Rewriter(Filter):
    """A filter that hands something else down (say, it encrypts)."""
    name = "rewriter"

    async def pwrite(self, next, offset, data, flags):
        await next.pwrite(offset, bytes(data), flags)


class _Lender(Filter):
    name = "lender"

    def reserve(self, offset, length, flags):
        return "lent"


@pytest.mark.parametrize("above, lends", [([], True), (["stats"], True), (["delay"], True), (["rewriter"], False),
                                          (["stats", "rewriter"], False)])
def test_only_a_chain_that_passes_the_payload_through_lends(above, lends):
    classes = {"rewriter": _Rewriter, "lender": _Lender}
    view = VdiskView("v", 1, "u", MIB, None, False, {})

    class Plugin:
        async def pwrite(self, offset, data, flags): ...
        pread = zero = trim = flush = extents = pwrite

    ch = build_chain(view, above + ["lender"], Plugin(), resolve=lambda n: classes.get(n) or load_filter_class(n))
    assert (ch.reserve is not None and ch.reserve(0, MIB, 0) == "lent") == lends


def test_a_card_lost_mid_payload_still_lands_the_write_and_marks_it(tmp_path, rng):
    """The card goes away while a payload is being received into its ring:
    the host's mapping stays valid under the lent view, the write reaches
    the datastore intact, its region is marked, the lease is released."""
    async def main():
        host, ds, card, port = await served(tmp_path)
        try:
            c = await Client.open(port, "a")
            assert await c.write(0, rng.randbytes(MIB)) == 0
            t = ring_of(host)
            payload = rng.randbytes(MIB)
            c.w.write(c.c.request(nbd.NBD_CMD_WRITE, 7, 3 * MIB, MIB) + payload[:400 * 1024])
            await c.w.drain()
            await until(lambda: t.statistics().reserved == 2, what="the payload being received in place")
            await card.kill()  # the card closes and unlinks its hidden volume
            c.w.write(payload[400 * 1024:])
            rep = await c._reply()
            assert rep.handle == 7 and rep.error == 0  # production first (P4)
            assert await c.read(3 * MIB, MIB) == payload
            split = host.chain("a").filter("split")
            assert split.state == "marking" and split.dmap.dirty_bytes() >= MIB
            st = t.statistics()
            assert st.held == 0 and st.in_place == 1, st
            await c.close()
        finally:
            await host.stop()
            ds.close()

    asyncio.run(main())
