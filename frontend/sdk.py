"""The ZMQ client SDK: `mm_runtime.Client` (blocking) and `mm_runtime.AsyncClient` (asyncio).

Both speak the frontend's ROUTER socket with the structs of shared/wire.py. Media may be given
as local paths (read here, on the client), raw bytes, or PIL images (sent as PNG); URLs (data
URLs, server-side paths) travel as they are. Every failure raises `MMRuntimeError` with the
server's `code` and message; a server that does not answer raises `EngineDead`.
"""

import asyncio
import io
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from PIL import Image

from mm_runtime.shared.errors import EngineDead, MMRuntimeError
from mm_runtime.shared.wire import (
    AbortRequest,
    ChatMessage,
    FrontendReply,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    ImageBytesPart,
    ImageURL,
    ImageURLPart,
    Ping,
    RequestDelta,
    RequestFailed,
    SamplingParams,
    TextPart,
    TokenLogprobs,
    Usage,
)
from mm_runtime.shared.zmq_io import MessageCodec, send

Media = str | Path | bytes | Image.Image
DEFAULT_ADDRESS = "tcp://127.0.0.1:5570"


@dataclass(slots=True)
class Completion:
    req_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None


def media_bytes(media: Media) -> bytes:
    """Raw bytes of a client-side path, bytes or PIL image (PIL images travel as PNG)."""
    if isinstance(media, bytes):
        return media
    if isinstance(media, Image.Image):
        buf = io.BytesIO()
        media.save(buf, format="PNG")
        return buf.getvalue()
    return Path(media).read_bytes()


