"""Length-prefixed control frames: a 4-byte big-endian length, then one ``phaul.Envelope``.

Nothing a peer sends is ever evaluated: a frame is parsed as protobuf or rejected. Oversized,
truncated or unparsable frames raise :class:`ProtocolError`; an ``Error`` frame from the peer is
rebuilt into the matching :class:`PhaulError` subclass; ``Log`` frames are handed to a callback.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from phaul.errors import PhaulError, ProtocolError, error_from_wire
from phaul.pb import phaul_pb2 as pb

log = logging.getLogger(__name__)

HEADER = struct.Struct(">I")
MAX_FRAME = 4 << 20  # control frames only; image files travel in chunks of IMAGE_CHUNK
IMAGE_CHUNK = 1 << 20

M = TypeVar("M", bound=Message)

_FIELD_BY_TYPE: dict[str, str] = {
    field.message_type.name: field.name
    for field in pb.Envelope.DESCRIPTOR.oneofs_by_name["msg"].fields
    if field.message_type is not None
}


def encode(msg: Message) -> bytes:
    """Wrap ``msg`` in an Envelope and frame it."""
    field = _FIELD_BY_TYPE.get(msg.DESCRIPTOR.name)
    if field is None:
        raise TypeError(f"{msg.DESCRIPTOR.name} is not a control message")
    env = pb.Envelope()
    getattr(env, field).CopyFrom(msg)
    body = env.SerializeToString()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Message:
    """Parse one frame body into the message inside its Envelope."""
    env = pb.Envelope()
    try:
        env.ParseFromString(body)
    except DecodeError as err:
        raise ProtocolError("malformed control frame") from err
    which = env.WhichOneof("msg")
    if which is None:
        raise ProtocolError("control frame carries no known message")
    msg: Message = getattr(env, which)
    return msg


def error_message(err: PhaulError, phase: str = "") -> pb.Error:
    return pb.Error(
        code=err.code,
        message=err.message,
        detail=err.detail,
        phase=phase or getattr(err, "phase", ""),
        log_path=err.log_path,
        criu_errno=getattr(err, "criu_errno", 0),
    )


class Channel:
    """A control connection over an asyncio stream pair (any transport: TCP, TLS, SSH)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame: int = MAX_FRAME,
        on_log: Callable[[pb.Log], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.on_log = on_log
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, msg: Message) -> None:
        data = encode(msg)
        self.writer.write(data)
        self.bytes_sent += len(data)
        await self.writer.drain()

    async def recv_any(self, timeout: float | None = None) -> Message:
        """Next message that is not a Log; an Error frame is raised as its exception."""
        while True:
            msg = await asyncio.wait_for(self._read_one(), timeout)
            if isinstance(msg, pb.Log):
                if self.on_log is not None:
                    self.on_log(msg)
                continue
            if isinstance(msg, pb.Error):
                raise error_from_wire(msg.code, msg.message, msg.detail, msg.log_path)
            return msg

    async def recv(self, kind: type[M], timeout: float | None = None) -> M:
        """Next message, which must be a ``kind``; anything else is a protocol error."""
        msg = await self.recv_any(timeout)
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {kind.DESCRIPTOR.name}, peer sent {msg.DESCRIPTOR.name}")
        return msg

    async def _read_one(self) -> Message:
        try:
            head = await self.reader.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as err:
            raise ProtocolError("connection closed by peer") from err
        (size,) = HEADER.unpack(head)
        if size > self.max_frame:
            raise ProtocolError(f"peer sent a frame of {size} bytes (limit {self.max_frame})")
        try:
            body = await self.reader.readexactly(size)
        except asyncio.IncompleteReadError as err:
            raise ProtocolError("connection closed in the middle of a frame") from err
        self.bytes_received += HEADER.size + size
        return decode_body(body)

    async def send_error(self, err: PhaulError, phase: str = "") -> None:
        """Best effort: tell the peer why we stop (the connection may already be gone)."""
        try:
            await self.send(error_message(err, phase))
        except (OSError, ConnectionError, ProtocolError):
            log.debug("could not send error to peer", exc_info=True)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ConnectionError):
            pass
