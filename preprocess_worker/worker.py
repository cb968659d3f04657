"""The preprocess worker process: receives encoded media items, replies with their tensors.

`run_preprocess_worker` is the process entry point (started by the launcher with the spawn start
method, N of them behind the frontend's ROUTER socket, DESIGN.md section 1). The loop is
receive a `PreprocessJob`, decode + process it, reply. The worker is stateless and never dies of
its input: a bad item becomes a `PreprocessFailed` reply, a malformed message is logged and
dropped. It stops on SIGTERM / SIGINT, or when the frontend that started it is gone.
"""

import logging
import os
import signal
import time
from types import FrameType

import torch
import zmq

from mm_runtime.preprocess_worker.processors import ImageProcessor
from mm_runtime.shared.errors import MediaError, MMRuntimeError, PreprocessError, ProtocolError
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import (
    ErrorInfo,
    PreprocessFailed,
    PreprocessJob,
    PreprocessReady,
    PreprocessReply,
    PreprocessResult,
)
from mm_runtime.shared.zmq_io import MessageCodec, send

logger = logging.getLogger(__name__)

# How often the loop looks up from the socket to notice a stop request or a vanished parent.
# It costs nothing while jobs arrive: a poll returns as soon as a message is there.
_POLL_MS = 100


def run_preprocess_worker(model_dir: str, address: str) -> None:
    """Process entry point: serve preprocess jobs from the frontend at `address` until stopped."""
    _setup_logging()
    # N workers run side by side, each on one item: their parallelism is across processes. Left
    # at its default, each worker's torch would start one thread per core, N x cores threads
    # fighting over the cores (and over the frontend's and the GPU worker's CPU time).
    torch.set_num_threads(1)
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    try:
        processor = ImageProcessor(ModelInfo.from_model_dir(model_dir))
    except MMRuntimeError as e:  # e.g. not a model directory: one line, not a traceback
        logger.error("preprocess worker cannot start: %s", e)
        raise SystemExit(1) from None
    PreprocessWorker(processor, address).serve(stop)


def handle_job(processor: ImageProcessor, job: PreprocessJob) -> PreprocessReply:
    """One job -> its reply. Never raises: every failure becomes a `PreprocessFailed`."""
    start = time.perf_counter()
    try:
        if job.modality != "image":
            raise MediaError(f"unsupported modality {job.modality!r}; this worker takes image")
        processed = processor.process_bytes(job.data)
    except MMRuntimeError as e:
        logger.debug("job %d failed: %s", job.job_id, e)
        return PreprocessFailed(job.job_id, ErrorInfo(e.code, e.message, ""))
    except Exception as e:  # a bug or a library surprise: this item fails, the worker goes on
        logger.exception("job %d: unexpected error while preprocessing", job.job_id)
        message = f"unexpected error while preprocessing: {type(e).__name__}: {e}"
        return PreprocessFailed(job.job_id, ErrorInfo(PreprocessError.code, message, ""))
    return PreprocessResult(
        job_id=job.job_id,
        tensors=processed.tensors,
        num_tokens=processed.num_tokens,
        seconds=time.perf_counter() - start,
    )


class PreprocessWorker:
    """One DEALER socket connected to the frontend's ROUTER; one job at a time."""

    def __init__(self, processor: ImageProcessor, address: str) -> None:
        self.processor = processor
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0  # at exit, a reply nobody waits for any more is dropped
        self.sock.connect(address)
        self.decoder = MessageCodec(PreprocessJob)
        self.encoder = MessageCodec()

    def serve(self, stop: "_StopFlag") -> None:
        parent_pid = os.getppid()
        send(self.sock, self.encoder, PreprocessReady(os.getpid()))
        logger.info("preprocess worker %d ready", os.getpid())
        try:
            while not stop.is_set:
                if not self.sock.poll(_POLL_MS):
                    if os.getppid() != parent_pid:  # the frontend died without stopping us
                        logger.warning("the frontend (pid %d) is gone; exiting", parent_pid)
                        break
                    continue
                self._serve_one()
        finally:
            self.sock.close()
            self.ctx.term()
        logger.info("preprocess worker %d stopped", os.getpid())

    def _serve_one(self) -> None:
        frames = self.sock.recv_multipart(copy=False)
        try:
            job = self.decoder.decode(frames)
        except ProtocolError as e:
            logger.warning("dropped a malformed message (%d frames): %s", len(frames), e)
            return
        reply = handle_job(self.processor, job)
        try:
            message = self.encoder.encode(reply)
        except Exception as e:  # e.g. a tensor dtype the wire does not carry
            logger.exception("job %d: cannot encode the reply", job.job_id)
            error = ErrorInfo(PreprocessError.code, f"cannot send the tensors: {e}", "")
            message = self.encoder.encode(PreprocessFailed(job.job_id, error))
        self.sock.send_multipart(message, copy=False)


class _StopFlag:
    """Set by the signal handlers; the loop checks it between jobs, so a job in hand finishes
    and nothing is interrupted halfway (no traceback at exit)."""

    def __init__(self) -> None:
        self.is_set = False

    def set(self, signum: int, frame: FrameType | None) -> None:
        self.is_set = True


def _setup_logging() -> None:
    level = os.environ.get("MM_RUNTIME_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
