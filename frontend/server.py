"""The frontend process: SDK requests in, tokens out, media through the feature-cache mirror.

One asyncio loop (DESIGN.md sections 1-3): the SDK's ROUTER socket, the channel to the GPU
worker, its output channel, and the preprocess pool. Per request: chat template, media loading
and hashing, then preprocessing of the items the GPU worker does not hold (one job per hash
however many requests wait for it), then, synchronously with the send so the mirror's operation
order is the channel's, the hit/miss decisions, placeholder expansion and the `AddRequest`.
Outputs are detokenized incrementally (stop strings abort the request in the GPU worker) and
streamed back. A client that goes away has its requests aborted (ROUTER_NOTIFY).
"""

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from mm_runtime.frontend.detokenizer import IncrementalDetokenizer
from mm_runtime.frontend.feature_cache import FeatureCacheMirror
from mm_runtime.frontend.media import UrlFetch, load_image_bytes
from mm_runtime.frontend.metrics import FrontendMetrics
from mm_runtime.frontend.preprocess_pool import PreprocessPool
from mm_runtime.frontend.prompt import PromptBuilder
from mm_runtime.shared.config import FrontendConfig
from mm_runtime.shared.errors import (
    EngineDead,
    InvalidRequest,
    MMRuntimeError,
    Overloaded,
    ProtocolError,
    error_from_wire,
)
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import (
    AbortRequest,
    AbortRequests,
    AddRequest,
    ChatMessage,
    ClientMessage,
    EngineOutput,
    EngineRequest,
    ErrorInfo,
    FeatureCacheReset,
    GenerateRequest,
    GpuWorkerOutput,
    HealthReply,
    HealthRequest,
    ImageBytesPart,
    ImageURLPart,
    MMItem,
    Ping,
    PreprocessResult,
    RequestDelta,
    RequestFailed,
    Shutdown,
    StatsRequest,
    StepOutputs,
    TextPart,
    TokenLogprobs,
    Usage,
    WorkerReady,
    WorkerStats,
)
from mm_runtime.shared.zmq_io import IpcPaths, MessageCodec, send

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Client:
    """One in-flight request of an SDK client."""

    identity: bytes  # the client's ROUTER routing id
    req_id: str  # the client's id for it
    stream: bool
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None


