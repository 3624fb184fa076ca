"""The pre-copy page stream: phaul's own binary frame format (source -> target, and ACKs back).

Theory of operation
-------------------
Pre-copy passes send the pages of a running process on their own connection (never through
the protobuf control channel, STYLE "Page bytes never travel through control code"). Every frame
is a fixed 32-byte little-endian header, optionally followed by ``payload_len`` bytes::

    off size field
      0   2  magic        0x4650 ("PF" on the wire)
      2   1  version      1
      3   1  kind         Kind (DATA, ZERO, PASS_END, ACK, DROP)
      4   1  flags        0 (no flag is defined; anything else is refused)
      5   1  codec        Codec of a DATA payload (NONE, LZ4, ZSTD); NONE for other kinds
      6   2  reserved     0
      8   4  vpid         the task's pid in its own pid namespace (names its image)
     12   4  nr_pages     pages the frame covers
     16   8  vaddr        first page's address (page aligned, < 2**47)
     24   4  payload_len  bytes following the header
     28   4  aux          PASS_END/ACK: the pass number; 0 otherwise

Kinds:

- ``DATA``: ``nr_pages`` (1..``MAX_DATA_PAGES``) pages at ``vaddr``. With codec ``NONE`` the
  payload is the raw pages (``nr_pages * 4096`` bytes); with ``LZ4`` (an ``lz4.block`` without
  stored size) or ``ZSTD`` (one zstd frame with its content size) it is their compressed form,
  never longer than the raw pages: a sender whose compression does not pay sends the frame raw.
- ``ZERO``: ``nr_pages`` (1..``MAX_RUN_PAGES``) pages at ``vaddr`` are all zero; no payload
  (zero-page elision). The target stores zero pages: a page that became zero is zero there too.
- ``DROP``: the range vanished from the source process (unmapped while being read); no payload.
  The target cannot forget pages of a :class:`~phaul.page_server.store.FlatPageImage` (it has no
  hole punching); it counts them. Stale pages of an unmapped range are harmless: a restore only
  reads pages inside the VMAs of the final dump, and a range mapped again is sent whole again.
- ``PASS_END``: the end of pre-copy pass ``aux``; the target commits its images and answers ACK.
- ``ACK``: target -> source, pass ``aux`` stored; payload ``ACK_PAYLOAD`` (32 bytes): pages
  stored (u64, zero pages included), zero pages (u64), bytes written to images (u64), seconds the
  pass took on the target (f64).

Decoding is strict and bounded: :func:`decode_header` checks every field against fixed limits
before anything is received or allocated, and raises :class:`~phaul.errors.ProtocolError` on
anything unexpected. A receiver needs one buffer of ``MAX_PAYLOAD`` bytes, whatever the peer says.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from phaul.errors import ProtocolError

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAGIC = 0x4650
VERSION = 1
HEADER = struct.Struct("<HBBBBHIIQII")
HEADER_SIZE = HEADER.size  # 32
MAX_DATA_PAGES = 256
"""Pages of one DATA frame: 1 MiB, the receiver's buffer."""
MAX_PAYLOAD = MAX_DATA_PAGES * PAGE_SIZE
MAX_RUN_PAGES = 1 << 20
"""Pages of one ZERO or DROP frame (4 GiB); longer runs take several frames."""
VADDR_LIMIT = 1 << 47
"""Exclusive end of the user address space the format accepts (x86-64, 4-level paging)."""
ACK_PAYLOAD = struct.Struct("<QQQd")

assert HEADER_SIZE == 32


class Kind(enum.IntEnum):
    DATA = 1
    ZERO = 2
    PASS_END = 3
    ACK = 4
    DROP = 5


class Codec(enum.IntEnum):
    NONE = 0
    LZ4 = 1
    ZSTD = 2


CODEC_NAMES: dict[str, Codec] = {"none": Codec.NONE, "lz4": Codec.LZ4, "zstd": Codec.ZSTD}
"""``--compress`` values."""

