"""The nvme-pi layout (wire/nvme.py) and the CRC-16/T10-DIF guard (wire/crc16.py), sans IO."""

from __future__ import annotations

import random

import pytest

from nicsplit.wire import crc16
from nicsplit.wire import nvme as N


def test_crc16_t10dif_check_value_both_implementations():
    assert crc16.CHECK == 0xD0DB
    assert crc16.crc16_t10dif(b"123456789") == 0xD0DB
    assert crc16.crc16_t10dif_py(b"123456789") == 0xD0DB
    assert crc16.crc16_t10dif_py(b"") == 0
    # continuing a CRC over a split input gives the CRC of the whole
    assert crc16.crc16_t10dif_py(b"6789", crc16.crc16_t10dif_py(b"12345")) == 0xD0DB


def test_the_fast_crc_is_installed_and_agrees_with_the_table(rng):
    assert crc16.FAST, "fastcrc (pinned in pyproject.toml) is not installed: the guard would cost ~300 us a block"
    for n in (0, 1, 2, 511, 4096):
        data = rng.randbytes(n)
        assert crc16.crc16_t10dif(data) == crc16.crc16_t10dif_py(data), n
        assert crc16.crc16_t10dif(memoryview(bytearray(data))) == crc16.crc16_t10dif_py(data)


def test_a_single_flipped_bit_changes_the_guard(rng):
    block = bytearray(rng.randbytes(N.BLOCK))
    g = crc16.crc16_t10dif(block)
    for bit in (0, 7, 8 * 2048 + 3, 8 * N.BLOCK - 1):
        block[bit // 8] ^= 1 << (bit % 8)
        assert crc16.crc16_t10dif(block) != g
        block[bit // 8] ^= 1 << (bit % 8)


def test_sizes_and_lba_format():
    assert N.SQE.size == 64 and N.CQE14.size == 14 and N.CQE_SIZE == 16 and N.PI.size == 8
    assert (N.BLOCK, N.MS, N.EXT) == (4096, 8, 4104)
    assert N.namespace_blocks(1 << 20) == (1 << 20) // 4104 == 255


def test_pi_is_big_endian_guard_app_tag_ref_tag():
    buf = bytearray(8)
    N.pack_pi(buf, 0, 0xD0DB, 7, 0x01020304)
    assert bytes(buf) == b"\xd0\xdb\x00\x07\x01\x02\x03\x04"
    assert N.unpack_pi(buf, 0) == (0xD0DB, 7, 0x01020304)
    with pytest.raises(N.NvmeFormatError):
        N.pack_pi(buf, 0, 0, 1 << 16, 0)


def test_command_round_trip_and_field_offsets():
    c = N.Command(opc=N.Opc.WRITE, cid=0xBEEF, nsid=N.NSID, cg_id=3, length=5000, io_id=(1 << 63) + 5,
                  prp1=2 * N.EXT, cg_seq=42, slba=2, cdw12=1 | N.PRCHK_GUARD | N.FUA, cdw13=100 | (1 << 16),
                  timestamp_ns=1_700_000_000_000_000_000)
    buf = bytearray(128)
    N.pack_command(buf, 64, c)
    assert N.unpack_command(buf, 64) == c
    assert (c.nlb, c.head, c.wflags) == (1, 100, 1)
    e = buf[64:]
    assert e[0] == 0x01 and e[2:4] == b"\xef\xbe" and e[4:8] == b"\x01\x00\x00\x00"  # OPC, CID, NSID
    assert int.from_bytes(e[40:48], "little") == 2  # SLBA in CDW10-11
    cdw12 = int.from_bytes(e[48:52], "little")
    assert cdw12 & 0xFFFF == 1 and (cdw12 >> 26) & 0xF == 0b0100 and cdw12 >> 30 & 1  # NLB, PRINFO, FUA
    with pytest.raises(N.NvmeFormatError):
        N.pack_command(buf, 0, N.Command(1, 1 << 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0))


def test_cdw12_check_wants_the_guard_and_no_pract():
    assert N.check_cdw12(7 | N.PRCHK_GUARD)
    assert N.check_cdw12(N.PRCHK_GUARD | N.FUA)
    assert not N.check_cdw12(7)  # guard not checked
    assert not N.check_cdw12(N.PRCHK_GUARD | N.PRACT)  # the controller would generate the PI
    assert not N.check_cdw12(N.PRCHK_GUARD | (1 << 31))  # LR: not ours
    assert not N.check_cdw12(N.PRCHK_GUARD | (1 << 20))  # DTYPE: no directives


def test_status_word_guard_error_is_sct2_sc82():
    w = N.status_word(N.Status.GUARD_CHECK, 1)
    assert N.split_status(w) == (1, N.SCT_MEDIA, 0x82)
    assert N.split_status(N.status_word(N.Status.SUCCESS, 0)) == (0, 0, 0)
    assert N.split_status(N.status_word(N.Status.INVALID_PI, 0)) == (0, N.SCT_CMD, 0x81)
    assert N.split_status(N.status_word(N.Status.NS_NOT_READY, 1)) == (1, N.SCT_GENERIC, 0x82)
    # DW3 bits 31:16: the status word, bit 16 the phase
    buf = bytearray(16)
    N.pack_completion(buf, 0, N.Completion(0, 5, 1, 9, 1, N.Status.GUARD_CHECK))
    dw3 = int.from_bytes(buf[12:16], "little")
    assert dw3 & 0xFFFF == 9 and (dw3 >> 16) & 1 == 1 and (dw3 >> 17) & 0xFF == 0x82 and (dw3 >> 25) & 7 == 2


def test_phase_tag_flips_on_each_pass_through_the_cq():
    m = 4
    assert [N.phase_of(p, m) for p in range(12)] == [1] * 4 + [0] * 4 + [1] * 4


def test_completion_round_trip_and_the_status_word_is_stored_last():
    cq = bytearray(4 * 16)
    cq16 = memoryview(cq).cast("H")
    n, head, seen = 4, 0, []
    for pos in range(10):  # the card writes 10 entries into a CQ of 4 (the host consumes each at once)
        c = N.Completion(0, sqhd=(pos + 1) % 8, sqid=1, cid=pos, phase=N.phase_of(pos, n), status=pos % 2 and 0x282)
        off = (pos % n) * 16
        # before its status word is stored, the host still sees the stale phase: nothing new
        N.CQE14.pack_into(cq, off, 0, 0, c.sqhd, 1, c.cid)
        assert cq16[(off >> 1) + 7] & 1 != N.phase_of(head, n)
        N.pack_completion(cq, off, c, cq16)
        assert cq16[(off >> 1) + 7] & 1 == N.phase_of(head, n)
        got = N.unpack_completion(cq, (head % n) * 16)
        seen.append(got)
        head += 1
    assert [c.cid for c in seen] == list(range(10))
    assert [c.status for c in seen] == [0, 0x282] * 5
    assert [c.phase for c in seen] == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]


def test_blocks_for():
    assert N.blocks_for(0, 4096) == 1
    assert N.blocks_for(0, 4097) == 2
    assert N.blocks_for(4095, 1) == 1
    assert N.blocks_for(4095, 2) == 2
    assert N.blocks_for(100, 5000) == 2
    assert N.blocks_for(0, 1 << 20) == 256


def test_decoding_random_bytes_never_raises_anything_but_the_format_error(rng: random.Random):
    for _ in range(500):
        buf = rng.randbytes(rng.randrange(0, 80))
        try:
            N.unpack_command(buf, 0)
        except N.NvmeFormatError:
            pass
        try:
            N.unpack_completion(buf, 0)
        except N.NvmeFormatError:
            pass
