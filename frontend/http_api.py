"""The OpenAI-compatible HTTP API of the frontend process (DESIGN.md sections 1 and 6).

A FastAPI app around the `Frontend`: each HTTP request becomes the `GenerateRequest` an SDK
client would send and runs through `Frontend.generate_local`, so validation, media loading, the
feature-cache mirror and aborts are the SDK's own. uvicorn serves it in the frontend's asyncio
loop, beside the ZMQ socket. Shapes follow OpenAI's API (and vLLM's `serving_chat.py`): a
`chat.completion` / `text_completion` object, or SSE lines `data: {...chunk}`, one usage-only
chunk last when `stream_options.include_usage`, then `data: [DONE]`. Errors are OpenAI's
`{"error": {"message", "type", "param", "code"}}` with the status of their code
(`shared/errors.py`). A client that goes away has its request aborted in the GPU worker.
`n > 1` runs n engine requests of the same prompt (seeds `seed + i`, as vLLM's parallel
sampling), answered as one response whose choices carry their `index`; a completions `prompt`
may be a list (of strings, or of token id lists, as vLLM takes), each prompt with its n choices.
Responses are laid out by `openai_format.py`; API keys, the body cap and the request counter
are `http_guard.py`'s; `/metrics` renders `metrics.py`'s registry.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from mm_runtime.frontend.http_guard import HttpGuard, error_body
from mm_runtime.frontend.openai_format import MAX_LOGPROBS, ChatShape, CompletionShape, Shape
from mm_runtime.frontend.server import Frontend
from mm_runtime.shared.errors import (
    ConfigError,
    InvalidRequest,
    MMRuntimeError,
    ModelNotFound,
)
from mm_runtime.shared.wire import (
    ChatMessage,
    GenerateRequest,
    ImageURL,
    ImageURLPart,
    RequestDelta,
    SamplingParams,
    TextPart,
)

logger = logging.getLogger(__name__)

SUPPORTED_PARTS = ("text", "image_url")
UNSUPPORTED_MEDIA_PARTS = ("video_url", "input_audio", "audio_url")
MAX_N = 16  # choices per request: each is a whole engine request
_HTTP_ERROR_CODES = {413: "request_too_large"}  # others: "http_error"
# Every integer of a request fits an int64: a larger one cannot cross the wire (msgspec) or sit in
# a tensor, and failed there as a 500 (found by fuzzing, tests/frontend/test_http_fuzz.py).
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """What chat and text completions share; unknown fields are ignored, as OpenAI's are."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Int64 | None = None  # None: up to the model length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int64 = 0  # an extra, as in vLLM; 0 or -1: off
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    n: Int64 = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extra, as in vLLM


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_completion_tokens: Int64 | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None


class CompletionRequest(_SamplingFields):
    # One prompt (text or token ids) or several (texts or token id lists), as vLLM takes them.
    prompt: str | list[str] | list[Int64] | list[list[Int64]]
    logprobs: NumLogprobs | None = None  # the legacy API: how many top logprobs, None for none


