"""The pre-copy page frame format: round trips, strict validation, codecs, and a decoder fuzz."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phaul.errors import ProtocolError
from phaul.page_server import framing as fr
from phaul.page_server.framing import Codec, Kind


def _raw(**kw: int) -> bytes:
    """A header with every field settable (defaults: a valid 1-page raw DATA frame)."""
    f = {
        "magic": fr.MAGIC,
        "version": fr.VERSION,
        "kind": Kind.DATA,
        "flags": 0,
        "codec": Codec.NONE,
        "reserved": 0,
        "vpid": 1,
        "nr_pages": 1,
        "vaddr": 0x7F0000000000,
        "payload_len": 4096,
        "aux": 0,
    }
    f.update(kw)
    return fr.HEADER.pack(*f.values())


def test_header_is_32_bytes_little_endian() -> None:
    h = fr.encode_header(Kind.DATA, vpid=0x01020304, vaddr=0x1000, nr_pages=1, payload_len=4096)
    assert len(h) == 32
    assert h[:2] == b"PF"  # 0x4650 little-endian
    assert h[8:12] == bytes([4, 3, 2, 1])


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        (Kind.DATA, {"vpid": 9, "vaddr": 0x400000, "nr_pages": 256, "payload_len": 1 << 20}),
        (Kind.DATA, {"vpid": 9, "vaddr": 0, "nr_pages": 3, "payload_len": 100, "codec": Codec.LZ4}),
        (Kind.ZERO, {"vpid": 2**32 - 1, "vaddr": 2**47 - 4096, "nr_pages": 1}),
        (Kind.DROP, {"vpid": 5, "vaddr": 0x1000, "nr_pages": fr.MAX_RUN_PAGES}),
        (Kind.PASS_END, {"aux": 7}),
        (Kind.ACK, {"aux": 3, "payload_len": fr.ACK_PAYLOAD.size}),
    ],
)
def test_round_trip(kind: Kind, kw: dict[str, int]) -> None:
    h = fr.decode_header(fr.encode_header(kind, **kw))  # type: ignore[arg-type]
    assert h.kind is kind
    for name, value in kw.items():
        assert getattr(h, name) == value


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"magic": 0x1234}, "magic"),
        ({"version": 2}, "version"),
        ({"kind": 0}, "kind"),
        ({"kind": 6}, "kind"),
        ({"codec": 3}, "codec"),
        ({"flags": 1}, "flags"),
        ({"reserved": 1}, "flags"),
        ({"vaddr": 0x1001}, "unaligned"),
        ({"vaddr": 2**47}, "beyond"),
        ({"vaddr": 2**47 - 4096, "nr_pages": 2, "payload_len": 8192}, "beyond"),
        ({"nr_pages": 0, "payload_len": 0}, "0 pages"),
        ({"nr_pages": 257, "payload_len": 257 * 4096}, "257 pages"),
        ({"payload_len": 4095}, "raw DATA"),
        ({"payload_len": 2**32 - 1}, "raw DATA"),
        ({"codec": Codec.ZSTD, "payload_len": 4097}, "compressed"),
        ({"codec": Codec.ZSTD, "payload_len": 0}, "compressed"),
        ({"vpid": 0}, "vpid 0"),
        ({"aux": 1}, "aux"),
        ({"kind": Kind.ZERO, "payload_len": 4096}, "payload"),
        ({"kind": Kind.ZERO, "payload_len": 0, "codec": Codec.LZ4}, "codec"),
        ({"kind": Kind.ZERO, "payload_len": 0, "nr_pages": fr.MAX_RUN_PAGES + 1}, "pages"),
        ({"kind": Kind.PASS_END, "payload_len": 0}, "page fields"),
        ({"kind": Kind.PASS_END, "vpid": 0, "vaddr": 0, "nr_pages": 0}, "payload"),
        ({"kind": Kind.ACK, "vpid": 0, "vaddr": 0, "nr_pages": 0, "payload_len": 8}, "payload"),
    ],
)
def test_malformed_headers_are_refused(kw: dict[str, int], what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        fr.decode_header(_raw(**kw))


def test_wrong_length_is_refused() -> None:
    with pytest.raises(ProtocolError):
        fr.decode_header(_raw()[:31])


def test_ack_round_trip_and_checks() -> None:
    ack = fr.Ack(pass_no=4, pages=10, zero_pages=3, bytes=40960, seconds=0.25)
    frame = fr.encode_ack(ack)
    h = fr.decode_header(frame[:32])
    assert fr.decode_ack(h, frame[32:]) == ack
    bad = fr.ACK_PAYLOAD.pack(1, 2, 0, 0.0)  # more zero pages than pages
    with pytest.raises(ProtocolError):
        fr.decode_ack(h, bad)
    with pytest.raises(ProtocolError):
        fr.decode_ack(h, fr.ACK_PAYLOAD.pack(1, 0, 0, float("nan")))


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD])
def test_codec_round_trip(codec: Codec) -> None:
    pages = (b"a" * 4000 + os.urandom(96)) * 8
    packed = fr.Compressor(codec).compress(pages)
    assert len(packed) < len(pages)
    out = bytearray(fr.MAX_PAYLOAD)
    fr.Decompressor().decompress_into(codec, memoryview(packed), memoryview(out), len(pages))
    assert out[: len(pages)] == pages


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD])
def test_codec_refuses_wrong_size_and_garbage(codec: Codec) -> None:
    pages = bytes(8192)
    packed = fr.Compressor(codec).compress(pages)
    out = memoryview(bytearray(fr.MAX_PAYLOAD))
    d = fr.Decompressor()
    with pytest.raises(ProtocolError):
        d.decompress_into(codec, memoryview(packed), out, 4096)  # says 1 page, holds 2
    with pytest.raises(ProtocolError):
        d.decompress_into(codec, memoryview(packed), out, 3 * 4096)
    with pytest.raises(ProtocolError):
        d.decompress_into(codec, memoryview(b"\xff" * 64), out, 4096)


def test_zstd_frame_without_content_size_is_refused() -> None:
    import zstandard

    packed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4096))
    with pytest.raises(ProtocolError, match="zstd frame"):
        fr.Decompressor().decompress_into(
            Codec.ZSTD, memoryview(packed), memoryview(bytearray(4096)), 4096
        )


def test_parse_codec() -> None:
    assert fr.parse_codec("zstd") is Codec.ZSTD
    with pytest.raises(ValueError, match="unknown page codec"):
        fr.parse_codec("gzip")


# -- fuzz: >= 100k decoder inputs in total ----------------------------------------------------
# Hypothesis costs ~1-2 ms per example here, so each example carries a batch of headers:
# 1200 x 64 random headers + 300 x 16 structured ones + 400 x 96 mutated valid ones = 120k.

BATCH = 64
_FUZZ = settings(
    max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


def _decode_or_protocol_error(data: bytes) -> fr.FrameHeader | None:
    try:
        h = fr.decode_header(data)
    except ProtocolError:
        return None
    # Whatever is accepted respects the fixed bounds.
    assert h.payload_len <= fr.MAX_PAYLOAD
    assert h.vaddr % 4096 == 0 and h.end <= fr.VADDR_LIMIT
    return h


@_FUZZ
@given(st.binary(min_size=32 * BATCH, max_size=32 * BATCH))
def test_fuzz_random_headers(data: bytes) -> None:
    for off in range(0, len(data), 32):
        _decode_or_protocol_error(data[off : off + 32])


_FIELDS = st.tuples(
    st.integers(0, 7),  # kind
    st.integers(0, 3),  # codec
    st.sampled_from([0, 0, 0, 1, 0x80]),  # flags
    st.sampled_from([0, 1, 2**32 - 1]) | st.integers(0, 2**32 - 1),  # vpid
    st.sampled_from([0, 1, 256, 257, fr.MAX_RUN_PAGES, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    st.sampled_from([0, 4096, 2**47 - 4096, 2**47, 2**64 - 4096]) | st.integers(0, 2**64 - 1),
    st.sampled_from([0, 32, 4096, 1 << 20, (1 << 20) + 1]) | st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1]) | st.integers(0, 2**32 - 1),  # aux
)


@settings(_FUZZ, max_examples=300)
@given(st.lists(_FIELDS, min_size=16, max_size=16))
def test_fuzz_structured_headers(batch: list[tuple[int, ...]]) -> None:
    for kind, codec, flags, vpid, nr, vaddr, plen, aux in batch:
        data = struct.pack(
            "<HBBBBHIIQII", fr.MAGIC, fr.VERSION, kind, flags, codec, 0, vpid, nr, vaddr, plen, aux
        )
        _decode_or_protocol_error(data)


_VALID = [
    fr.encode_header(Kind.DATA, vpid=3, vaddr=0x7F0000001000, nr_pages=256, payload_len=1 << 20),
    fr.encode_header(Kind.DATA, vpid=3, vaddr=0x1000, nr_pages=4, payload_len=99, codec=Codec.LZ4),
    fr.encode_header(Kind.ZERO, vpid=3, vaddr=0x2000, nr_pages=fr.MAX_RUN_PAGES),
    fr.encode_header(Kind.DROP, vpid=3, vaddr=0x2000, nr_pages=1),
    fr.encode_header(Kind.PASS_END, aux=2),
    fr.encode_header(Kind.ACK, aux=2, payload_len=fr.ACK_PAYLOAD.size),
]


@settings(_FUZZ, max_examples=400)
@given(st.randoms(use_true_random=False))
def test_fuzz_mutated_valid_headers(rnd: random.Random) -> None:
    for _ in range(96):
        data = bytearray(rnd.choice(_VALID))
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(32)] ^= rnd.randint(1, 255)
        _decode_or_protocol_error(bytes(data))


def test_valid_samples_decode() -> None:
    for data in _VALID:
        assert fr.decode_header(data)


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(codec=st.sampled_from([Codec.LZ4, Codec.ZSTD]), data=st.binary(max_size=512),
       pages=st.integers(1, 4))  # fmt: skip
def test_fuzz_decompressor(codec: Codec, data: bytes, pages: int) -> None:
    out = memoryview(bytearray(fr.MAX_PAYLOAD))
    try:
        fr.Decompressor().decompress_into(codec, memoryview(data), out, pages * 4096)
    except ProtocolError:
        pass
