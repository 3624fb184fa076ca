"""Fuzzing the decoders of everything a peer can send: control frames and page-stream headers.

Over 100k inputs in total (hypothesis): whatever the bytes, a decoder returns a message or raises
ProtocolError — no other exception, no hang (every read is bounded by a timeout and the stream
ends), and nothing is allocated for what a header merely announces.
"""

from __future__ import annotations

import asyncio
import random
import struct
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phaul.errors import ProtocolError
from phaul.page_server import criu_protocol, framing
from phaul.pb import phaul_pb2 as pb
from phaul.protocol.framing import HEADER, Channel, decode_body, encode


def fuzz(n: int) -> settings:
    """``n`` examples, no deadline, no example database, reproducible."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


# Seeds that reach deeper than random bytes: valid frames, then mutated.
VALID_BODIES = [
    encode(m)[4:]
    for m in (
        pb.Hello(protocol_version=1, nonce=b"n" * 32, role="control"),
        pb.PreflightRequest(migration_id="abc", pids=[1, 2, 3]),
        pb.ImageFile(name="core-1.img", data=b"x" * 100, last=True),
        pb.Commit(),
        pb.Error(code="protocol", message="m"),
    )
]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _mutate(data: bytes, pos: int, byte: int) -> bytes:
    if not data:
        return bytes([byte])
    pos %= len(data)
    return data[:pos] + bytes([byte]) + data[pos + 1 :]


@fuzz(3_000)
@given(st.lists(st.binary(max_size=128), min_size=10, max_size=10))
def test_decode_body_random(bodies: list[bytes]) -> None:  # 30k inputs
    for data in bodies:
        try:
            decode_body(data)
        except ProtocolError:
            pass


@fuzz(1_000)
@given(st.sampled_from(VALID_BODIES), st.integers(0, 1 << 32))
def test_decode_body_mutated(body: bytes, seed: int) -> None:  # 10k inputs
    rng = random.Random(seed)
    for _ in range(10):
        data = body
        for _ in range(rng.randint(1, 4)):
            data = _mutate(data, rng.randrange(1 << 16), rng.randrange(256))
        try:
            decode_body(data[: rng.randint(0, len(data))] if rng.random() < 0.2 else data)
        except ProtocolError:
            pass


async def _read_all(data: bytes, max_frame: int) -> int:
    reader = asyncio.StreamReader(limit=1 << 16)
    reader.feed_data(data)
    reader.feed_eof()
    chan = Channel(reader, None, max_frame=max_frame)  # type: ignore[arg-type]
    n = 0
    while True:
        try:
            await chan.recv_any(1.0)
        except ProtocolError:
            return n
        n += 1


@fuzz(3_000)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from(VALID_BODIES).map(lambda b: HEADER.pack(len(b)) + b),
            st.integers(0, 0xFFFFFFFF).map(HEADER.pack),
        ),
        max_size=6,
    )
)
def test_channel_reads_any_stream(loop: asyncio.AbstractEventLoop, parts: list[bytes]) -> None:
    # Error frames are raised as their PhaulError class: that is decoding succeeding.
    from phaul.errors import PhaulError

    try:
        loop.run_until_complete(_read_all(b"".join(parts), 1 << 20))
    except PhaulError:
        pass


def test_announced_size_is_not_allocated(loop: asyncio.AbstractEventLoop) -> None:
    """A header announcing up to 4 GiB costs nothing: refused, or waits for bytes that end."""
    tracemalloc.start()
    try:
        for size in (1 << 20, (1 << 22) - 1, 1 << 30, 0xFFFFFFFF):
            loop.run_until_complete(_read_all(struct.pack(">I", size) + b"abc", 4 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


@fuzz(1_000)
@given(st.binary(min_size=32 * 20, max_size=32 * 20))
def test_page_frame_header_random(blob: bytes) -> None:  # 20k inputs
    for off in range(0, len(blob), 32):
        try:
            h = framing.decode_header(blob[off : off + 32])
        except ProtocolError:
            continue
        assert h.payload_len <= framing.MAX_PAYLOAD


EDGES = (0, 1, 255, 256, 4095, 4096, 1 << 20, 1 << 31, (1 << 32) - 1, 1 << 47, (1 << 64) - 1)


def _field(rng: random.Random, bits: int) -> int:
    v = rng.choice(EDGES) if rng.random() < 0.5 else rng.getrandbits(bits)
    return v & ((1 << bits) - 1)


@fuzz(1_000)
@given(st.sampled_from(list(framing.Kind)), st.sampled_from(list(framing.Codec)), st.integers(0))
def test_page_frame_header_fields(kind: framing.Kind, codec: framing.Codec, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):  # 10k inputs
        pages = _field(rng, 32)
        data = framing.HEADER.pack(
            framing.MAGIC, framing.VERSION, kind, 0, codec, 0, _field(rng, 32), pages,
            _field(rng, 64) & ~0xFFF if rng.random() < 0.7 else _field(rng, 64),
            (pages * 4096) & 0xFFFFFFFF if rng.random() < 0.3 else _field(rng, 32), _field(rng, 32),
        )  # fmt: skip
        try:
            h = framing.decode_header(data)
        except ProtocolError:
            continue
        assert h.payload_len <= framing.MAX_PAYLOAD and h.end <= framing.VADDR_LIMIT


@fuzz(1_000)
@given(st.binary(min_size=32 * 20, max_size=32 * 20), st.integers(0, 40))
def test_criu_iov_random(blob: bytes, odd: int) -> None:  # 20k inputs
    for off in range(0, len(blob), 32):
        chunk = blob[off : off + 32] if off else blob[:odd]
        try:
            iov = criu_protocol.decode_iov(chunk)
        except ProtocolError:
            continue
        assert iov.payload_bytes <= criu_protocol.MAX_NR_PAGES * 4096


@fuzz(1_000)
@given(st.sampled_from(list(criu_protocol.Command)), st.integers(0))
def test_criu_iov_fields(command: criu_protocol.Command, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):  # 10k inputs
        cmd = int(command) | (_field(rng, 16) << 16 if rng.random() < 0.5 else 0)
        raw = criu_protocol.IOV.pack(cmd, _field(rng, 64), _field(rng, 64), _field(rng, 64))
        try:
            iov = criu_protocol.decode_iov(raw)
        except ProtocolError:
            continue
        if iov.command in (criu_protocol.Command.OPEN2, criu_protocol.Command.ADD_F):
            assert iov.image is not None  # decodable, or decode_iov would have refused it


@fuzz(1_000)
@given(st.sampled_from([framing.Codec.LZ4, framing.Codec.ZSTD]), st.binary(max_size=512))
def test_decompressor_random_payload(codec: framing.Codec, payload: bytes) -> None:
    out = bytearray(framing.MAX_PAYLOAD)
    try:
        framing.Decompressor().decompress_into(codec, memoryview(payload), memoryview(out), 4096)
    except ProtocolError:
        pass