class HttpServer:
    """uvicorn serving the API as a task of the running loop; `start` returns once it listens."""

    def __init__(self, frontend: Frontend, host: str, port: int) -> None:
        self.app = build_app(frontend)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,  # the process entry point configures logging
            access_log=False,
            timeout_graceful_shutdown=5,  # then open streams are cut: shutdown must not hang
        )
        self.server = _Server(config)
        self.address = f"http://{host}:{port}"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self._task.done():  # uvicorn exits (SystemExit) when it cannot bind
                with contextlib.suppress(BaseException):
                    self._task.result()
                raise ConfigError(f"cannot serve HTTP on {self.address}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            await self._task


class _Server(uvicorn.Server):
    """The launcher owns SIGINT/SIGTERM; uvicorn's own handlers would stop only the HTTP side."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def build_app(frontend: Frontend) -> FastAPI:
    api = _Api(frontend)
    app = FastAPI(title="mm-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    app.add_exception_handler(MMRuntimeError, _on_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _on_http_exception)  # type: ignore[arg-type]
    config = frontend.config
    app.add_middleware(
        HttpGuard,  # type: ignore[arg-type]
        api_key=config.api_key,
        max_body_bytes=config.max_request_body_bytes,
        metrics=frontend.metrics,
    )
    return app


class _Api:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.model_name = frontend.config.model_name
        self.tokenizer = frontend.prompts.tokenizer

    # ---- endpoints ----

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        num_top = body.top_logprobs or 0 if body.logprobs else None
        max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = body.max_tokens
        messages = _chat_messages(body.messages)
        msgs = [
            GenerateRequest(
                req_id=f"chatcmpl-{uuid.uuid4().hex}",
                messages=messages,
                sampling_params=params,
                stream=body.stream,
            )
            for params in self._sampling_params(body, max_tokens, num_top)
        ]
        shape = ChatShape(self.tokenizer, body.n, num_top is not None, body.stream)
        return await self._respond(msgs, body, request, shape)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        choices = self._sampling_params(body, body.max_tokens, body.logprobs)
        msgs = [  # prompt by prompt, each with its n choices: choice index = prompt * n + j
            GenerateRequest(
                req_id=f"cmpl-{uuid.uuid4().hex}",
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=None if isinstance(prompt, str) else prompt,
                sampling_params=params,
                stream=body.stream,
            )
            for prompt in _prompts(body.prompt)
            for params in choices
        ]
        shape = CompletionShape(self.tokenizer, body.n, body.logprobs is not None)
        return await self._respond(msgs, body, request, shape)

    async def models(self) -> dict[str, object]:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "mm-runtime"}
        return {"object": "list", "data": [card]}

    async def health(self) -> Response:
        alive = self.frontend.gpu_process.is_alive()
        return Response(status_code=200 if alive else 503)

    async def metrics(self) -> Response:
        # A dead or busy GPU worker leaves its stats out (after a short wait), not the scrape.
        _, stats, _ = await self.frontend.stats(timeout_s=2.0)
        return Response(self.frontend.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    # ---- requests in ----

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, self.frontend.config.model):
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}"
            )

    def _sampling_params(
        self, body: _SamplingFields, max_tokens: int | None, num_top: int | None
    ) -> list[SamplingParams]:
        """One per choice (`n`); seeded choices get seeds seed, seed + 1, ..., so they differ."""
        if not 1 <= body.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}] (got {body.n})")
        assert self.frontend.worker_info is not None  # set by Frontend.start
        params = SamplingParams(
            # Past the model length the GPU worker stops the request with "length" anyway.
            max_tokens=self.frontend.worker_info.max_model_len
            if max_tokens is None
            else max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
            ignore_eos=body.ignore_eos,
            logprobs=num_top,
        )
        if body.seed is None:
            return [params] * body.n
        return [msgspec.structs.replace(params, seed=body.seed + i) for i in range(body.n)]

    # ---- responses out ----

    async def _respond(
        self, msgs: list[GenerateRequest], body: _SamplingFields, request: Request, shape: Shape
    ) -> Response:
        created = int(time.time())
        streams = [self.frontend.generate_local(m) for m in msgs]  # one per choice
        # The first replies are awaited here so that a request failing before its first token
        # gets its own HTTP status, not a 200 with an error inside the stream.
        try:
            firsts = await _until_disconnected(request, _first_replies(streams))
        except BaseException:
            await _close_all(streams)  # aborts the other choices
            raise
        if firsts is None:
            await _close_all(streams)
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        head = {"id": msgs[0].req_id, "created": created, "model": self.model_name}
        if not body.stream:
            return JSONResponse(shape.whole(head, firsts))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _sse(shape, head, firsts, streams, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")


async def _sse(
    shape: Shape,
    head: dict[str, object],
    firsts: list[RequestDelta],
    streams: list[AsyncIterator[RequestDelta]],
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE stream of all choices, chunks in arrival order, each with its choice's `index`.
    Closing it early (the client went away) closes `streams`, which aborts their requests."""

    def event(choices: list[dict[str, object]], usage: dict[str, int] | None = None) -> str:
        chunk = {**head, "object": shape.chunk_name, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    finals: list[RequestDelta] = list(firsts)  # each choice's last reply so far
    pending: dict[asyncio.Future[RequestDelta], int] = {}  # next reply -> choice index
    try:
        for i, reply in enumerate(firsts):
            yield event([shape.choice(i, reply, first=True)])
            if reply.finish_reason is None:
                pending[asyncio.ensure_future(anext(streams[i]))] = i
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                finals[i] = reply = task.result()
                if reply.text or reply.finish_reason or reply.logprobs:
                    yield event([shape.choice(i, reply, first=False)])
                if reply.finish_reason is None:
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
        if include_usage:
            yield event([], shape.usage(finals))
    except MMRuntimeError as e:  # failed after the response began: the error as one event
        yield f"data: {json.dumps(error_body(e))}\n\n"
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await _close_all(streams)
    yield "data: [DONE]\n\n"


async def _first_replies(streams: list[AsyncIterator[RequestDelta]]) -> list[RequestDelta]:
    """Each stream's first reply. When one fails (or this is cancelled) the others' pending
    replies are cancelled and awaited: a generator still running cannot be closed."""
    tasks = [asyncio.ensure_future(anext(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close_all(streams: list[AsyncIterator[RequestDelta]]) -> None:
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]


async def _until_disconnected(request: Request, pending: Awaitable[RequestDelta]) -> Any:
    """`pending`'s result, or None (and `pending` cancelled) once the HTTP client disconnects."""
    task = asyncio.ensure_future(pending)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completions `prompt` -> its prompts: a string or a token id list is one prompt, a list
    of strings or of token id lists is several."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt is an empty list")
    if all(isinstance(t, int) for t in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _chat_messages(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    """OpenAI messages -> wire messages. Only text and image_url parts pass; an image URL is
    loaded by the frontend as the SDK's are (data URL, or a path under the allowed folder)."""
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if not isinstance(role, str):
            raise InvalidRequest("each message needs a string 'role'")
        if isinstance(content, str):
            out.append(ChatMessage(role=role, content=content))
        elif isinstance(content, list):
            out.append(ChatMessage(role=role, content=[_content_part(p) for p in content]))
        else:
            raise InvalidRequest("a message's content must be a string or a list of parts")
    return out


def _content_part(part: object) -> TextPart | ImageURLPart:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):  # type: ignore[union-attr]
        return TextPart(part["text"])  # type: ignore[index]
    if kind == "image_url":
        value = part.get("image_url")  # type: ignore[union-attr]
        url = value.get("url") if isinstance(value, dict) else value
        if isinstance(url, str):
            return ImageURLPart(ImageURL(url))
        raise InvalidRequest("an image_url part needs image_url.url, a string")
    supported = ", ".join(SUPPORTED_PARTS)
    if kind in UNSUPPORTED_MEDIA_PARTS:
        raise InvalidRequest(
            f"{kind} content parts are not supported; this server takes {supported}",
            code="unsupported_media",
        )
    raise InvalidRequest(f"unsupported content part type {kind!r}; supported: {supported}")


async def _on_error(request: Request, error: MMRuntimeError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.http_status)


async def _on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()
    )
    return await _on_error(request, InvalidRequest(problems))


async def _on_http_exception(request: Request, error: HTTPException) -> JSONResponse:
    code = _HTTP_ERROR_CODES.get(error.status_code, "http_error")
    body = error_body(None, error.status_code, str(error.detail), code)
    return JSONResponse(body, status_code=error.status_code)