class Frontend:
    def __init__(
        self,
        config: FrontendConfig,
        ipc: IpcPaths,
        gpu_process: BaseProcess,
        pool: PreprocessPool,
    ) -> None:
        self.config = config
        self.ipc = ipc
        self.gpu_process = gpu_process
        self.pool = pool
        self.info = ModelInfo.from_model_dir(config.model)
        self.prompts = PromptBuilder(self.info, config.chat_template)
        self.mirror = FeatureCacheMirror(config.feature_cache_bytes)
        self.url_fetch = UrlFetch(
            config.allowed_media_domains, config.media_fetch_timeout_s, config.max_media_fetch_bytes
        )
        self.metrics = FrontendMetrics()  # histograms; counters and gauges are in stats()
        self.ctx = zmq.asyncio.Context()
        self.requests: dict[str, _Client] = {}  # engine req_id -> client request
        self._inflight_jobs: dict[str, asyncio.Task[PreprocessResult]] = {}  # mm_hash -> job
        self._preparing: dict[str, bytes] = {}  # engine req_id -> client, before it is sent
        # In-process clients (the HTTP API): identity -> the replies a socket would carry.
        self._local: dict[bytes, asyncio.Queue[RequestDelta | RequestFailed]] = {}
        self._stats_waiters: dict[int, asyncio.Future[WorkerStats]] = {}  # query_id -> reply
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self.worker_info: WorkerReady | None = None
        self.exit_code = 0
        self.stopped = asyncio.Event()
        self.counters = {
            "mm_runtime_preprocess_jobs_total": 0.0,
            "mm_runtime_preprocess_seconds_total": 0.0,
            "mm_runtime_requests_total": 0.0,
            "mm_runtime_request_errors_total": 0.0,
            "mm_runtime_requests_aborted_total": 0.0,
            "mm_runtime_time_to_first_token_seconds_sum": 0.0,
            "mm_runtime_time_to_first_token_seconds_count": 0.0,
        }

    # ---- life cycle ----

    async def start(self) -> WorkerReady:
        """Binds the internal sockets, starts the workers, waits for the GPU worker's Ready,
        then opens the SDK socket. Raises EngineDead if the GPU worker dies while loading."""
        self.gpu_in = self.ctx.socket(zmq.PUSH)
        self.gpu_in.bind(self.ipc.gpu_input)
        self.gpu_out = self.ctx.socket(zmq.PULL)
        self.gpu_out.bind(self.ipc.gpu_output)
        self.gpu_in_codec = MessageCodec()
        self.gpu_out_codec = MessageCodec(GpuWorkerOutput)
        self.gpu_process.start()
        await self.pool.start()
        self.worker_info = await self._wait_ready()
        self.sdk = self.ctx.socket(zmq.ROUTER)
        # Sending to a client that went away fails instead of vanishing: that is how we learn
        # of a disconnect (ZMQ_ROUTER_NOTIFY is a draft API, missing from pyzmq's libzmq).
        self.sdk.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sdk.bind(f"tcp://{self.config.host}:{self.config.zmq_port}")
        self.sdk_in_codec = MessageCodec(ClientMessage)
        self.sdk_out_codec = MessageCodec()
        loops = (self._client_loop(), self._output_loop(), self._watch_gpu_worker(), self._ping())
        for loop in loops:
            self._spawn(loop)
        return self.worker_info

    async def _wait_ready(self) -> WorkerReady:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if not self.gpu_process.is_alive():
                raise EngineDead(f"the GPU worker exited (code {self.gpu_process.exitcode})")
            if await self.gpu_out.poll(200):
                msg = self.gpu_out_codec.decode(await self.gpu_out.recv_multipart(copy=False))
                if isinstance(msg, WorkerReady):
                    return msg
        raise EngineDead(f"the GPU worker was not ready within {self.config.ready_timeout_s} s")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.gpu_process.is_alive():
            send(self.gpu_in, self.gpu_in_codec, Shutdown())
            await asyncio.to_thread(self.gpu_process.join, 10)
            if self.gpu_process.is_alive():
                self.gpu_process.kill()
                await asyncio.to_thread(self.gpu_process.join, 5)
        await self.pool.close()
        self.ctx.destroy(linger=0)
        self.ipc.remove()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("frontend task failed", exc_info=task.exception())

    async def _watch_gpu_worker(self) -> None:
        while self.gpu_process.is_alive():
            await asyncio.sleep(0.2)
        logger.error("the GPU worker died (exit code %s)", self.gpu_process.exitcode)
        for req_id in list(self.requests):
            self._fail(req_id, EngineDead("the GPU worker died; the server is shutting down"))
        await asyncio.sleep(0.2)  # let the failures reach the clients
        self.exit_code = 1
        self.stopped.set()

    # ---- SDK socket ----

    async def _client_loop(self) -> None:
        while True:
            frames = await self.sdk.recv_multipart(copy=False)
            identity = bytes(frames[0].buffer)
            try:
                msg = self.sdk_in_codec.decode(frames[1:])
            except ProtocolError as e:
                logger.error("dropped a malformed SDK message: %s", e)
                self._reply(identity, RequestFailed("", ErrorInfo(e.code, e.message, "")))
                continue
            if isinstance(msg, GenerateRequest):
                self._spawn(self._generate(identity, msg))
            elif isinstance(msg, AbortRequest):
                self._abort(self._engine_id(identity, msg.req_id))
            elif isinstance(msg, HealthRequest):
                self._spawn(self._health(identity))

    def _reply(self, identity: bytes, msg: msgspec.Struct) -> None:
        local = self._local.get(identity)
        if local is not None:
            if isinstance(msg, RequestDelta | RequestFailed):
                local.put_nowait(msg)
            return
        try:
            sent = self.sdk.send_multipart([identity, *self.sdk_out_codec.encode(msg)], copy=False)
        except zmq.ZMQError:  # EHOSTUNREACH: the client is gone
            self._abort_client(identity)
            return
        sent.add_done_callback(lambda f: self._on_sent(identity, f))

    def _on_sent(self, identity: bytes, sent: "asyncio.Future[object]") -> None:
        if not sent.cancelled() and sent.exception() is not None:
            self._abort_client(identity)

    async def _ping(self) -> None:
        """Probes the clients with requests in flight, so a silent disconnect is noticed."""
        while True:
            await asyncio.sleep(1.0)
            for identity in {c.identity for c in self.requests.values()} - self._local.keys():
                self._reply(identity, Ping())

    @staticmethod
    def _engine_id(identity: bytes, req_id: str) -> str:
        return f"{identity.hex()}:{req_id}"

    # ---- in-process clients ----

    async def generate_local(self, msg: GenerateRequest) -> AsyncIterator[RequestDelta]:
        """The SDK's path without its socket (used by the HTTP API): the same validation, media,
        feature-cache and abort handling. Yields what an SDK client would receive (deltas, or one
        final reply unless `msg.stream`); a failed request raises its `MMRuntimeError`. Closing
        the generator before the final reply (the HTTP client went away) aborts the request."""
        identity = b"local-%d" % next(self._ids)
        queue: asyncio.Queue[RequestDelta | RequestFailed] = asyncio.Queue()
        self._local[identity] = queue
        try:
            self._spawn(self._generate(identity, msg))
            while True:
                reply = await queue.get()
                if isinstance(reply, RequestFailed):
                    raise error_from_wire(reply.error.code, reply.error.message)
                yield reply
                if reply.finish_reason is not None:
                    return
        finally:
            del self._local[identity]
            self._abort_client(identity)  # a no-op once the request has finished

    # ---- a request's way in ----

    async def _generate(self, identity: bytes, msg: GenerateRequest) -> None:
        engine_id = self._engine_id(identity, msg.req_id)
        self.counters["mm_runtime_requests_total"] += 1
        try:
            if not self.gpu_process.is_alive():
                # The watcher failed what was in flight; a request coming after that would
                # wait for replies that never come (until the launcher exits).
                raise EngineDead("the GPU worker died; the server is shutting down")
            if engine_id in self.requests or engine_id in self._preparing:
                raise InvalidRequest(f"request id {msg.req_id!r} is already in flight")
            if self.num_unfinished >= self.config.max_waiting_requests:
                raise Overloaded(
                    f"the server holds {self.num_unfinished} requests already "
                    f"(max_waiting_requests); retry later"
                )
            self._preparing[engine_id] = identity
            text, add_special, sources = self._prompt_and_media(msg)
            await self._submit(identity, engine_id, msg, text, add_special, sources)
        except MMRuntimeError as e:
            self._reply_error(identity, msg.req_id, e)
        except Exception as e:  # a bug: the client still gets an answer
            logger.exception("request %s failed", msg.req_id)
            self._reply_error(identity, msg.req_id, MMRuntimeError(f"internal error: {e}"))
        finally:
            self._preparing.pop(engine_id, None)

    @property
    def num_unfinished(self) -> int:
        """Requests being prepared (media, preprocessing) or generating."""
        return len(self._preparing) + len(self.requests)

    def _reply_error(self, identity: bytes, req_id: str, error: MMRuntimeError) -> None:
        self.counters["mm_runtime_request_errors_total"] += 1
        self._reply(identity, RequestFailed(req_id, ErrorInfo(error.code, error.message, req_id)))

    def _prompt_and_media(
        self, msg: GenerateRequest
    ) -> tuple[str | list[int], bool, list[str | bytes]]:
        """(the prompt text or token ids, whether to add special tokens, the image sources)."""
        if sum(p is not None for p in (msg.prompt, msg.prompt_token_ids, msg.messages)) != 1:
            raise InvalidRequest("give exactly one of prompt, prompt_token_ids and messages")
        text: str | list[int]
        if msg.messages is None:
            # Token ids are used as they are; PromptBuilder.tokenize refuses images with them.
            text = msg.prompt if msg.prompt is not None else msg.prompt_token_ids or []
            add_special = msg.prompt is not None
            sources = [
                p.data if isinstance(p, ImageBytesPart) else p.image_url.url for p in msg.images
            ]
        else:
            text, sources = self.prompts.apply_chat_template(_as_dicts(msg.messages or []))
            add_special = False  # the template holds the special tokens already
        limit = self.config.limit_mm_per_prompt.get("image", 0)
        if len(sources) > limit:
            raise InvalidRequest(
                f"{len(sources)} images in one prompt, the limit is {limit}",
                code="too_many_media_items",
            )
        return text, add_special, sources  # type: ignore[return-value]

    async def _submit(
        self,
        identity: bytes,
        engine_id: str,
        msg: GenerateRequest,
        text: str | list[int],
        add_special: bool,
        sources: list[str | bytes],
    ) -> None:
        allowed_path = self.config.allowed_local_media_path
        allowed = Path(allowed_path) if allowed_path else None
        loaded = [
            await asyncio.to_thread(load_image_bytes, s, allowed, self.url_fetch) for s in sources
        ]
        hashes = [mm_hash for _, mm_hash in loaded]
        data = dict((mm_hash, raw) for raw, mm_hash in loaded)
        results: dict[str, PreprocessResult] = {}
        # Preprocess what the GPU worker does not hold; loop, since an item held when checked
        # may be evicted while we wait for another one. The mirror check and the job lookup run
        # in one step, with no await between: otherwise a request that put the item in the
        # mirror and retired its job in between would leave this one starting a second job.
        while missing := {
            h for h in hashes if h not in results and self.mirror.num_tokens(h) is None
        }:
            jobs = [asyncio.shield(self._preprocess_job(h, data[h])) for h in missing]
            results.update(zip(missing, await asyncio.gather(*jobs), strict=True))
        try:
            self._send(identity, engine_id, msg, text, add_special, hashes, results)
        finally:
            # A finished job leaves the single-flight table only now that its item is in the
            # mirror (or its request gave up): a request arriving in between reuses it.
            for h in results:
                job = self._inflight_jobs.get(h)
                if job is not None and job.done():
                    del self._inflight_jobs[h]

    def _send(
        self,
        identity: bytes,
        engine_id: str,
        msg: GenerateRequest,
        text: str | list[int],
        add_special: bool,
        hashes: list[str],
        results: dict[str, PreprocessResult],
    ) -> None:
        """Synchronous on purpose (no await): the mirror's decisions are the channel's order."""
        num_tokens = [
            results[h].num_tokens if h in results else self.mirror.num_tokens(h) for h in hashes
        ]
        token_ids, ranges = self.prompts.tokenize(text, num_tokens, add_special)  # type: ignore[arg-type]
        items = [
            MMItem(
                modality="image",
                mm_hash=h,
                placeholder=r,
                tensors=results[h].tensors if h in results else None,
            )
            for h, r in zip(hashes, ranges, strict=True)
        ]
        if engine_id not in self._preparing:
            return  # aborted (or its client left) while its media was being prepared
        self.mirror.apply(items, num_tokens)  # type: ignore[arg-type]
        request = EngineRequest(
            req_id=engine_id,
            prompt_token_ids=token_ids,
            sampling_params=msg.sampling_params,
            mm_items=items,
        )
        detok = IncrementalDetokenizer(self.prompts.tokenizer, token_ids, msg.sampling_params.stop)
        self.requests[engine_id] = _Client(identity, msg.req_id, msg.stream, len(token_ids), detok)
        send(
            self.gpu_in,
            self.gpu_in_codec,
            AddRequest(request=request, feature_epoch=self.mirror.epoch),
        )

    def _preprocess_job(self, mm_hash: str, data: bytes) -> "asyncio.Future[PreprocessResult]":
        """The one preprocessing job of a hash, shared by every request that waits for it
        (shielded by each waiter, so a waiter that gives up does not cancel it for the rest)."""
        job = self._inflight_jobs.get(mm_hash)
        if job is None:
            job = asyncio.ensure_future(self._run_job(data))
            self._inflight_jobs[mm_hash] = job
            job.add_done_callback(lambda j: self._on_job_done(mm_hash, j))
        return job

    def _on_job_done(self, mm_hash: str, job: "asyncio.Future[PreprocessResult]") -> None:
        # A failed job is forgotten at once (the next request retries); a successful one stays
        # until a request has put its item in the mirror (see _submit).
        if (job.cancelled() or job.exception() is not None) and self._inflight_jobs.get(
            mm_hash
        ) is job:
            del self._inflight_jobs[mm_hash]

    async def _run_job(self, data: bytes) -> PreprocessResult:
        """Counted here, once per job, not once per request waiting for it."""
        result = await self.pool.process("image", data)
        self.counters["mm_runtime_preprocess_jobs_total"] += 1
        self.counters["mm_runtime_preprocess_seconds_total"] += result.seconds
        self.metrics.preprocess.observe(result.seconds)
        return result

    # ---- outputs ----

    async def _output_loop(self) -> None:
        while True:
            frames = await self.gpu_out.recv_multipart(copy=False)
            try:
                msg = self.gpu_out_codec.decode(frames)
            except ProtocolError as e:
                logger.error("dropped a malformed message from the GPU worker: %s", e)
                continue
            if isinstance(msg, StepOutputs):
                for out in msg.outputs:
                    try:
                        self._on_output(out)
                    except Exception as e:  # e.g. a token id the tokenizer cannot decode
                        logger.exception("bad output for request %s", out.req_id)
                        self._fail(out.req_id, MMRuntimeError(f"internal error: {e}"))
            elif isinstance(msg, FeatureCacheReset):
                self.mirror.reset(msg.epoch)
            elif isinstance(msg, WorkerStats):
                waiter = self._stats_waiters.pop(msg.query_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)

    def _on_output(self, out: EngineOutput) -> None:
        client = self.requests.get(out.req_id)
        if client is None:
            return  # aborted meanwhile
        if out.error is not None:
            self._fail(out.req_id, MMRuntimeError(out.error.message, code=out.error.code))
            return
        if client.first_token_s is None:
            client.first_token_s = time.monotonic()
            self.counters["mm_runtime_time_to_first_token_seconds_sum"] += (
                client.first_token_s - client.arrival_s
            )
            self.counters["mm_runtime_time_to_first_token_seconds_count"] += 1
            self.metrics.time_to_first_token.observe(client.first_token_s - client.arrival_s)
        client.token_ids.extend(out.new_token_ids)
        client.logprobs.extend(out.new_logprobs or [])
        delta = client.detokenizer.update(out.new_token_ids, finished=out.finished)
        finish_reason = out.finish_reason
        if finish_reason is None and client.detokenizer.stopped:
            finish_reason = "stop"
            send(self.gpu_in, self.gpu_in_codec, AbortRequests([out.req_id]))
        if finish_reason is not None:
            del self.requests[out.req_id]
            self.metrics.finished(
                client.arrival_s, client.first_token_s, time.monotonic(), len(client.token_ids)
            )
        elif not client.stream:
            return
        whole = not client.stream  # a non-streamed request gets everything in one final reply
        usage = Usage(client.num_prompt_tokens, len(client.token_ids))
        reply = RequestDelta(
            req_id=client.req_id,
            text=client.detokenizer.output_text if whole else delta,
            token_ids=client.token_ids if whole else out.new_token_ids,
            logprobs=(client.logprobs if whole else out.new_logprobs) or None,
            finish_reason=finish_reason,
            usage=None if finish_reason is None else usage,
        )
        self._reply(client.identity, reply)

    def _fail(self, engine_id: str, error: MMRuntimeError) -> None:
        client = self.requests.pop(engine_id, None)
        if client is not None:
            self._reply_error(client.identity, client.req_id, error)

    def _abort(self, engine_id: str) -> None:
        self._preparing.pop(engine_id, None)
        if self.requests.pop(engine_id, None) is not None:
            self.counters["mm_runtime_requests_aborted_total"] += 1
            send(self.gpu_in, self.gpu_in_codec, AbortRequests([engine_id]))

    def _abort_client(self, identity: bytes) -> None:
        for rid in [rid for rid, who in self._preparing.items() if who == identity]:
            del self._preparing[rid]
        ids = [rid for rid, c in self.requests.items() if c.identity == identity]
        for rid in ids:
            del self.requests[rid]
        if ids:
            logger.info("client went away: aborting %d requests", len(ids))
            self.counters["mm_runtime_requests_aborted_total"] += len(ids)
            send(self.gpu_in, self.gpu_in_codec, AbortRequests(ids))

    # ---- health ----

    async def stats(self, timeout_s: float = 5.0) -> tuple[bool, dict[str, float], list[str]]:
        """Every process's counters; (ok, stats, GPU worker's feature-cache keys)."""
        stats = dict(self.counters)
        stats |= {
            "mm_runtime_feature_cache_hits_total": self.mirror.hits,
            "mm_runtime_feature_cache_misses_total": self.mirror.misses,
            "mm_runtime_feature_cache_tensor_bytes_sent_total": self.mirror.tensor_bytes_sent,
            "feature_cache_epoch": self.mirror.epoch,
            "frontend_requests_in_flight": len(self.requests),
            "frontend_requests_unfinished": self.num_unfinished,
            "gpu_worker_pid": self.gpu_process.pid or 0,
        }
        stats |= {f"preprocess_{k}": v for k, v in self.pool.stats().items()}
        if not self.gpu_process.is_alive():
            return False, stats, []
        query_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._stats_waiters[query_id] = waiter
        send(self.gpu_in, self.gpu_in_codec, StatsRequest(query_id))
        try:
            reply: WorkerStats = await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            self._stats_waiters.pop(query_id, None)
            return False, stats, []
        return True, stats | reply.stats, reply.feature_cache_keys

    async def _health(self, identity: bytes) -> None:
        ok, stats, _ = await self.stats()
        self._reply(identity, HealthReply(ok=ok, stats=stats))


def _as_dicts(messages: list[ChatMessage]) -> list[dict[str, object]]:
    """Wire chat messages -> the OpenAI-style dicts PromptBuilder reads."""
    out: list[dict[str, object]] = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts: list[dict[str, object]] = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            elif isinstance(p, ImageURLPart):
                parts.append({"type": "image_url", "image_url": {"url": p.image_url.url}})
            elif isinstance(p, ImageBytesPart):
                parts.append({"type": "image_bytes", "image_bytes": p.data})
        out.append({"role": m.role, "content": parts})
    return out