_KINDS = {int(k): k for k in Kind}
_CODECS = {int(c): c for c in Codec}


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded, validated header."""

    kind: Kind
    codec: Codec
    vpid: int
    vaddr: int
    nr_pages: int
    payload_len: int
    aux: int = 0

    @property
    def raw_len(self) -> int:
        """Bytes of page data the frame stands for (DATA, ZERO, DROP)."""
        return self.nr_pages << PAGE_SHIFT

    @property
    def end(self) -> int:
        """First address after the frame's pages."""
        return self.vaddr + (self.nr_pages << PAGE_SHIFT)


@dataclass(frozen=True, slots=True)
class Ack:
    """The target's answer to PASS_END ``pass_no``."""

    pass_no: int
    pages: int
    zero_pages: int
    bytes: int
    seconds: float


def parse_codec(name: str) -> Codec:
    """``"none"``, ``"lz4"`` or ``"zstd"`` -> Codec; ValueError otherwise."""
    try:
        return CODEC_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown page codec {name!r} (use none, lz4 or zstd)") from None


def encode_header(
    kind: Kind,
    *,
    vpid: int = 0,
    vaddr: int = 0,
    nr_pages: int = 0,
    payload_len: int = 0,
    codec: Codec = Codec.NONE,
    aux: int = 0,
) -> bytes:
    """The 32-byte header of one frame (not validated: the sender builds only valid ones)."""
    return HEADER.pack(MAGIC, VERSION, kind, 0, codec, 0, vpid, nr_pages, vaddr, payload_len, aux)


def pack_header_into(
    buf: bytearray | memoryview,
    offset: int,
    kind: Kind,
    vpid: int,
    vaddr: int,
    nr_pages: int,
    payload_len: int,
    codec: Codec = Codec.NONE,
) -> None:
    """:func:`encode_header` into ``buf`` at ``offset`` (no allocation)."""
    HEADER.pack_into(
        buf, offset, MAGIC, VERSION, kind, 0, codec, 0, vpid, nr_pages, vaddr, payload_len, 0
    )


def decode_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Decode and validate one header (exactly ``HEADER_SIZE`` bytes). Raises ProtocolError."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"page stream: header of {len(data)} bytes, expected {HEADER_SIZE}")
    (magic, version, kind_v, flags, codec_v, reserved, vpid, nr_pages, vaddr, plen, aux) = (
        HEADER.unpack(data)
    )
    if magic != MAGIC:
        raise ProtocolError(f"page stream: bad magic {magic:#06x} (not a phaul page stream)")
    if version != VERSION:
        raise ProtocolError(f"page stream: version {version}, this phaul speaks {VERSION}")
    kind = _KINDS.get(kind_v)
    if kind is None:
        raise ProtocolError(f"page stream: unknown frame kind {kind_v}")
    codec = _CODECS.get(codec_v)
    if codec is None:
        raise ProtocolError(f"page stream: unknown codec {codec_v}")
    if flags or reserved:
        raise ProtocolError(f"page stream: unknown flags {flags:#x}/{reserved:#x}")
    if kind is not Kind.DATA and codec is not Codec.NONE:
        raise ProtocolError(f"page stream: {kind.name} frame with codec {codec.name}")
    if kind in (Kind.DATA, Kind.ZERO, Kind.DROP):
        if aux:
            raise ProtocolError(f"page stream: {kind.name} frame with aux {aux}")
        if vpid == 0:
            raise ProtocolError(f"page stream: {kind.name} frame for vpid 0")
        limit = MAX_DATA_PAGES if kind is Kind.DATA else MAX_RUN_PAGES
        if not 1 <= nr_pages <= limit:
            raise ProtocolError(f"page stream: {kind.name} frame of {nr_pages} pages")
        if vaddr % PAGE_SIZE:
            raise ProtocolError(f"page stream: unaligned address {vaddr:#x}")
        if vaddr + (nr_pages << PAGE_SHIFT) > VADDR_LIMIT:
            raise ProtocolError(f"page stream: range {vaddr:#x}+{nr_pages}p beyond user space")
        raw = nr_pages << PAGE_SHIFT
        if kind is Kind.DATA:
            if codec is Codec.NONE and plen != raw:
                raise ProtocolError(f"page stream: raw DATA of {plen} bytes for {nr_pages} pages")
            if not 0 < plen <= raw:
                raise ProtocolError(f"page stream: compressed DATA of {plen} bytes (raw {raw})")
        elif plen:
            raise ProtocolError(f"page stream: {kind.name} frame with a {plen}-byte payload")
    else:
        if vpid or vaddr or nr_pages:
            raise ProtocolError(f"page stream: {kind.name} frame with page fields set")
        want = ACK_PAYLOAD.size if kind is Kind.ACK else 0
        if plen != want:
            raise ProtocolError(f"page stream: {kind.name} frame with a {plen}-byte payload")
    return FrameHeader(kind, codec, vpid, vaddr, nr_pages, plen, aux)


