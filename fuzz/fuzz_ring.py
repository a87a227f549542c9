"""atheris target: the ring's entries (`nicsplit.wire.ring`: descriptors,
completions, identity) and the card's overflow-log records
(`nicsplit.card.overflow.decode`) — a value, or RingFormatError /
TornRecord / None (ends inside a record), nothing else."""

import atheris

with atheris.instrument_imports():
    from nicsplit.card import overflow as O
    from nicsplit.wire import ring as R

from common import run


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 3)
    offset = fdp.ConsumeIntInRange(-8, 300)
    buf = fdp.ConsumeBytes(len(data))
    try:
        if which == 0:
            R.unpack_descriptor(buf, offset)
        elif which == 1:
            R.unpack_completion(buf, offset)
        elif which == 2:
            R.unpack_identity(buf)
    except R.RingFormatError:
        pass
    if which == 3:
        pos = 0
        try:
            while (r := O.decode(buf, pos, verify=bool(offset & 1))) is not None:
                nxt = r[1]
                assert nxt > pos, "the overflow decoder did not advance"
                pos = nxt
        except O.TornRecord:
            pass


if __name__ == "__main__":
    run(test_one_input)
