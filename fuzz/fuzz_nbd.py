"""atheris target: the NBD server codec (`nicsplit.wire.nbd.ServerConnection`)
fed any bytes in any pieces yields events or raises RemoteProtocolError."""

import atheris

with atheris.instrument_imports():
    from nicsplit.wire import nbd as N

from common import chunks, run

EXPORTS = [N.ExportInfo("disk", 1 << 20, description="d"), N.ExportInfo("ro", 4096, readonly=True)]


class Provider:
    def lookup(self, name):
        return EXPORTS[0] if name == "" else next((e for e in EXPORTS if e.name == name), None)

    def list_exports(self):
        return list(EXPORTS)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    conn = N.ServerConnection(Provider(), max_payload=4096, max_option_length=512)
    conn.data_to_send()
    try:
        for c in chunks(fdp, len(data)) + [b""]:
            conn.receive_data(c)
            while (ev := conn.next_event()) is not N.NEED_DATA:
                if isinstance(ev, (N.Disconnect, N.Closed)):
                    return
                if conn.phase == "transmission":
                    conn.reply_ok(getattr(ev, "handle", 0))
            conn.data_to_send()
    except N.RemoteProtocolError:
        pass


def seeds() -> list[bytes]:
    """A client's handshake (flags, then options) and a few requests; byte 0
    picks the cut points the provider consumes first, so they lead."""
    import struct  # seeds only

    def opt(o, data=b""):
        return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data

    def req(cmd, handle, offset, length, data=b""):
        return struct.pack(">IHHQQI", 0x25609513, 0, cmd, handle, offset, length) + data

    go = opt(7, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
    hs = struct.pack(">I", 3) + opt(3) + opt(8) + go
    return [b"\0" * 8 + hs, b"\0" * 8 + hs + req(1, 1, 0, 5, b"hello") + req(0, 2, 0, 512) + req(2, 3, 0, 0)]


if __name__ == "__main__":
    run(test_one_input, seeds())
