"""CRIU image files that phaul reads and writes itself: pagemaps, pages files, the pstree.

Format (CRIU criu/image.c, criu/protobuf.c, include/magic.h; checked against CRIU v4.2):

- A protobuf image starts with the u32 ``IMG_COMMON_MAGIC`` (``IMG_SERVICE_MAGIC`` for service
  files), then the u32 magic of the image kind (``PAGEMAP_MAGIC``, ``PSTREE_MAGIC``...). The
  inventory alone starts directly with its own magic. All integers are little-endian.
- Then a stream of entries, each a u32 length followed by that many bytes of protobuf.
- ``pagemap-<vpid>.img`` (and ``pagemap-shmem-<shmid>.img``): one ``pagemap_head`` naming the pages
  file, then ``pagemap_entry`` messages sorted by vaddr, not overlapping.
- ``pages-<pages_id>.img``: raw page data without any header: the concatenation of the data of the
  entries flagged ``PE_PRESENT``, in entry order. ``PE_PARENT`` entries live in ``parent/``;
  entries with only ``PE_LAZY`` have no data here.

Every decoder is bounded: a corrupt length or a truncated file raises
:class:`~phaul.errors.ProtocolError`; nothing allocates more than the file holds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError

from phaul.errors import ProtocolError
from phaul.pb import criu_images_pb2

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030
PAGEMAP_MAGIC = 0x56084025
SHMEM_PAGEMAP_MAGIC = PAGEMAP_MAGIC

PAGE_SIZE = 4096
PAGE_SHIFT = 12

PE_PARENT = 1 << 0  # pages are in the parent image
PE_LAZY = 1 << 1  # pages may be restored lazily (lazy-pages daemon)
PE_PRESENT = 1 << 2  # pages are in this image's pages file
PE_KNOWN_FLAGS = PE_PARENT | PE_LAZY | PE_PRESENT

# One protobuf entry of the images we handle is tens of bytes; CRIU images with big entries
# (mm, core) are not read here. Anything larger is corruption, not data.
MAX_ENTRY_SIZE = 1 << 20

_U32 = struct.Struct("<I")
_MAGIC2 = struct.Struct("<II")


def pagemap_name(vpid: int) -> str:
    """File name of the pagemap of the task with pid ``vpid`` (in its own pid namespace)."""
    return f"pagemap-{vpid}.img"


def shmem_pagemap_name(shmid: int) -> str:
    """File name of the pagemap of the shared memory segment ``shmid``."""
    return f"pagemap-shmem-{shmid}.img"


def pages_name(pages_id: int) -> str:
    """File name of the raw pages file ``pages_id`` (named in a pagemap head)."""
    return f"pages-{pages_id}.img"


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """A run of ``nr_pages`` pages at ``vaddr`` with ``PE_*`` ``flags``."""

    vaddr: int
    nr_pages: int
    flags: int

    @property
    def end(self) -> int:
        """First address after the run."""
        return self.vaddr + self.nr_pages * PAGE_SIZE

    @property
    def present(self) -> bool:
        """Whether the run's data is in this image's pages file."""
        return bool(self.flags & PE_PRESENT)


@dataclass(frozen=True, slots=True)
class Pagemap:
    """A decoded pagemap image: the id of its pages file and its entries in file order."""

    pages_id: int
    entries: tuple[PagemapEntry, ...]

    @property
    def present_pages(self) -> int:
        """Number of pages whose data is in ``pages-<pages_id>.img``."""
        return sum(e.nr_pages for e in self.entries if e.present)


def image_header(magic: int) -> bytes:
    """The 8 bytes that open a CRIU protobuf image of kind ``magic``."""
    return _MAGIC2.pack(IMG_COMMON_MAGIC, magic)


def frame_entry(payload: bytes) -> bytes:
    """One image entry: u32 length + ``payload``."""
    return _U32.pack(len(payload)) + payload


def encode_pagemap_head(pages_id: int) -> bytes:
    """Serialized ``pagemap_head`` (without the length frame)."""
    return criu_images_pb2.pagemap_head(pages_id=pages_id).SerializeToString()


def encode_pagemap_entry(entry: PagemapEntry) -> bytes:
    """Serialized ``pagemap_entry`` exactly as CRIU writes it: vaddr, compat_nr_pages=0, flags,
    nr_pages (``in_parent`` is never written)."""
    msg = criu_images_pb2.pagemap_entry(
        vaddr=entry.vaddr, compat_nr_pages=0, flags=entry.flags, nr_pages=entry.nr_pages
    )
    return msg.SerializeToString()


def encode_pagemap(pages_id: int, entries: Iterable[PagemapEntry]) -> bytes:
    """A whole pagemap image: header, head, entries."""
    parts = [image_header(PAGEMAP_MAGIC), frame_entry(encode_pagemap_head(pages_id))]
    parts.extend(frame_entry(encode_pagemap_entry(e)) for e in entries)
    return b"".join(parts)


def iter_entries(data: bytes | memoryview, magic: int, *, what: str = "image") -> Iterator[bytes]:
    """Yield the raw protobuf payloads of a CRIU image held in ``data``.

    Accepts ``IMG_COMMON_MAGIC``/``IMG_SERVICE_MAGIC`` + ``magic``, or ``magic`` alone (the
    inventory, and images of CRIU before 1.6). Raises ProtocolError on a wrong magic, an entry
    longer than ``MAX_ENTRY_SIZE`` or a truncated entry.
    """
    view = memoryview(data)
    if len(view) < 4:
        raise ProtocolError(f"{what}: too short for a CRIU image ({len(view)} bytes)")
    (first,) = _U32.unpack_from(view, 0)
    off = 4
    if first in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
        if len(view) < 8:
            raise ProtocolError(f"{what}: truncated image header")
        (first,) = _U32.unpack_from(view, 4)
        off = 8
    if first != magic:
        raise ProtocolError(f"{what}: image magic {first:#x}, expected {magic:#x}")
    end = len(view)
    while off < end:
        if end - off < 4:
            raise ProtocolError(f"{what}: truncated entry length at offset {off}")
        (size,) = _U32.unpack_from(view, off)
        off += 4
        if size > MAX_ENTRY_SIZE:
            raise ProtocolError(f"{what}: entry of {size} bytes at offset {off - 4} is absurd")
        if end - off < size:
            raise ProtocolError(f"{what}: entry at offset {off - 4} truncated")
        yield bytes(view[off : off + size])
        off += size


def decode_pagemap(data: bytes | memoryview, *, what: str = "pagemap") -> Pagemap:
    """Decode a pagemap image. Raises ProtocolError when it is malformed, when entries are not
    sorted or overlap, or when a page address is not page aligned.

    The entries are re-framed as one ``pagemap_entry_list`` (our own wrapper message) and parsed
    by protobuf's C parser in one call: per-entry Python parsing was the cost of the lazy
    restore's split at the freeze (thousands of entries)."""
    it = iter_entries(data, PAGEMAP_MAGIC, what=what)
    try:
        raw_head = next(it)
    except StopIteration:
        raise ProtocolError(f"{what}: no pagemap_head") from None
    head = criu_images_pb2.pagemap_head()
    try:
        head.ParseFromString(raw_head)
    except DecodeError as err:
        raise ProtocolError(f"{what}: bad pagemap_head: {err}") from err
    if not head.IsInitialized():
        raise ProtocolError(f"{what}: pagemap_head without pages_id")
    framed = b"".join(_LIST_TAG + _varint(len(raw)) + raw for raw in it)
    wrapper = criu_images_pb2.pagemap_entry_list()
    try:
        wrapper.ParseFromString(framed)
    except DecodeError as err:
        raise ProtocolError(f"{what}: bad pagemap_entry: {err}") from err
    entries: list[PagemapEntry] = []
    prev_end = 0
    for msg in wrapper.entries:
        if not msg.IsInitialized():
            raise ProtocolError(f"{what}: pagemap_entry without its required fields")
        # The same normalisation as CRIU's init_compat_pagemap_entry() (criu/pagemap.c).
        flags = msg.flags
        if msg.in_parent:
            flags |= PE_PARENT
        elif not msg.HasField("flags"):
            flags = PE_PRESENT
        nr_pages = msg.nr_pages if msg.HasField("nr_pages") else msg.compat_nr_pages
        vaddr = msg.vaddr
        if vaddr % PAGE_SIZE:
            raise ProtocolError(f"{what}: unaligned vaddr {vaddr:#x}")
        if vaddr < prev_end:
            raise ProtocolError(f"{what}: entry {vaddr:#x} overlaps or is out of order")
        entry = PagemapEntry(vaddr=vaddr, nr_pages=nr_pages, flags=flags)
        prev_end = entry.end
        entries.append(entry)
    return Pagemap(pages_id=head.pages_id, entries=tuple(entries))


