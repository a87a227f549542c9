"""A hand-assembled x86 real-mode MBR boot sector for the image-boot test.

The BIOS loads it at 0000:7C00 and jumps to it with the boot drive in DL.
It reads disk sector 2 (CHS 0/0/2, i.e. LBA 1) with INT 13h into 0000:8000
and writes the NUL-terminated string found there to COM1, then halts. A
failed INT 13h read prints ``NICSPLIT-BOOT-ERROR int13`` instead. So a boot
exercises both the BIOS loading the MBR and a BIOS disk read, each through
whatever serves the disk.

Equivalent assembly (nasm syntax, ``org 0x7c00``)::

    start:  cli
            xor  ax, ax
            mov  ds, ax
            mov  es, ax
            mov  ss, ax
            mov  sp, 0x7c00
            sti
            mov  bx, 0x8000         ; es:bx = buffer
            mov  ax, 0x0201         ; ah=02 read sectors, al=1 sector
            mov  cx, 0x0002         ; ch=cylinder 0, cl=sector 2
            mov  dh, 0              ; head 0; dl = boot drive from the BIOS
            int  0x13
            jc   error
            mov  si, 0x8000
    print:  mov  dx, 0x3f8          ; COM1 data port
            cld
    next:   lodsb
            test al, al
            jz   done
            out  dx, al
            jmp  next
    done:   cli
    halt:   hlt
            jmp  halt
    error:  mov  si, errmsg
            jmp  print
    errmsg: db "NICSPLIT-BOOT-ERROR int13", 10, 0
            times 510-($-$$) db 0
            dw   0xaa55
"""

from __future__ import annotations

SECTOR = 512
LOAD_ADDR = 0x7C00
BUFFER = 0x8000
ERROR_MESSAGE = b"NICSPLIT-BOOT-ERROR int13\n"

# (label or None, machine code, comment). Jump targets are given as labels
# and resolved by `_assemble`: ("rel8", opcode, label) is a short jump,
# ("abs16", opcode, label) an instruction taking the label's address as
# imm16 (`mov si, label`); everything else is literal bytes.
_PROGRAM: list[tuple[str | None, bytes | tuple, str]] = [
    ("start", b"\xfa", "cli"),
    (None, b"\x31\xc0", "xor ax, ax"),
    (None, b"\x8e\xd8", "mov ds, ax"),
    (None, b"\x8e\xc0", "mov es, ax"),
    (None, b"\x8e\xd0", "mov ss, ax"),
    (None, b"\xbc\x00\x7c", "mov sp, 0x7c00"),
    (None, b"\xfb", "sti"),
    (None, b"\xbb\x00\x80", "mov bx, 0x8000        ; es:bx = read buffer"),
    (None, b"\xb8\x01\x02", "mov ax, 0x0201        ; ah=02 read sectors, al=1 sector"),
    (None, b"\xb9\x02\x00", "mov cx, 0x0002        ; ch=cylinder 0, cl=sector 2"),
    (None, b"\xb6\x00", "mov dh, 0             ; head 0 (dl: boot drive, as the BIOS passed it)"),
    (None, b"\xcd\x13", "int 0x13"),
    (None, ("rel8", 0x72, "error"), "jc error"),
    (None, b"\xbe\x00\x80", "mov si, 0x8000"),
    ("print", b"\xba\xf8\x03", "mov dx, 0x3f8         ; COM1 data port"),
    (None, b"\xfc", "cld"),
    ("next", b"\xac", "lodsb                 ; al = [ds:si++]"),
    (None, b"\x84\xc0", "test al, al"),
    (None, ("rel8", 0x74, "done"), "jz done"),
    (None, b"\xee", "out dx, al"),
    (None, ("rel8", 0xEB, "next"), "jmp next"),
    ("done", b"\xfa", "cli"),
    ("halt", b"\xf4", "hlt"),
    (None, ("rel8", 0xEB, "halt"), "jmp halt"),
    ("error", ("abs16", 0xBE, "errmsg"), "mov si, errmsg"),
    (None, ("rel8", 0xEB, "print"), "jmp print"),
    ("errmsg", ERROR_MESSAGE + b"\0", 'db "NICSPLIT-BOOT-ERROR int13", 10, 0'),
]


def _size(code: bytes | tuple) -> int:
    if isinstance(code, bytes):
        return len(code)
    return 2 if code[0] == "rel8" else 3


def _assemble() -> bytes:
    labels: dict[str, int] = {}
    off = 0
    for label, code, _ in _PROGRAM:  # pass 1: label offsets
        if label:
            labels[label] = off
        off += _size(code)
    out = bytearray()
    for _, code, _ in _PROGRAM:  # pass 2: code
        if isinstance(code, bytes):
            out += code
        elif code[0] == "rel8":
            rel = labels[code[2]] - (len(out) + 2)
            assert -128 <= rel <= 127, code
            out += bytes([code[1], rel & 0xFF])
        else:
            out += bytes([code[1]]) + (LOAD_ADDR + labels[code[2]]).to_bytes(2, "little")
    assert len(out) <= SECTOR - 2, len(out)
    return bytes(out) + bytes(SECTOR - 2 - len(out)) + b"\x55\xaa"


def boot_sector() -> bytes:
    """The 512-byte MBR (ends in 0x55 0xAA)."""
    return _assemble()


def message_sector(text: str) -> bytes:
    """Sector 2 (LBA 1): ``text`` as ASCII, NUL-terminated, zero-padded."""
    raw = text.encode("ascii") + b"\0"
    assert len(raw) <= SECTOR, text
    return raw + bytes(SECTOR - len(raw))
