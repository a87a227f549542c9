"""atheris target: the journal readers (`nicsplit.journal`: the scanner, the
segment reader and a read-only open) over a segment file of any bytes
after a valid header — a prefix of records, or JournalError /
JournalCorrupt, nothing else."""

import atexit
import shutil
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from nicsplit.journal.format import JournalError, segment_head
    from nicsplit.journal.reader import SegmentReader
    from nicsplit.journal.scan import JournalScanner
    from nicsplit.journal.writer import Journal

from common import run

WORK = Path(tempfile.mkdtemp(prefix="fuzz-journal-"))
atexit.register(shutil.rmtree, WORK, True)
JD = WORK / "data" / "appliance" / "journal" / "cg1"
JD.mkdir(parents=True)
HEAD = segment_head(1, 0)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    raw = (HEAD if fdp.ConsumeBool() else b"") + fdp.ConsumeBytes(len(data))
    (JD / "00000001.seg").write_bytes(raw)
    try:
        got = list(JournalScanner(JD).scan())
        r = SegmentReader(JD, keyring=None)
        try:
            for _, heads in got:
                for h in heads:
                    try:
                        r.read_record(h.segment, h.pos)
                    except JournalError:
                        pass
        finally:
            r.close()
    except JournalError:
        pass
    for kw in ({}, {"stop_at_damage": True}):
        try:
            with Journal.open(JD, readonly=True, keyring=None, **kw):
                pass
        except JournalError:
            pass


if __name__ == "__main__":
    run(test_one_input)