_LIST_TAG = b"\x0a"  # field 1, length-delimited


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_pagemap(path: Path) -> Pagemap:
    """Read and decode ``path``. Raises ProtocolError (malformed) or OSError (I/O)."""
    return decode_pagemap(path.read_bytes(), what=str(path))


def write_pagemap(path: Path, pages_id: int, entries: Iterable[PagemapEntry]) -> None:
    """Write a pagemap image atomically (temporary file, fsync-less rename)."""
    data = encode_pagemap(pages_id, entries)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@dataclass(frozen=True, slots=True)
class PstreeEntry:
    """One task of ``pstree.img``; pids are those inside the dumped pid namespace."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]


def decode_pstree(data: bytes | memoryview, *, what: str = "pstree") -> list[PstreeEntry]:
    """Decode ``pstree.img``. Raises ProtocolError when malformed."""
    out: list[PstreeEntry] = []
    for raw in iter_entries(data, PSTREE_MAGIC, what=what):
        msg = criu_images_pb2.pstree_entry()
        try:
            msg.ParseFromString(raw)
        except DecodeError as err:
            raise ProtocolError(f"{what}: bad pstree_entry: {err}") from err
        if not msg.IsInitialized():
            raise ProtocolError(f"{what}: pstree_entry misses required fields")
        out.append(
            PstreeEntry(
                pid=msg.pid, ppid=msg.ppid, pgid=msg.pgid, sid=msg.sid, threads=tuple(msg.threads)
            )
        )
    return out


def read_pstree(path: Path) -> list[PstreeEntry]:
    """Read and decode ``path`` (normally ``<images_dir>/pstree.img``)."""
    return decode_pstree(path.read_bytes(), what=str(path))


class PagemapWriter:
    """Writes a new pagemap image entry by entry, as CRIU's dump does (created or truncated at
    construction, like CRIU's O_DUMP; buffered with a bounded buffer). Entries must come sorted
    and non-overlapping, else ProtocolError: a restore would reject them anyway."""

    def __init__(self, path: Path, pages_id: int) -> None:
        self.path = path
        self.pages_id = pages_id
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        header = image_header(PAGEMAP_MAGIC) + frame_entry(encode_pagemap_head(pages_id))
        self._file.write(header)
        self._prev_end = 0
        self.entries = 0
        self.size = len(header)

    def add(self, entry: PagemapEntry) -> int:
        """Append one entry; returns the bytes it takes in the image."""
        if entry.vaddr < self._prev_end:
            raise ProtocolError(f"{self.path.name}: entry {entry.vaddr:#x} overlaps or is unsorted")
        self._prev_end = entry.end
        framed = frame_entry(encode_pagemap_entry(entry))
        self._file.write(framed)
        self.entries += 1
        self.size += len(framed)
        return len(framed)

    def close(self) -> None:
        """Flush and close the image file (idempotent)."""
        self._file.close()


#: CRIU's ``network_lock_method`` values (criu/include/cr_options.h, inventory field 11)
NETWORK_LOCK_METHODS = {"iptables": 0, "nftables": 1, "skip": 2}
_INVENTORY_LOCK_TAG = bytes([11 << 3])  # field 11, varint


def set_network_lock(path: Path, method: str) -> None:
    """Set ``inventory_entry.network_lock_method`` in the inventory image ``path``.

    CRIU's restore takes the lock method from the dump's inventory, not from its options. The
    field is appended to the entry: for a non-repeated scalar, protobuf parsers (CRIU's
    protobuf-c included) keep the last occurrence, and every other field stays byte for byte.
    Written atomically. Raises ProtocolError (not an inventory image), OSError."""
    data = path.read_bytes()
    entries = list(iter_entries(data, INVENTORY_MAGIC, what=str(path)))
    if len(entries) != 1:
        raise ProtocolError(f"{path}: {len(entries)} inventory entries, expected 1")
    value = NETWORK_LOCK_METHODS[method]
    payload = entries[0] + _INVENTORY_LOCK_TAG + _varint(value)
    out = _U32.pack(INVENTORY_MAGIC) + frame_entry(payload)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(out)
    tmp.replace(path)