def encode_ack(ack: Ack) -> bytes:
    """A whole ACK frame."""
    return encode_header(Kind.ACK, payload_len=ACK_PAYLOAD.size, aux=ack.pass_no) + (
        ACK_PAYLOAD.pack(ack.pages, ack.zero_pages, ack.bytes, ack.seconds)
    )


def decode_ack(header: FrameHeader, payload: bytes | bytearray | memoryview) -> Ack:
    """The Ack of an ACK frame. Raises ProtocolError."""
    if header.kind is not Kind.ACK or len(payload) != ACK_PAYLOAD.size:
        raise ProtocolError(f"page stream: expected ACK, got {header.kind.name}")
    pages, zero_pages, nbytes, seconds = ACK_PAYLOAD.unpack(payload)
    if not seconds >= 0.0 or seconds == float("inf") or zero_pages > pages:
        raise ProtocolError("page stream: implausible ACK")
    return Ack(header.aux, pages, zero_pages, nbytes, seconds)


# -- codecs -----------------------------------------------------------------------------------


class Compressor:
    """Compresses DATA payloads with one codec (state reused across frames)."""

    def __init__(self, codec: Codec, *, level: int = 1) -> None:
        self.codec = codec
        if codec is Codec.ZSTD:
            import zstandard

            self._zc = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.codec is Codec.LZ4:
            import lz4.block

            return bytes(lz4.block.compress(data, store_size=False))
        if self.codec is Codec.ZSTD:
            return bytes(self._zc.compress(data))
        raise ValueError("Compressor: codec NONE compresses nothing")


class Decompressor:
    """Decompresses DATA payloads into a caller's buffer, bounded by the frame's raw size."""

    def __init__(self) -> None:
        self._zd: object | None = None

    def decompress_into(
        self, codec: Codec, payload: memoryview, out: memoryview, raw_len: int
    ) -> None:
        """Decompress ``payload`` into ``out[:raw_len]``; ProtocolError unless it yields exactly
        ``raw_len`` bytes (``raw_len`` comes from a validated header: <= MAX_PAYLOAD)."""
        try:
            if codec is Codec.LZ4:
                import lz4.block

                data = lz4.block.decompress(payload, uncompressed_size=raw_len)
            elif codec is Codec.ZSTD:
                import zstandard

                size = zstandard.frame_content_size(payload)
                if size != raw_len:
                    raise ProtocolError(
                        f"page stream: zstd frame of {size} bytes, header says {raw_len}"
                    )
                if self._zd is None:
                    self._zd = zstandard.ZstdDecompressor()
                zd: zstandard.ZstdDecompressor = self._zd  # type: ignore[assignment]
                data = zd.decompress(payload, max_output_size=raw_len)
            else:
                raise ProtocolError(f"page stream: codec {codec.name} is not a compression")
        except ProtocolError:
            raise
        except Exception as err:  # lz4/zstd raise their own error types
            raise ProtocolError(f"page stream: corrupt {codec.name} payload: {err}") from err
        if len(data) != raw_len:
            raise ProtocolError(
                f"page stream: {codec.name} payload gave {len(data)} bytes, expected {raw_len}"
            )
        out[:raw_len] = data
