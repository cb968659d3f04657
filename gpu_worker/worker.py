"""The GPU worker process: the engine core behind its two sockets.

A thread receives and decodes input messages into an inbox (so socket I/O never waits on a
step); the main loop drains the inbox in arrival order, applying each request's feature-cache
operations before anything is scheduled, then runs one engine step and pushes its outputs. The
loop never waits on preprocessing: it only ever sees finished tensors. Bad messages are logged
and dropped; a bad request fails alone, with an error output.
"""

import logging
import os
import queue
import signal
import threading
import time

import zmq

from mm_runtime.gpu_worker.engine import EngineCore
from mm_runtime.gpu_worker.feature_cache import FeatureCacheReceiver
from mm_runtime.shared.config import GpuWorkerConfig
from mm_runtime.shared.errors import MMRuntimeError, ProtocolError
from mm_runtime.shared.logs import setup_process_logging
from mm_runtime.shared.wire import (
    AbortRequests,
    AddRequest,
    EngineOutput,
    ErrorInfo,
    FeatureCacheReset,
    GpuWorkerInput,
    Shutdown,
    StatsRequest,
    StepOutputs,
    WorkerReady,
    WorkerStats,
)
from mm_runtime.shared.zmq_io import MessageCodec, send

logger = logging.getLogger(__name__)


def run_gpu_worker(
    config: GpuWorkerConfig, input_address: str, output_address: str, feature_cache_bytes: int
) -> None:
    """Process entry point (spawn-safe)."""
    setup_process_logging("gpu-worker")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when we stop
    worker = GpuWorker(config, input_address, output_address, feature_cache_bytes)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run()


class GpuWorker:
    def __init__(
        self,
        config: GpuWorkerConfig,
        input_address: str,
        output_address: str,
        feature_cache_bytes: int,
    ) -> None:
        self.running = True
        self.parent_pid = os.getppid()  # the frontend; if it dies, so do we
        self.ctx = zmq.Context()
        self.output = self.ctx.socket(zmq.PUSH)
        self.output.connect(output_address)
        self.out_codec = MessageCodec()
        self.engine = EngineCore(config)
        self.feature_cache = FeatureCacheReceiver(feature_cache_bytes)
        self.inbox: queue.Queue[GpuWorkerInput] = queue.Queue()
        self._handlers = {
            AddRequest: self._on_add,
            AbortRequests: self._on_abort,
            StatsRequest: self._on_stats,
            Shutdown: self._on_shutdown,
        }
        threading.Thread(target=self._receive, args=(input_address,), daemon=True).start()
        runner = self.engine.runner
        send(
            self.output,
            self.out_codec,
            WorkerReady(
                max_model_len=self.engine.max_model_len,
                num_kv_blocks=self.engine.num_kv_blocks,
                device=str(runner.device),
                dtype=str(runner.dtype).removeprefix("torch."),
            ),
        )

    def _receive(self, address: str) -> None:
        """Input thread: decode in arrival order; drop what does not decode."""
        sock = self.ctx.socket(zmq.PULL)
        sock.connect(address)
        codec = MessageCodec(GpuWorkerInput)
        while True:
            frames = sock.recv_multipart(copy=False)
            try:
                self.inbox.put(codec.decode(frames))
            except ProtocolError as e:
                logger.error("dropped a malformed message from the frontend: %s", e)
            except Exception:  # a decoding bug must not leave the worker deaf while alive
                logger.exception("dropped a message that failed to decode")

    def stop(self) -> None:
        self.running = False

    def run(self) -> None:
        while self.running:
            idle = not self.engine.has_unfinished_requests()
            if idle and os.getppid() != self.parent_pid:
                logger.error("the frontend is gone; exiting")
                break
            self._drain_inbox(block=idle)
            if self.running and self.engine.has_unfinished_requests():
                self._step()
        logger.info("GPU worker stopped")

    def _drain_inbox(self, block: bool) -> None:
        try:
            msg = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handlers[type(msg)](msg)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # a bug, not bad input (that is rejected on arrival)
            logger.exception("engine step failed; failing the running requests")
            outputs = [
                self._fail(req_id, "internal_error", "engine step failed")
                for req_id in list(self.engine.requests)
            ]
            for out in outputs:
                self.engine.abort_request(out.req_id)
            time.sleep(0.01)
        if outputs:
            send(self.output, self.out_codec, StepOutputs(outputs))

    # ---- handlers ----

    def _on_add(self, msg: AddRequest) -> None:
        request = msg.request
        epoch = self.feature_cache.epoch
        try:
            self.feature_cache.resolve(request.mm_items, msg.feature_epoch)
            self.engine.add_request(request)
        except MMRuntimeError as e:
            # The reset goes first: the frontend must drop its mirror before the client hears
            # of the failure and retries, or the retry would be decided against the old mirror.
            if self.feature_cache.epoch != epoch:
                logger.warning(
                    "feature cache out of sync: reset to epoch %d", self.feature_cache.epoch
                )
                send(self.output, self.out_codec, FeatureCacheReset(self.feature_cache.epoch))
            logger.debug("request %s rejected: %s", request.req_id, e)
            failed = self._fail(request.req_id, e.code, e.message)
            send(self.output, self.out_codec, StepOutputs([failed]))

    def _on_abort(self, msg: AbortRequests) -> None:
        for req_id in msg.req_ids:
            self.engine.abort_request(req_id)

    def _on_stats(self, msg: StatsRequest) -> None:
        fc = self.feature_cache
        stats = self.engine.stats() | {
            "gpu_feature_cache_hits_total": fc.hits,
            "gpu_feature_cache_misses_total": fc.misses,
            "gpu_feature_cache_resets_total": fc.num_resets,
            "gpu_feature_cache_bytes": fc.lru.used_bytes,
        }
        reply = WorkerStats(
            query_id=msg.query_id, stats=stats, feature_cache_keys=list(fc.lru.keys())
        )
        send(self.output, self.out_codec, reply)

    def _on_shutdown(self, msg: Shutdown) -> None:
        self.running = False

    @staticmethod
    def _fail(req_id: str, code: str, message: str) -> EngineOutput:
        return EngineOutput(
            req_id=req_id,
            new_token_ids=[],
            finish_reason="error",
            error=ErrorInfo(code, message, req_id),
        )
