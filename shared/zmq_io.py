"""Messages on ZMQ sockets: msgpack bodies with tensors as out-of-band frames.

A message is the multipart [version, body, *tensor frames]. The body is the msgspec struct;
each tensor field becomes a `TensorRef` naming its frame, and the tensor's bytes go in that
frame untouched (`send_multipart(copy=False)`), rebuilt on the other side with
`torch.frombuffer`, without a copy. Small tensors travel inline, where a frame would cost more
than the bytes. Decoding never trusts the sender: a wrong version, garbage, or a tensor whose
frame does not hold exactly dtype x shape bytes raises `ProtocolError`, for the caller to log
and drop: no process dies of a bad message.
"""

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch
import zmq

from mm_runtime.shared.errors import InvalidRequest, ProtocolError
from mm_runtime.shared.wire import PROTOCOL_VERSION, TensorRef

# Received frames are read-only; the tensors rebuilt on them are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

INLINE_TENSOR_BYTES = 1024  # smaller tensors go inside the body
_VERSION_FRAME = bytes([PROTOCOL_VERSION])
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}

Frame = bytes | memoryview | zmq.Frame


class MessageCodec:
    """Encodes any wire struct; decodes the one union type a socket carries. One per socket
    direction and thread (it keeps the current message's frames while coding it)."""

    def __init__(self, decode_type: Any = None) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._decoder = (
            msgspec.msgpack.Decoder(decode_type, dec_hook=self._dec_hook)
            if decode_type is not None
            else None
        )
        self._out_frames: list[memoryview] = []
        self._in_frames: list[memoryview] = []

    def encode(self, msg: msgspec.Struct) -> list[bytes | memoryview]:
        self._out_frames = []
        try:
            body = self._encoder.encode(msg)
            return [_VERSION_FRAME, body, *self._out_frames]
        finally:
            self._out_frames = []

    def decode(self, frames: list[Frame]) -> Any:
        assert self._decoder is not None, "this codec only encodes"
        views = [_view(f) for f in frames]
        if len(views) < 2:
            raise ProtocolError(f"a message has at least 2 frames, got {len(views)}")
        if bytes(views[0]) != _VERSION_FRAME:
            raise ProtocolError(
                f"protocol version {bytes(views[0])[:4]!r}, expected {PROTOCOL_VERSION}"
            )
        self._in_frames = views[2:]
        try:
            return self._decoder.decode(views[1])
        # Beyond DecodeError, msgspec lets through UnicodeDecodeError (invalid UTF-8 in a str)
        # and RecursionError (~1000 levels of a skipped unknown field fit in a few KB); a
        # struct's __post_init__ raises InvalidRequest (e.g. max_tokens 0) before any req_id
        # is known to answer to.
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, InvalidRequest) as e:
            raise ProtocolError(f"malformed message: {e}") from e
        finally:
            self._in_frames = []

    def _enc_hook(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            raise NotImplementedError(f"cannot encode {type(obj).__name__}")
        t = obj.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        raw = t.view(-1).view(torch.uint8).numpy() if t.numel() else b""
        if t.nbytes <= INLINE_TENSOR_BYTES:
            return TensorRef(dtype, list(t.shape), -1, bytes(raw))
        self._out_frames.append(memoryview(raw))
        return TensorRef(dtype, list(t.shape), len(self._out_frames) - 1)

    def _dec_hook(self, type_: type, obj: Any) -> Any:
        if type_ is not torch.Tensor:
            raise NotImplementedError(f"cannot decode {type_}")
        ref = msgspec.convert(obj, TensorRef)
        dtype = _DTYPES.get(ref.dtype)
        if dtype is None or any(not 0 <= d < 2**63 for d in ref.shape):  # torch sizes: int64
            raise msgspec.ValidationError(f"bad tensor dtype/shape {ref.dtype} {ref.shape}")
        if ref.frame == -1:
            buf = memoryview(ref.data or b"")
        elif 0 <= ref.frame < len(self._in_frames):
            buf = self._in_frames[ref.frame]
        else:
            raise msgspec.ValidationError(f"tensor frame {ref.frame} does not exist")
        numel = 1
        for d in ref.shape:
            numel *= d
        if numel * dtype.itemsize != buf.nbytes:
            raise msgspec.ValidationError(
                f"tensor {ref.dtype}{ref.shape} needs {numel * dtype.itemsize} bytes, "
                f"its frame has {buf.nbytes}"
            )
        try:
            if numel == 0:
                return torch.empty(ref.shape, dtype=dtype)
            return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(ref.shape)
        # e.g. a 0-element shape whose other dims overflow int64 once multiplied: msgspec turns
        # only TypeError/ValueError into a ValidationError, a RuntimeError would escape decode()
        except RuntimeError as e:
            raise msgspec.ValidationError(f"bad tensor shape {ref.shape}: {e}") from e


def _view(frame: Frame) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


def send(sock: zmq.Socket, codec: MessageCodec, msg: msgspec.Struct, *prefix: bytes) -> None:
    """Sends `msg` (after routing `prefix` frames, e.g. a ROUTER's peer identity)."""
    sock.send_multipart([*prefix, *codec.encode(msg)], copy=False)


@dataclass(frozen=True, slots=True)
class IpcPaths:
    """The private socket folder of one server and its socket addresses."""

    root: Path

    @classmethod
    def create(cls) -> "IpcPaths":
        return cls(Path(tempfile.mkdtemp(prefix="mm-runtime-")))

    def address(self, name: str) -> str:
        return f"ipc://{self.root / name}"

    @property
    def gpu_input(self) -> str:
        return self.address("gpu-input")

    @property
    def gpu_output(self) -> str:
        return self.address("gpu-output")

    @property
    def preprocess(self) -> str:
        return self.address("preprocess")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def exists(self) -> bool:
        return os.path.isdir(self.root)
