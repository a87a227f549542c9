"""atheris target: the card↔appliance wire codec (`nicsplit.wire.frames`):
the frame decoder over any bytes in any pieces, the record decoder and
unseal over any body — frames or FrameError, nothing else."""

import atheris

with atheris.instrument_imports():
    from nicsplit.wire import envelope, frames as F

from common import chunks, run

KEY = bytes(range(32))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 2)
    if which == 0:
        dec = F.FrameDecoder(max_body=1 << 16)
        try:
            for c in chunks(fdp, len(data)) + [b""]:
                dec.receive_data(c)
                while dec.next_event() is not F.NEED_DATA:
                    pass
        except F.FrameError:
            pass
    elif which == 1:
        try:
            F.decode_records(fdp.ConsumeBytes(len(data)))
        except F.FrameError:
            pass
    else:
        try:
            envelope.unseal(fdp.ConsumeBytes(len(data)), KEY if fdp.ConsumeBool() else None, b"aad")
        except F.FrameError:
            pass


def seeds() -> list[bytes]:
    """Byte 0 selects the frame decoder; then real frames of every kind."""
    from nicsplit.core.records import Op  # seeds only

    recs = [F.Record(1, 1, 1, Op.WRITE, 0, 0, 5, 0, b"hello"), F.Record(2, 1, 1, Op.TRIM, 0, 0, 4096, 0)]
    head = F.Batch(7, "cg1", 1, 2, 0, 0, b"")
    frames = [F.Hello("card", F.PROTOCOL_VERSION, ("cg1",)), F.HelloAck("app", F.PROTOCOL_VERSION, {"cg1": 0}),
              F.Batch(7, "cg1", 1, 2, 0, 0, envelope.seal(F.encode_records(recs), KEY, F.batch_aad(head))),
              F.Ack(7, "cg1", 2, True, ()), F.Heartbeat(1), F.Error(1, "oops")]
    return [b"\0" * 8 + b"".join(F.encode(f) for f in frames), b"\x01" + b"\0" * 7 + F.encode_records(recs)]


if __name__ == "__main__":
    run(test_one_input, seeds())