def _part(part: dict[str, object] | TextPart | ImageURLPart | ImageBytesPart) -> object:
    """An OpenAI-style content part (dict) -> its wire struct; PIL/path/bytes images inlined."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "text":
        return TextPart(str(part["text"]))
    if kind == "image_url":
        value = part["image_url"]
        url = value["url"] if isinstance(value, dict) else value
        return ImageURLPart(ImageURL(str(url)))
    if kind in ("image", "image_pil", "image_bytes"):
        return _image_part(part[kind])  # type: ignore[arg-type]
    raise MMRuntimeError(f"unsupported content part type {kind!r}", code="invalid_request")


def _messages(messages: list[dict[str, object]]) -> list[ChatMessage]:
    out = []
    for m in messages:
        content = m.get("content", "")
        if not isinstance(content, str):
            content = [_part(p) for p in content]  # type: ignore[union-attr]
        out.append(ChatMessage(role=str(m["role"]), content=content))  # type: ignore[arg-type]
    return out


def _request(
    req_id: str,
    prompt: str | None,
    images: list[Media] | None,
    messages: list[dict[str, object]] | None,
    sampling_params: SamplingParams | None,
    stream: bool,
) -> GenerateRequest:
    return GenerateRequest(
        req_id=req_id,
        prompt=prompt,
        images=[_image_part(m) for m in images or []],
        messages=None if messages is None else _messages(messages),
        sampling_params=sampling_params or SamplingParams(),
        stream=stream,
    )


def _image_part(media: Media) -> ImageBytesPart | ImageURLPart:
    """URLs (data:, file://, http(s)://) travel as they are; the rest as the bytes read here."""
    if isinstance(media, str) and media.startswith(("data:", "file://", "http://", "https://")):
        return ImageURLPart(ImageURL(media))
    return ImageBytesPart(media_bytes(media))


def _raise(reply: RequestFailed) -> None:
    raise MMRuntimeError(reply.error.message, code=reply.error.code)


def _completion(reply: RequestDelta) -> Completion:
    assert reply.finish_reason is not None and reply.usage is not None
    return Completion(
        reply.req_id, reply.text, reply.token_ids, reply.finish_reason, reply.usage, reply.logprobs
    )


class Client:
    """Blocking client; one request at a time per client (use several, or AsyncClient)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 600.0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.timeout_ms = int(timeout_s * 1000)
        self.out_codec = MessageCodec()
        self.in_codec = MessageCodec(FrontendReply)
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self) -> object:
        if not self.sock.poll(self.timeout_ms):
            raise EngineDead(f"no reply from the server within {self.timeout_ms / 1000} s")
        return self.in_codec.decode(self.sock.recv_multipart(copy=False))

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def stream(
        self,
        prompt: str | None = None,
        images: list[Media] | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        messages: list[dict[str, object]] | None = None,
    ) -> Iterator[RequestDelta]:
        """Yields deltas (text, token ids) until one with a finish_reason (and usage)."""
        req_id = self._next_id()
        request = _request(req_id, prompt, images, messages, sampling_params, True)
        send(self.sock, self.out_codec, request)
        finished = False
        try:
            while not finished:
                reply = self._recv()
                if isinstance(reply, RequestFailed) and reply.req_id in (req_id, ""):
                    _raise(reply)
                if isinstance(reply, RequestDelta) and reply.req_id == req_id:
                    finished = reply.finish_reason is not None
                    yield reply
        finally:
            if not finished:
                self.abort(req_id)

    def generate(
        self,
        prompt: str,
        images: list[Media] | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> Completion:
        request = _request(self._next_id(), prompt, images, None, sampling_params, False)
        return self._complete(request)

    def chat(
        self, messages: list[dict[str, object]], sampling_params: SamplingParams | None = None
    ) -> Completion:
        request = _request(self._next_id(), None, None, messages, sampling_params, False)
        return self._complete(request)

    def _complete(self, request: GenerateRequest) -> Completion:
        send(self.sock, self.out_codec, request)
        while True:
            reply = self._recv()
            if isinstance(reply, RequestFailed) and reply.req_id in (request.req_id, ""):
                _raise(reply)
            if isinstance(reply, RequestDelta) and reply.req_id == request.req_id:
                return _completion(reply)

    def abort(self, req_id: str) -> None:
        send(self.sock, self.out_codec, AbortRequest(req_id))

    def health(self) -> dict[str, float]:
        send(self.sock, self.out_codec, HealthRequest())
        while True:
            reply = self._recv()
            if isinstance(reply, HealthReply):
                if not reply.ok:
                    raise EngineDead("the server reports it is not healthy")
                return reply.stats


class AsyncClient:
    """asyncio client: any number of concurrent requests over one socket."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 600.0) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.timeout_s = timeout_s
        self.out_codec = MessageCodec()
        self.in_codec = MessageCodec(FrontendReply)
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._queues: dict[str, asyncio.Queue[object]] = {}  # req_id -> its replies
        self._health: list[asyncio.Future[HealthReply]] = []
        self._reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(linger=0)
        self.ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            reply = self.in_codec.decode(await self.sock.recv_multipart(copy=False))
            if isinstance(reply, Ping):
                continue
            if isinstance(reply, HealthReply):
                while self._health:
                    fut = self._health.pop(0)
                    if not fut.done():
                        fut.set_result(reply)
                        break
                continue
            queue = self._queues.get(reply.req_id)  # type: ignore[union-attr]
            if queue is not None:
                queue.put_nowait(reply)
            elif isinstance(reply, RequestFailed) and reply.req_id == "":
                for q in self._queues.values():
                    q.put_nowait(reply)

    async def _replies(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        self._ensure_reader()
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._queues[request.req_id] = queue
        finished = False
        try:
            send(self.sock, self.out_codec, request)
            while not finished:
                try:
                    reply = await asyncio.wait_for(queue.get(), self.timeout_s)
                except TimeoutError as e:
                    raise EngineDead(f"no reply from the server within {self.timeout_s} s") from e
                if isinstance(reply, RequestFailed):
                    finished = True
                    _raise(reply)
                assert isinstance(reply, RequestDelta)
                finished = reply.finish_reason is not None
                yield reply
        finally:
            del self._queues[request.req_id]
            if not finished:
                send(self.sock, self.out_codec, AbortRequest(request.req_id))

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def stream(
        self,
        prompt: str | None = None,
        images: list[Media] | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        messages: list[dict[str, object]] | None = None,
    ) -> AsyncIterator[RequestDelta]:
        request = _request(self._next_id(), prompt, images, messages, sampling_params, True)
        async for delta in self._replies(request):
            yield delta

    async def generate(
        self,
        prompt: str,
        images: list[Media] | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> Completion:
        request = _request(self._next_id(), prompt, images, None, sampling_params, False)
        return await self._final(request)

    async def chat(
        self, messages: list[dict[str, object]], sampling_params: SamplingParams | None = None
    ) -> Completion:
        request = _request(self._next_id(), None, None, messages, sampling_params, False)
        return await self._final(request)

    async def _final(self, request: GenerateRequest) -> Completion:
        async for reply in self._replies(request):
            if reply.finish_reason is not None:
                return _completion(reply)
        raise EngineDead("the server closed the request without a final reply")

    async def abort(self, req_id: str) -> None:
        send(self.sock, self.out_codec, AbortRequest(req_id))

    async def health(self) -> dict[str, float]:
        self._ensure_reader()
        fut: asyncio.Future[HealthReply] = asyncio.get_running_loop().create_future()
        self._health.append(fut)
        send(self.sock, self.out_codec, HealthRequest())
        try:
            reply = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError as e:
            raise EngineDead("no health reply from the server") from e
        if not reply.ok:
            raise EngineDead("the server reports it is not healthy")
        return reply.stats
