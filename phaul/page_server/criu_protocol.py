"""Codec for CRIU's page-server protocol (criu/page-xfer.c), checked against CRIU v4.2.

Every command is a fixed 32-byte little-endian header, ``struct page_server_iov``::

    u32 cmd; (4 bytes padding) u64 nr_pages; u64 vaddr; u64 dst_id;

``cmd`` holds the command in its low 16 bits and, for ``PS_IOV_ADD_F``, the ``PE_*`` flags of the
pagemap entry in its high 16 bits. ``dst_id`` names the image: ``id << 8 | type`` with type 1 for
a task pagemap (``pagemap-<vpid>.img``) and 2 for a shared-memory pagemap
(``pagemap-shmem-<shmid>.img``); older CRIUs used other type numbers, which are accepted as CRIU
accepts them (``decode_pm``).

A dump talks to the page server like this (dump side -> page server)::

    OPEN2(dst_id)            <- 1 byte: has_parent (0/1)
    ADD_F|flags<<16(nr_pages, vaddr, dst_id)  followed by nr_pages*4096 bytes iff flags & PE_PRESENT
    ... more ADD_F, then OPEN2 of the next image ...
    CLOSE                    <- s32 status (0)

``PARENT(dst_id)`` is answered with an s32 has_parent, ``OPEN`` (legacy) and the data commands
get no answer. ``CLOSE`` (0x1023) and ``FORCE_CLOSE`` (0x1024) were called ``FLUSH`` and
``FLUSH_N_CLOSE`` before CRIU 3.x; the numbers did not change. ``GET`` is sent by a lazy-pages
daemon to the dump side's page server and is answered with an ``ADD_F`` header plus the pages.

Decoding is strict and bounded: an unknown command or flag, a misaligned or out-of-range address or
an absurd page count raises :class:`~phaul.errors.ProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from phaul.errors import ProtocolError
from phaul.page_server.criu_image import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PE_KNOWN_FLAGS,
    PE_PARENT,
    PE_PRESENT,
    pagemap_name,
    shmem_pagemap_name,
)

IOV = struct.Struct("<I4xQQQ")
IOV_SIZE = IOV.size  # 32
_S32 = struct.Struct("<i")

PS_CMD_BITS = 16
PS_CMD_MASK = (1 << PS_CMD_BITS) - 1
PS_TYPE_BITS = 8
PS_TYPE_MASK = (1 << PS_TYPE_BITS) - 1
PS_TYPE_PID = 1
PS_TYPE_SHMEM = 2

# Legacy dst_id type numbers CRIU still accepts (criu/page-xfer.c decode_pm).
_LEGACY_PID_TYPES = frozenset({10, 11, 16, 17})
_LEGACY_SHMEM_TYPES = frozenset({27, 28, 29, 32, 33, 34})

# User address spaces end below 2**57 even with 5-level paging; shmem offsets are far smaller.
MAX_ADDRESS = 1 << 57
# One ADD carries one page-pipe iovec (at most the pipe size, 1-4 MiB in practice). 2**22 pages
# (16 GiB) is far beyond any real command and still keeps arithmetic on it harmless.
MAX_NR_PAGES = 1 << 22


class Command(enum.IntEnum):
    """Page-server commands (the low 16 bits of ``cmd``)."""

    ADD = 1
    HOLE = 2
    OPEN = 3
    OPEN2 = 4
    PARENT = 5
    ADD_F = 6
    GET = 7
    CLOSE = 0x1023
    FORCE_CLOSE = 0x1024

    # Names used by CRIU before the rename (same numbers).
    @classmethod
    def legacy_name(cls, cmd: int) -> str:
        """``PS_IOV_*`` name of ``cmd`` as older CRIU sources spell it."""
        return {0x1023: "PS_IOV_FLUSH", 0x1024: "PS_IOV_FLUSH_N_CLOSE"}.get(
            cmd, f"PS_IOV_{cls(cmd).name}"
        )


class ImageKind(enum.Enum):
    """What a ``dst_id`` names."""

    TASK = "pagemap"
    SHMEM = "pagemap-shmem"


@dataclass(frozen=True, slots=True)
class ImageId:
    """A decoded ``dst_id``: a task pagemap (id = vpid) or a shmem pagemap (id = shmid)."""

    kind: ImageKind
    id: int

    @property
    def pagemap_name(self) -> str:
        """File name CRIU gives the pagemap image of this id."""
        if self.kind is ImageKind.TASK:
            return pagemap_name(self.id)
        return shmem_pagemap_name(self.id)

    def encode(self) -> int:
        """The ``dst_id`` a current CRIU sends for this image."""
        t = PS_TYPE_PID if self.kind is ImageKind.TASK else PS_TYPE_SHMEM
        return (self.id << PS_TYPE_BITS) | t


def decode_dst_id(dst_id: int) -> ImageId:
    """Split a ``dst_id``; raises ProtocolError on an unknown type."""
    t = dst_id & PS_TYPE_MASK
    ident = dst_id >> PS_TYPE_BITS
    if t == PS_TYPE_PID or t in _LEGACY_PID_TYPES:
        return ImageId(ImageKind.TASK, ident)
    if t == PS_TYPE_SHMEM or t in _LEGACY_SHMEM_TYPES:
        return ImageId(ImageKind.SHMEM, ident)
    raise ProtocolError(f"page server: unknown pagemap type {t} in dst_id {dst_id:#x}")


@dataclass(frozen=True, slots=True)
class PageServerIov:
    """One decoded ``page_server_iov``. ``flags`` are the ``PE_*`` flags the command implies
    (ADD: PE_PRESENT, HOLE: PE_PARENT, ADD_F: from the high bits, others 0)."""

    command: Command
    flags: int
    nr_pages: int
    vaddr: int
    dst_id: int

    @property
    def payload_bytes(self) -> int:
        """Bytes of page data that follow this header on the stream."""
        if self.command in (Command.ADD, Command.ADD_F, Command.HOLE) and self.flags & PE_PRESENT:
            return self.nr_pages << PAGE_SHIFT
        return 0

    @property
    def image(self) -> ImageId:
        """The image ``dst_id`` names (ProtocolError when unknown)."""
        return decode_dst_id(self.dst_id)


_DATA_COMMANDS = (Command.ADD, Command.ADD_F, Command.HOLE)


def decode_iov(data: bytes | bytearray | memoryview) -> PageServerIov:
    """Decode and validate one 32-byte header. Raises ProtocolError."""
    if len(data) != IOV_SIZE:
        raise ProtocolError(f"page server: header of {len(data)} bytes, expected {IOV_SIZE}")
    raw_cmd, nr_pages, vaddr, dst_id = IOV.unpack(data)
    code = raw_cmd & PS_CMD_MASK
    high = raw_cmd >> PS_CMD_BITS
    try:
        command = Command(code)
    except ValueError:
        raise ProtocolError(f"page server: unknown command {raw_cmd:#x}") from None
    if command is Command.ADD_F:
        flags = high
        if flags & ~PE_KNOWN_FLAGS:
            raise ProtocolError(f"page server: unknown pagemap flags {flags:#x}")
        if not flags:
            raise ProtocolError("page server: ADD_F without flags")
    elif high:
        raise ProtocolError(f"page server: flags {high:#x} on command {command.name}")
    elif command is Command.ADD:
        flags = PE_PRESENT
    elif command is Command.HOLE:
        flags = PE_PARENT
    else:
        flags = 0
    if command in _DATA_COMMANDS or command is Command.GET:
        if nr_pages == 0 or nr_pages > MAX_NR_PAGES:
            raise ProtocolError(f"page server: {command.name} of {nr_pages} pages")
        if vaddr % PAGE_SIZE:
            raise ProtocolError(f"page server: unaligned address {vaddr:#x}")
        if vaddr + nr_pages * PAGE_SIZE > MAX_ADDRESS:
            raise ProtocolError(f"page server: address range {vaddr:#x}+{nr_pages}p out of range")
    if command in (*_DATA_COMMANDS, Command.OPEN, Command.OPEN2, Command.PARENT):
        decode_dst_id(dst_id)
    return PageServerIov(command, flags, nr_pages, vaddr, dst_id)


def encode_iov(
    command: Command, *, flags: int = 0, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0
) -> bytes:
    """Encode one header (flags go into the high bits; only meaningful for ADD_F)."""
    if flags & ~PE_KNOWN_FLAGS:
        raise ValueError(f"unknown pagemap flags {flags:#x}")
    return IOV.pack((flags << PS_CMD_BITS) | int(command), nr_pages, vaddr, dst_id)


def encode_open2_reply(has_parent: bool) -> bytes:
    """Answer to OPEN2: one byte, 1 when a parent pagemap exists for the image."""
    return b"\x01" if has_parent else b"\x00"


def encode_parent_reply(has_parent: bool) -> bytes:
    """Answer to PARENT: an s32 (1 or 0)."""
    return _S32.pack(1 if has_parent else 0)


def encode_close_reply(status: int = 0) -> bytes:
    """Answer to CLOSE/FORCE_CLOSE: the s32 status, 0 when everything was received."""
    return _S32.pack(status)


def decode_s32(data: bytes | bytearray | memoryview) -> int:
    """Decode a 4-byte reply (PARENT, CLOSE). Raises ProtocolError on a wrong size."""
    if len(data) != 4:
        raise ProtocolError(f"page server: reply of {len(data)} bytes, expected 4")
    (value,) = _S32.unpack(data)
    return int(value)
